"""TKG-DM initial noise (engine.sampling.chroma) against the paper's formulas, and the matte."""

import math
import weakref

import numpy as np
import pytest
import torch

from engine.matte import chroma_matte, key_rgb
from engine.sampling.chroma import channel_mean_shift, gaussian_mask, key_direction, shift_channel, tkg_noise


def _paper_shift(channel: torch.Tensor, target_shift=0.11):
    """The paper's loop, written out: delta += 0.01 until the positive ratio rose by target_shift."""
    ratio = lambda t: (t > 0).float().mean()  # noqa: E731
    target = ratio(channel) + target_shift
    delta = 0.0
    while ratio(channel + delta) < target:
        delta += 0.01
    return channel + delta, delta


def test_channel_shift_is_the_papers_loop():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=g)
    out = channel_mean_shift(z, (0, 1, 1, 0))
    for b in range(2):
        for c in (1, 2):
            want, delta = _paper_shift(z[b, c])
            assert torch.equal(out[b, c], want) and delta > 0
            assert (out[b, c] > 0).float().mean() >= (z[b, c] > 0).float().mean() + 0.11
        for c in (0, 3):
            assert torch.equal(out[b, c], z[b, c])


def test_negative_and_partial_directions_mirror_the_rule():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(16, 16, generator=g)
    down = shift_channel(z, -1.0)
    want, _ = _paper_shift(-z)
    assert torch.equal(down, -want)
    half = channel_mean_shift(z[None, None], [0.5])[0, 0]
    torch.testing.assert_close(half, _paper_shift(z, 0.055)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="latent channels"):
        channel_mean_shift(z[None, None], [1, 1])
    for bad in ([1.5], ["up"], [float("nan")]):
        with pytest.raises(ValueError, match=r"weights in \[-1, 1\]"):
            channel_mean_shift(z[None, None], bad)
    with pytest.raises(ValueError, match="smaller shift"):
        shift_channel(torch.ones(4, 4), 1.0)


def test_gaussian_mask_formula():
    m = gaussian_mask(9, 9, std=0.5)
    assert m[4, 4] == 1.0
    torch.testing.assert_close(m[0, 0], torch.tensor(math.exp(-(1 + 1) / (2 * 0.25))), rtol=1e-6, atol=0)
    torch.testing.assert_close(m[4, 0], torch.tensor(math.exp(-1 / (2 * 0.25))), rtol=1e-6, atol=0)
    moved = gaussian_mask(9, 9, std=(1.0, 0.25), center=(0.5, -0.5))
    y, x = torch.meshgrid(torch.linspace(-1, 1, 9), torch.linspace(-1, 1, 9), indexing="ij")
    want = torch.exp(-((x - 0.5) ** 2 / 2 + (y + 0.5) ** 2 / (2 * 0.0625)))
    torch.testing.assert_close(moved, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="positive"):
        gaussian_mask(4, 4, std=0)


def test_tkg_noise_blends_original_and_shifted():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 8, 8, generator=g)
    G = gaussian_mask(8, 8)
    want = G * z + (1 - G) * channel_mean_shift(z, (0, 1, 1, 0))
    torch.testing.assert_close(tkg_noise(z, (0, 1, 1, 0)), want, rtol=0, atol=0)


# ---- the matte ---------------------------------------------------------------------------------


def _keyed_scene():
    """A red square on a generated-looking green (not pure key green), with a soft edge column."""
    img = torch.zeros(1, 3, 32, 32)
    img[0] = torch.tensor([0.16, 0.65, 0.24])[:, None, None]
    img[0, :, 8:24, 8:24] = torch.tensor([0.85, 0.14, 0.14])[:, None, None]
    img[0, :, 8:24, 24] = (0.5 * torch.tensor([0.85, 0.14, 0.14]) + 0.5 * torch.tensor([0.16, 0.65, 0.24]))[:, None]
    return img


def test_matte_keys_out_the_background_and_keeps_the_object():
    rgba = chroma_matte(_keyed_scene(), "green")
    a = rgba[0, 3]
    assert a[:8].max() == 0 and a[:, :8].max() == 0  # background: transparent
    assert a[8:24, 8:24].min() == 1  # object: opaque
    assert 0 < a[12, 24] < 1  # the mixed edge: partial
    torch.testing.assert_close(rgba[0, :3, 12, 12], torch.tensor([0.85, 0.14, 0.14]), rtol=0, atol=1e-6)
    # the edge pixel is unmixed: the key taken out, its colour moves from the mix towards the object's
    edge, mix = rgba[0, :3, 12, 24], _keyed_scene()[0, :, 12, 24]
    assert edge[1] < mix[1] and edge[0] > mix[0]


def test_key_names_and_errors():
    assert key_rgb("green") == (0.0, 177 / 255, 64 / 255)
    assert key_rgb((255, 0, 0)) == (1.0, 0.0, 0.0)
    for bad in ("purple", (1, 2), (0, 0, 300)):
        with pytest.raises(ValueError, match="chroma key"):
            key_rgb(bad)


# ---- through the pipeline ----------------------------------------------------------------------


def test_generate_with_a_chroma_key(sd15_pipe):
    kw = dict(steps=2, guidance_scale=1.0, seed=3, progress=False, height=32, width=32)
    plain = sd15_pipe.generate("a cat", output_type="pt", **kw)
    keyed = sd15_pipe.generate("a cat", output_type="pt", chroma_key="green", **kw)
    assert not torch.equal(plain, keyed)
    seen = []
    sd15_pipe.generate("a cat", output_type="pt", chroma_key="green", callback=lambda d: seen.append(d["x"].clone())
                       if d["i"] == 0 else None, **kw)
    rgba = sd15_pipe.generate("a cat", output_type="pil", chroma_key="green", alpha=True, **kw)[0]
    assert rgba.mode == "RGBA" and np.asarray(rgba).shape == (32, 32, 4)
    assert sd15_pipe.chroma_direction("green") == [0.0, 1.0, 1.0, 0.0]  # SD's VAE: the paper's channels
    with pytest.raises(ValueError, match="chroma_key"):
        sd15_pipe.generate("a cat", alpha=True, **kw)


# ---- the key's direction, measured on a VAE -----------------------------------------------------

# Channel means of solid colours, approximately those of the shapes-v2 VAE (rounded; the key
# (0, 0.7, 0.25) stands for broadcast green): green and black share every channel's sign and
# differ most on channel 2, brightness. The last four are made up for the other branches.
_LATENTS = {(0.0, 0.0, 0.0): (-0.72, 0.8, -1.27, 0.69), (0.5, 0.5, 0.5): (0.11, 0.28, 0.06, 0.34),
            (1.0, 1.0, 1.0): (0.83, -1.17, 1.4, -1.06), (0.0, 0.7, 0.25): (-0.9, 0.94, -0.87, 0.89),
            (0.95, 0.95, 0.95): (0.8, -1.1, 1.3, -1.0), (0.5, 0.6, 0.7): (0.05, 0.1, 0.03, 0.2),
            (0.95, 0.9, 0.6): (0.9, -0.8, 1.0, -1.2), (0.2, 0.4, 0.9): (0.0, 0.0, 0.0, 0.0)}


def _encode(seen):
    def encode(image):  # [1, 3, s, s] -> [1, 4, s/8, s/8], the colour's latent everywhere
        assert image.shape == (1, 3, 16, 16) and torch.equal(image, image[:, :, :1, :1].expand_as(image))
        rgb = tuple(round(float(v), 4) for v in image[0, :, 0, 0])
        seen.append(rgb)
        return torch.tensor(_LATENTS[rgb]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    return encode


def test_key_direction_leaves_unshifted_the_channels_where_its_nearest_neutral_reaches_as_far(caplog):
    seen = []
    d = key_direction(_encode(seen), (0.0, 0.7, 0.25), size=16)
    # nearest neutral: black, which lies beyond green on channel 2 -> channel 2 unshifted
    torch.testing.assert_close(torch.tensor(d), torch.tensor([-0.9 / 0.94, 1.0, 0.0, 0.89 / 0.94]),
                               rtol=1e-6, atol=1e-6)
    assert seen == [(0.0, 0.7, 0.25), (0.0, 0.0, 0.0), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)]
    # a neutral key is on the black-white axis itself: its own latent, no neutral measured
    seen.clear()
    d = key_direction(_encode(seen), (0.95, 0.95, 0.95), size=16)
    assert seen == [(0.95, 0.95, 0.95)]
    torch.testing.assert_close(torch.tensor(d), torch.tensor([0.8, -1.1, 1.3, -1.0]) / 1.3, rtol=1e-6, atol=1e-6)
    # a pale blue whose nearest neutral (gray) reaches further on every channel: no channel
    # separates them, so the key's own latent is the direction (channel 2 under the 0.2 floor)
    with caplog.at_level("WARNING", logger="engine.sampling.chroma"):
        d = key_direction(_encode([]), (0.5, 0.6, 0.7), size=16)
    torch.testing.assert_close(torch.tensor(d), torch.tensor([0.25, 0.5, 0.0, 1.0]), rtol=1e-6, atol=1e-6)
    assert "may come out gray" in caplog.text
    # a cream whose nearest neutral is white: white lies further out on channels 1 and 2
    d = key_direction(_encode([]), (0.95, 0.9, 0.6), size=16)
    torch.testing.assert_close(torch.tensor(d), torch.tensor([0.75, 0.0, 0.0, -1.0]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chroma_direction="):  # a key at the noise's centre
        key_direction(_encode([]), (0.2, 0.4, 0.9), size=16)


def test_pipeline_measures_a_key_once_and_keeps_the_papers_green_for_sd(sd15_pipe, monkeypatch):
    calls = []
    encode = sd15_pipe.encode_image
    monkeypatch.setattr(sd15_pipe, "_chroma_directions", weakref.WeakKeyDictionary())  # restored after
    monkeypatch.setattr(sd15_pipe, "encode_image", lambda *a, **k: calls.append(1) or encode(*a, **k))
    first = sd15_pipe.chroma_direction("blue")
    assert len(calls) == 4  # the key and black, gray, white
    first[0] = 99.0  # the caller's copy
    again = sd15_pipe.chroma_direction((0, 71, 187))  # blue by its RGB: the same colour, measured once
    assert len(calls) == 4 and again[0] != 99.0 and len(again) == 4
    # broadcast green by name or RGB: the paper's channels 1 and 2, nothing measured
    assert sd15_pipe.chroma_direction((0, 177, 64)) == sd15_pipe.chroma_direction("green") == [0.0, 1.0, 1.0, 0.0]
    assert len(calls) == 4
