"""A model folder's overpaint.json (recipes, vocabulary) and a model's identity."""

import json
import shutil

import pytest

import engine
from engine.loading.card import FORMAT, ModelCard, identity
from engine.loading.files import LoadError


def test_the_bundled_card_is_written_from_the_recipes():
    from engine.loader import resolve
    from engine.shapes import recipes

    on_disk = json.loads((resolve("shapes") / "overpaint.json").read_text())
    assert on_disk == json.loads(json.dumps(recipes.model_card()))  # regenerate with recipes.write_card
    card = ModelCard.read(resolve("shapes"))
    assert card.inversion_for == {"p2p": "ddpm", "pnp": "ddim", "masactrl": "ddim"}
    assert card.edit["ledits++"] == recipes.EDIT["ledits++"]
    assert "circle" in card.vocabulary


def test_no_card_is_an_empty_card(tiny_sd15_dir):
    card = ModelCard.read(tiny_sd15_dir)
    assert card == ModelCard() and card.unknown_words("anything at all") == []


@pytest.mark.parametrize("data,message", [
    ({"format": "other"}, "format"),
    ({"format": FORMAT, "recipes": {}}, "unknown field"),
    ({"format": FORMAT, "edit": {"p2p": 3}}, "'edit' must map method names"),
    ({"format": FORMAT, "vocabulary": "red blue"}, "list of words"),
])
def test_bad_cards_are_load_errors(tmp_path, data, message):
    (tmp_path / "overpaint.json").write_text(json.dumps(data))
    with pytest.raises(LoadError, match=message):
        ModelCard.read(tmp_path)
    (tmp_path / "overpaint.json").write_text("{not json")
    with pytest.raises(LoadError, match="cannot read"):
        ModelCard.read(tmp_path)


def test_unknown_words():
    card = ModelCard(vocabulary=["a", "red", "circle", "on", "white", "background"])
    assert card.unknown_words("a red circle, on a white background") == []
    assert card.unknown_words("A purple cat on a red circle") == ["purple", "cat"]


def test_identity_follows_configs_and_weights_not_paths(tiny_sd15_dir, tmp_path):
    import safetensors.torch as st

    base = identity(tiny_sd15_dir, json.loads((tiny_sd15_dir / "model_index.json").read_text()))
    copy = shutil.copytree(tiny_sd15_dir, tmp_path / "copy")
    index = json.loads((copy / "model_index.json").read_text())
    assert identity(copy, index) == base  # another path, same model
    cfg = copy / "unet" / "config.json"
    cfg.write_text(cfg.read_text().replace("\n", "\n ", 1))
    assert identity(copy, index) != base
    copy2 = shutil.copytree(tiny_sd15_dir, tmp_path / "copy2")
    w = copy2 / "unet" / "diffusion_pytorch_model.safetensors"
    sd = st.load_file(w)
    k = sorted(sd)[0]
    sd[k] = sd[k] + 1  # a fine-tune: same names and shapes, other values
    st.save_file(sd, w)
    assert identity(copy2, index) != base


def test_the_pipeline_uses_the_cards_defaults(image, caplog):
    pipe = engine.load("shapes")
    inv = pipe.invert(image, "a red circle", method="ddpm", progress=False)
    assert (inv.steps, inv.settings["skip"], inv.settings["guidance_scale"]) == (30, 0.33, 3.5)  # the recipe
    mine = pipe.invert(image, "a red circle", method="ddpm", steps=4, skip=0.0, progress=False)
    assert mine.steps == 4  # what the caller passes wins
    with caplog.at_level("WARNING", logger="overpaint"):
        pipe.generate("a red cat wearing a hat", steps=1, progress=False)
    assert "'cat', 'wearing', 'hat'" in caplog.text and "overpaint vocab" in caplog.text


def test_recipes_apply_to_edits_not_to_reconstructions(image):
    from engine.loading.card import ModelCard

    pipe = engine.load("shapes")
    inv = pipe.invert(image, "a red circle", method="ddpm", steps=4, skip=0.0, progress=False)
    recon = pipe.edit(inv, "ddpm", None, output_type="pt", progress=False)  # the inversion's guidance, not 15
    edited = pipe.edit(inv, "ddpm", "a blue circle", output_type="pt", progress=False)
    pipe.card = ModelCard()  # no recipes
    torch_close(recon, pipe.edit(inv, "ddpm", None, output_type="pt", progress=False))
    plain = pipe.edit(inv, "ddpm", "a blue circle", output_type="pt", progress=False)
    assert (edited - plain).abs().max() > 1e-3  # the recipe's guidance 15 changed the edit
    torch_close(plain, pipe.edit(inv, "ddpm", "a blue circle", guidance_scale=3.5, output_type="pt", progress=False))


def torch_close(a, b):
    import torch

    torch.testing.assert_close(a, b, rtol=0, atol=0)
