"""Image intake for every mode PIL reads, fitting a model's size, atomic saves."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.images import fit_size, load_image, parse_background, resize, save_image


@pytest.mark.parametrize("side", [10000, 30000])  # ours refuses both; PIL itself refuses 30000² as a bomb
def test_oversized_images_are_refused_before_decoding(tmp_path, side, png_header):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(side, side))
    with pytest.raises(ValueError, match=f"{side}x{side}, over the .* pixel limit|over the .* pixel limit"):
        load_image(path)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)  # [H, W]
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    x = load_image(path)  # [1, 3, 64, 64]
    want = torch.from_numpy(ramp.astype(np.float32) / 65535).expand(3, 64, 64)[None]
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    assert 0.45 < x.mean() < 0.55  # not read as all white


def test_uint16_and_float_arrays(tmp_path):
    a16 = np.full((8, 8, 3), 32768, np.uint16)
    torch.testing.assert_close(load_image(a16), torch.full((1, 3, 8, 8), 32768 / 65535), rtol=0, atol=1e-6)
    f = np.full((8, 8), 0.25, np.float32)  # grayscale [H, W]
    torch.testing.assert_close(load_image(f), torch.full((1, 3, 8, 8), 0.25), rtol=0, atol=0)
    with pytest.raises(ValueError, match="finite values in \\[0, 1\\]"):
        load_image(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="finite floats"):
        load_image(torch.full((3, 8, 8), float("nan")))


def test_float_tiff_in_0_255_is_rescaled(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.full((8, 8), 127.5, np.float32), mode="F").save(path)
    torch.testing.assert_close(load_image(path), torch.full((1, 3, 8, 8), 0.5), rtol=0, atol=1e-6)


def test_transparency_is_composited_over_a_background_with_a_notice(tmp_path, caplog):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent in the left half, opaque in the right
    rgba[:, 4:, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with caplog.at_level("WARNING", logger="overpaint"):
        white = load_image(path)
    assert "transparent" in caplog.text
    torch.testing.assert_close(white[0, :, 0, 0], torch.ones(3), rtol=0, atol=0)  # not black
    torch.testing.assert_close(white[0, :, 0, 7], torch.tensor([1.0, 0, 0]), rtol=0, atol=0)
    black = load_image(path, background="black")
    torch.testing.assert_close(black[0, :, 0, 0], torch.zeros(3), rtol=0, atol=0)
    teal = load_image(path, background="#008080")
    torch.testing.assert_close(teal[0, :, 0, 0], torch.tensor([0, 128 / 255, 128 / 255]), rtol=0, atol=1e-6)
    opaque = tmp_path / "o.png"
    Image.fromarray(rgba[..., :3]).convert("RGBA").save(opaque)
    caplog.clear()
    with caplog.at_level("WARNING", logger="overpaint"):
        load_image(opaque)
    assert "transparent" not in caplog.text  # no notice when nothing is transparent
    with pytest.raises(ValueError, match="background must be"):
        parse_background("mauve")


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "1", "LA", "PA"])
def test_other_modes_read_as_rgb(tmp_path, mode):
    rgb = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    im = rgb.convert(mode) if mode != "PA" else rgb.convert("P").convert("PA")
    path = tmp_path / ("x.tif" if mode in ("CMYK", "PA", "LA") else "x.png")
    im.save(path)
    x = load_image(path)
    assert x.shape == (1, 3, 8, 8) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1


def test_animated_images_use_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    x = load_image(path)
    assert x[0, 0].mean() > 0.9 and x[0, 2].mean() < 0.1


def test_fit_size():
    assert fit_size(64, 64, 64, 16) is None  # native
    assert fit_size(80, 64, 64, 16) is None  # close enough and takes the model's sides
    assert fit_size(256, 256, 64, 16) == (64, 64)
    assert fit_size(1000, 1000, 64, 16) == (64, 64)
    assert fit_size(2000, 1000, 512, 64) == (704, 384)  # aspect kept, sides rounded to 64
    assert fit_size(1000, 500, 512, 64) == (1024, 512)  # near native: only rounded
    assert fit_size(1, 1, 32, 8) == (32, 32)
    assert fit_size(70, 64, 64, 16) == (64, 64)  # close in size but a side the model cannot take


def test_resize_keeps_range_and_size():
    x = torch.rand(1, 3, 40, 30)
    y = resize(x, 20, 15)
    assert y.shape == (1, 3, 20, 15) and 0 <= y.min() and y.max() <= 1
    assert resize(x, 40, 30) is x


def test_save_image_is_atomic(tmp_path):
    img = Image.new("RGB", (4, 4), (1, 2, 3))
    target = tmp_path / "out.png"
    target.write_bytes(b"previous")

    class Boom(Exception):
        pass

    def fail(*a, **k):
        raise Boom

    bad = Image.new("RGB", (4, 4))
    bad.save = fail
    with pytest.raises(Boom):
        save_image(bad, target)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    save_image(img, target)
    assert Image.open(target).getpixel((0, 0)) == (1, 2, 3)
