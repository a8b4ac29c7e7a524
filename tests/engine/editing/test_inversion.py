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


def test_saved_inversions_carry_a_checksum(sd15_pipe, image, tmp_path):
    inv = sd15_pipe.invert(image, "x", method="ddpm", steps=2, progress=False)
    path = inv.save(tmp_path / "inv.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inv.safetensors"]  # no partial file left
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # random bytes in the tensor data, header intact
        data[i] ^= 0x5A
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted: its tensors do not match the checksum"):
        Inversion.load(bad)
    Inversion.load(path)  # the intact file still loads


def test_an_inversion_refuses_another_model(sd15_pipe, tiny_sd15_dir, image, tmp_path):
    import shutil

    import engine

    inv = sd15_pipe.invert(image, "x", method="ddim", steps=2, progress=False)
    assert inv.settings["model"] == {"name": sd15_pipe.name, "id": sd15_pipe.identity}
    other = shutil.copytree(tiny_sd15_dir, tmp_path / "other")
    cfg = other / "vae" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # any change to a config is another model
    pipe2 = engine.load(other)
    assert pipe2.identity != sd15_pipe.identity
    with pytest.raises(ValueError, match="this inversion was made with model .* invert the image again"):
        pipe2.edit(inv, "ddim", "y", progress=False)
    loaded = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    with pytest.raises(ValueError, match="made with model"):
        pipe2.edit(loaded, "ddim", "y", progress=False)
    sd15_pipe.edit(loaded, "ddim", "y", progress=False)  # its own model edits it


def test_short_reprs(sd15_pipe, image):
    inv = sd15_pipe.invert(image, "a red circle", method="ddpm", steps=2, progress=False)
    text = repr(inv)
    assert text.startswith("Inversion(method='ddpm', images=1, steps=2") and "tensor(" not in text
    assert len(text) < 250 and len(repr(sd15_pipe)) < 250
    assert repr(sd15_pipe).startswith("Pipeline(") and "arch='sd'" in repr(sd15_pipe)
