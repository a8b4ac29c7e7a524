"""The bundled Shapes DiT: it loads by name, diffusers' FluxPipeline reads the same folder and agrees,
and its card carries the DiT's recipes."""

import pytest
import torch

from engine.loader import BUNDLED, resolve

FOLDER = BUNDLED["shapes-dit"]
pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(), reason="bundled shapes-dit not present")
PROMPT = "a large red circle on the left and a small blue square on the right, on a white background"


@pytest.fixture(scope="module")
def pipe():
    import engine

    return engine.load("shapes-dit")


def test_name_resolves_and_is_small():
    assert resolve("shapes-dit") == FOLDER.resolve()
    assert sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file()) <= 40 * 2**20


def test_engine_matches_diffusers(pipe):
    from diffusers import FluxPipeline

    from engine.shapes.dit import T5_LENGTH

    ref = FluxPipeline.from_pretrained(str(FOLDER))
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPT, negative_prompt="", true_cfg_scale=4.0, num_inference_steps=6, height=64, width=64,
               max_sequence_length=T5_LENGTH, generator=torch.Generator().manual_seed(0), output_type="pt").images
    got = pipe.generate(PROMPT, steps=6, guidance_scale=4.0, seed=0, output_type="pt", progress=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_every_token_id_has_an_embedding(pipe):
    """Words outside the world's vocabulary tokenize letter by letter; the T5 has a row for each id."""
    ids = pipe.tokenizers[1]("a purple hexagon", padding="max_length", max_length=32).input_ids
    assert max(ids) < pipe.text_encoders[1].get_input_embeddings().weight.shape[0]
    pipe.encode_prompt("a purple hexagon", guidance=False)


def test_card(pipe):
    from engine.shapes import recipes

    assert pipe.card.to_dict()["generate"] == recipes.dit_card()["generate"]
    assert set(pipe.card.invert) == set(recipes.DIT_METHODS)
    assert pipe.card.unknown_words("a golden hexagon") == ["golden", "hexagon"]
