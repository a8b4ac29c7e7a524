"""The bundled Shapes model: it loads by name, matches diffusers, and drives ``overpaint demo``."""


import numpy as np
import pytest
import torch

from engine.loader import BUNDLED, resolve

FOLDER = BUNDLED["shapes"]
pytestmark = pytest.mark.skipif(not (FOLDER / "model_index.json").is_file(), reason="bundled shapes model not present")
PROMPT = "a large red circle on the left and a small blue square on the right, on a white background"


def test_name_resolves_to_package_folder():
    assert resolve("shapes") == FOLDER.resolve()
    size = lambda files: sum(p.stat().st_size for p in files if p.is_file())  # noqa: E731
    adapter = FOLDER / "ip_adapter"  # the optional IP-Adapter beside the pipeline (its card's ip_adapter)
    assert size(p for p in FOLDER.rglob("*") if adapter not in p.parents) <= 30 * 2**20
    assert size(adapter.rglob("*")) <= 8 * 2**20


def test_engine_matches_diffusers():
    from diffusers import StableDiffusionPipeline

    import engine

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    ours = engine.load("shapes").generate(PROMPT, steps=10, guidance_scale=5.0, latents=latents,
                                          output_type="np", progress=False)
    ref = StableDiffusionPipeline.from_pretrained(str(FOLDER))
    ref.set_progress_bar_config(disable=True)
    theirs = ref(PROMPT, num_inference_steps=10, guidance_scale=5.0, height=64, width=64, latents=latents.clone(),
                 output_type="np").images
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1e-4


def test_cli_demo_writes_four_images(tmp_path):
    from PIL import Image

    from engine.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out)]) == 0
    for name in ("input", "reconstruction", "edited", "side_by_side"):
        img = Image.open(out / f"{name}.png")
        assert img.width >= 256 and img.height >= 256


V2 = BUNDLED["shapes-v2"]


@pytest.mark.skipif(not (V2 / "model_index.json").is_file(), reason="bundled shapes-v2 not present")
def test_v2_is_the_recipe_with_screens_and_paints_a_screen_by_caption():
    import json

    import engine
    from engine.shapes import analyser, recipes

    assert resolve("shapes-v2") == V2.resolve()
    assert sum(p.stat().st_size for p in V2.rglob("*") if p.is_file()) <= 30 * 2**20
    cfg = json.loads((V2 / "train_config.json").read_text())
    assert cfg["screens"] > 0.3 and cfg["seed"] == 0
    assert json.loads((V2 / "overpaint.json").read_text()) == recipes.model_card(ip_adapter=(V2 / recipes.IP_ADAPTER).is_file())
    pipe = engine.load("shapes-v2")
    img = pipe.generate("a large red circle in the center, on a green background", steps=10, guidance_scale=5.0,
                        seed=0, output_type="np", progress=False)[0]
    assert analyser.detect_background((img * 255).round().astype(np.uint8)) == "green"
