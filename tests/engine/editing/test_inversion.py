"""Inversion save/load round trip and image input errors."""

import numpy as np
import pytest
import torch

from engine.editing import Inversion


def test_save_load_round_trips_bit_exactly_and_edits_the_same(sd15_pipe, image, tmp_path):
    inv = sd15_pipe.invert(image, "a red circle", method="ddpm", steps=4, seed=5, progress=False)
    path = inv.save(tmp_path / "inv.safetensors")
    back = Inversion.load(path)
    assert back.method == "ddpm" and back.settings == inv.settings
    for name in ("x0", "latents", "timesteps", "noise"):
        torch.testing.assert_close(getattr(back, name), getattr(inv, name), atol=0, rtol=0)
    torch.testing.assert_close(back.source.context, inv.source.context, atol=0, rtol=0)
    a = sd15_pipe.edit(inv, "ddpm", "a blue circle", output_type="pt", progress=False)
    b = sd15_pipe.edit(back, "ddpm", "a blue circle", output_type="pt", progress=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sdxl_pooled_round_trip(sdxl_pipe, image, tmp_path):
    inv = sdxl_pipe.invert(image, "x", method="ddim", steps=2, guidance_scale=2.0, progress=False)
    back = Inversion.load(inv.save(tmp_path / "x.safetensors"))
    torch.testing.assert_close(back.source.pooled, inv.source.pooled, atol=0, rtol=0)
    torch.testing.assert_close(back.uncond.pooled, inv.uncond.pooled, atol=0, rtol=0)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Inversion.load(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        Inversion.load(bad)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an overpaint inversion"):
        Inversion.load(tmp_path / "other.safetensors")


def test_image_inputs(sd15_pipe, tmp_path):
    from PIL import Image

    arr = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    a = sd15_pipe.encode_image(path)
    b = sd15_pipe.encode_image(arr)
    c = sd15_pipe.encode_image(Image.fromarray(arr))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sd15_pipe.encode_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        sd15_pipe.encode_image(tmp_path / "junk.png")
    with pytest.raises(ValueError, match="multiples of 2"):
        sd15_pipe.encode_image(arr[:63])
    assert sd15_pipe.encode_image(arr[:63], height=64, width=64).shape == (1, 4, 32, 32)
    from engine.images import load_image

    with pytest.raises(ValueError, match="pixel limit"):
        load_image(path, max_pixels=100)
    t = torch.rand(3, 8, 8)
    load_image(t).mul_(0)
    assert t.abs().sum() > 0  # the caller's tensor is never modified
