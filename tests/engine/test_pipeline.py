"""engine.load(...).generate against diffusers' pipelines with the same weights and latents."""

import numpy as np
import pytest
import torch

import engine


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    return engine.load(tiny_sd15_dir), StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return engine.load(tiny_sdxl_dir), StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)


def _latents(pipe, b, size, seed=0):
    h = size // pipe.vae_scale_factor
    return torch.randn(b, 4, h, h, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture", ["sd15", "sdxl"])
def test_generate_matches_diffusers_ddim(fixture, request):
    ours, ref = request.getfixturevalue(fixture)
    size = 64
    lat = _latents(ours, 2, size)
    prompts = ["a red circle on the left", "a blue square"]
    kw = dict(num_inference_steps=10, guidance_scale=7.5, height=size, width=size, output_type="np")
    want = ref(prompts, latents=lat.clone(), **kw).images
    got = ours.generate(prompts, steps=10, guidance_scale=7.5, height=size, width=size, latents=lat.clone(),
                        output_type="np", progress=False)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4


def test_sdxl_turbo_euler_ancestral_matches_diffusers(tiny_turbo_dir):
    """SDXL-Turbo's recipe: Euler ancestral (trailing), no guidance, noise from the seed's generator."""
    from diffusers import StableDiffusionXLPipeline

    ours, ref = engine.load(tiny_turbo_dir), StableDiffusionXLPipeline.from_pretrained(tiny_turbo_dir)
    assert ours.default_sampler == "euler_ancestral"
    for steps in (1, 4):
        want = ref("a red circle", num_inference_steps=steps, guidance_scale=0.0, height=64, width=64,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
        got = ours.generate("a red circle", steps=steps, guidance_scale=0.0, height=64, width=64, seed=3,
                            output_type="np", progress=False)
        assert np.abs(got - want).max() <= 1e-4


def test_generate_with_negative_prompt_and_several_images(sd15):
    ours, ref = sd15
    lat = _latents(ours, 2, 64, seed=3)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, height=64, width=64, output_type="np")
    want = ref("a green triangle", negative_prompt="blurry", num_images_per_prompt=2, latents=lat.clone(), **kw).images
    got = ours.generate("a green triangle", "blurry", steps=4, guidance_scale=5.0, height=64, width=64,
                        num_images=2, latents=lat.clone(), output_type="np", progress=False)
    assert np.abs(got - want).max() <= 1e-4


def test_seed_is_reproducible_and_output_types(sd15):
    ours, _ = sd15
    a = ours.generate("x", steps=2, seed=7, height=32, width=32, output_type="pt", progress=False)
    b = ours.generate("x", steps=2, seed=7, height=32, width=32, output_type="pt", progress=False)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert a.shape == (1, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    pil = ours.generate("x", steps=1, seed=7, height=32, width=32, progress=False)
    assert pil[0].size == (32, 32)


def test_callback_and_no_guidance(sd15):
    ours, _ = sd15
    seen = []
    ours.generate("x", steps=3, guidance_scale=1.0, height=32, width=32, output_type="pt", progress=False,
                  callback=lambda d: seen.append(int(d["i"])))
    assert seen == [0, 1, 2]


@pytest.mark.parametrize("sampler", ["ddpm", "euler", "dpmpp_2m", "dpmpp_2m_sde"])
def test_other_samplers_run(sd15, sampler):
    ours, _ = sd15
    img = ours.generate("x", steps=3, seed=0, height=32, width=32, sampler=sampler, output_type="pt", progress=False)
    assert torch.isfinite(img).all()


def test_bad_input_errors(sd15):
    ours, _ = sd15
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.generate("x", steps=1, height=33, width=32, progress=False)
    with pytest.raises(ValueError, match="at most 75"):
        ours.generate("word " * 80, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"):
        ours.generate("x", steps=0, progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        ours.generate("x", steps=1, sampler="plms", progress=False)
    with pytest.raises(TypeError, match="prompt must be"):
        ours.generate(3, steps=1, progress=False)


def test_bad_requests_fail_before_any_work_with_one_line(sd15_pipe, image, tmp_path, monkeypatch):
    """Each of these once surfaced as Python's own error (ZeroDivisionError, IndexError, an
    unhashable list, an unexpected keyword), or only after every step had run."""
    pipe = sd15_pipe
    x = image[..., :32, :32]
    calls = []
    monkeypatch.setattr(type(pipe), "_run", lambda self, *a, **k: calls.append(1) or [])
    with pytest.raises(ValueError, match="unknown output_type 'PIL'"):
        pipe.generate("x", steps=3, output_type="PIL", progress=False)
    with pytest.raises(ValueError, match="empty list"):
        pipe.generate([], steps=1, progress=False)
    with pytest.raises(ValueError, match="empty list"):
        pipe.invert(x, [], progress=False)
    with pytest.raises(ValueError, match="2 prompts for 4 images"):
        pipe.invert(x.repeat(4, 1, 1, 1), ["a", "b"], progress=False)
    with pytest.raises(TypeError, match="method must be a string"):
        pipe.invert(x, "a", method=["ddim"], progress=False)
    with pytest.raises(ValueError, match="the 'ddim' inversion takes no 'skip'"):
        pipe.invert(x, "a", method="ddim", skip=0.3, progress=False)
    with pytest.raises(TypeError, match="edit takes an Inversion"):
        pipe.edit(42, "ddim", "a", progress=False)
    with pytest.raises(ValueError, match=r"values in \[0, 1\], got \[11.3, 239\].*x / 255"):
        pipe.invert(x * 255, "a", progress=False)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        pipe.invert(x * 2 - 1, "a", progress=False)
    assert not calls  # nothing ran
    monkeypatch.undo()
    inv = pipe.invert(x, None, steps=2, progress=False)  # None: the unconditional prompt
    path = inv.save(tmp_path / "inv.safetensors")
    torch.testing.assert_close(pipe.edit(str(path), "ddim", "a", output_type="pt", progress=False),
                               pipe.edit(inv, "ddim", "a", output_type="pt", progress=False), atol=0, rtol=0)


def test_encode_prompt_shapes(sdxl):
    ours, _ = sdxl
    cond, uncond = ours.encode_prompt(["a", "b"], num_images=3)
    assert cond.context.shape == (6, 77, 64) and cond.pooled.shape == (6, 32)
    assert torch.count_nonzero(uncond.context) == 0  # force_zeros_for_empty_prompt
