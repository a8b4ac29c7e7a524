"""Tight Inversion: inversions conditioned on the image itself through an IP-Adapter (DDIM, DDPM,
LEDITS++, ReNoise), recorded in the Inversion and read again by its edits."""

import pytest
import torch

import engine
from engine.editing import Inversion
from engine.tiny import make_tiny_ip_adapter

IMAGE = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
STEPS = dict(ddim=dict(steps=4), ddpm=dict(steps=4, guidance_scale=3.0), renoise=dict(steps=4, renoise_steps=1),
             **{"ledits++": dict(steps=4, skip=0.0, seed=0)})


@pytest.fixture(scope="module")
def pipe(tiny_sd15_dir, tmp_path_factory):
    p = engine.load(tiny_sd15_dir)
    p.load_ip_adapter(make_tiny_ip_adapter(tmp_path_factory.mktemp("ip"), p.unet, "plus"))
    return p


@pytest.mark.parametrize("method", ["ddim", "ddpm", "ledits++", "renoise"])
def test_image_condition_changes_the_inversion_and_scale_zero_does_not(pipe, method):
    kw = dict(method=method, progress=False, **STEPS[method])
    plain = pipe.invert(IMAGE, "a cat", **kw)
    zero = pipe.invert(IMAGE, "a cat", image_condition=True, image_scale=0.0, **kw)
    tight = pipe.invert(IMAGE, "a cat", image_condition=True, image_scale=0.8, **kw)
    torch.testing.assert_close(zero.latents, plain.latents, rtol=0, atol=0)
    if plain.noise is not None:
        torch.testing.assert_close(zero.noise, plain.noise, rtol=0, atol=0)
    moved = tight.noise if method in ("ddpm", "ledits++") else tight.latents
    ref = plain.noise if method in ("ddpm", "ledits++") else plain.latents
    assert (moved - ref).abs().max() > 1e-3
    assert tight.settings["image_scale"] == 0.8 and tight.image_prompt().scale == 0.8
    assert plain.image_prompt() is None


def test_edits_read_the_image_again(pipe, tmp_path):
    """An edit-friendly DDPM inversion reconstructs exactly only when its replay reads what the
    inversion read: the image at the same scale."""
    inv = pipe.invert(IMAGE, "a cat", method="ddpm", image_condition=True, image_scale=0.8, steps=4,
                      guidance_scale=3.0, progress=False)
    x0 = pipe.decode(inv.x0)
    same = pipe.reconstruct(inv, output_type="pt")
    other = pipe.edit(inv, "ddpm", None, image_scale=0.2, output_type="pt", progress=False)
    assert (same - x0).abs().max() <= 1e-3
    assert (other - x0).abs().max() > 1e-2
    path = inv.save(tmp_path / "tight.safetensors")
    back = Inversion.load(path)
    torch.testing.assert_close(back.image_prompt().cond, inv.image_prompt().cond, rtol=0, atol=0)
    torch.testing.assert_close(pipe.reconstruct(back, output_type="pt"), same, rtol=0, atol=0)
    # Prompt-to-Prompt and LEDITS++ edits of image-conditioned inversions run through the same rows
    p2p = pipe.edit(inv, "p2p", "a dog", output_type="pt", progress=False)
    assert p2p.shape == same.shape
    led = pipe.invert(IMAGE, "", method="ledits++", image_condition=True, steps=4, skip=0.0, seed=0, progress=False)
    edits = [pipe.edit(led, "ledits++", "a dog", image_scale=s, output_type="pt", progress=False) for s in (1.0, 0.0)]
    assert (edits[0] - edits[1]).abs().max() > 1e-3


def test_tight_and_plain_inversions_share_calls(pipe):
    reqs = [dict(image=IMAGE, prompt="a cat", method="ddim", steps=4, image_condition=True),
            dict(image=IMAGE, prompt="a cat", method="ddim", steps=4)]
    alone = [pipe.invert_many([r], batch_invariant=True)[0] for r in reqs]
    both = pipe.invert_many(reqs, batch_invariant=True)
    assert pipe.last_loop.calls == 4
    for a, b in zip(alone, both):
        torch.testing.assert_close(b.latents, a.latents, rtol=0, atol=0)


def test_errors(pipe):
    with pytest.raises(ValueError, match="takes no image condition"):
        pipe.invert(IMAGE, "a cat", method="pix2pix-zero", image_condition=True, steps=2, progress=False)
    with pytest.raises(ValueError, match="set image_condition=True"):
        pipe.invert(IMAGE, "a cat", image_condition=False, image_scale=0.5, steps=2, progress=False)
    plain = pipe.invert(IMAGE, "a cat", steps=2, progress=False)
    with pytest.raises(ValueError, match="made with image_condition=True"):
        pipe.edit(plain, "ddim", "a dog", image_scale=0.5, progress=False)
    tight = pipe.invert(IMAGE, "a cat", steps=2, image_condition=True, progress=False)
    with pytest.raises(ValueError, match="takes no image condition"):
        pipe.edit(tight, "masactrl", "a dog", image_scale=0.5, progress=False)
    for bad in (-0.5, float("nan"), "much"):
        with pytest.raises(ValueError, match="must be a finite number 0 or more"):
            pipe.edit(tight, "ddim", "a dog", image_scale=bad, progress=False)
    with pytest.raises(ValueError, match="must be a finite number 0 or more"):
        pipe.invert(IMAGE, "a cat", steps=2, image_scale=-1.0, progress=False)
