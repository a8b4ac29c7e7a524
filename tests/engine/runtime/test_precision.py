"""Half precision on CPU (bf16): the whole path runs, latents stay float32 in the loop, and
results stay close to float32. (fp16 matmuls on CPU are slow or missing: bf16 stands in.)"""

import pytest
import torch

import engine
from engine.sampling import dpmpp_2m_step, euler_step, flow_euler_step, init_dpm_state

SIZE = 32


@pytest.fixture(scope="module")
def image():
    """A smooth random 32x32 RGB image [1, 3, 32, 32] in [0, 1]."""
    low = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pair(request, tiny_sd15_dir, tiny_sdxl_dir):
    folder = tiny_sd15_dir if request.param == "sd15" else tiny_sdxl_dir
    return engine.load(folder), engine.load(folder, dtype="bf16")


@pytest.mark.parametrize("sampler", [None, "euler", "dpmpp_2m_sde"])
def test_bf16_generation_is_close_to_fp32(pair, sampler):
    fp32, bf16 = pair
    assert bf16.unet.dtype == torch.bfloat16 and bf16.text_encoders[0].dtype == torch.bfloat16
    kw = dict(steps=4, seed=0, height=SIZE, width=SIZE, output_type="pt", progress=False, sampler=sampler)
    want = fp32.generate(["a red circle", "a blue square"], **kw)
    got = bf16.generate(["a red circle", "a blue square"], **kw)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=0.06, rtol=0)  # images in [0, 1]; bf16 has 8 mantissa bits


def test_bf16_loop_keeps_float32_latents(pair):
    _, bf16 = pair
    seen = []
    bf16.generate("x", steps=2, seed=0, height=SIZE, width=SIZE, output_type="pt", progress=False,
                  callback=lambda d: seen.append(d["x"].dtype))
    assert seen == [torch.float32, torch.float32]


@pytest.mark.parametrize("method,target,kw", [
    ("ddim", "a dog", {}), ("ddpm", "a dog", {}), ("p2p", "a dog", {}), ("ledits++", None, {"editing_prompt": "dog"}),
])
def test_bf16_editing_runs(pair, image, method, target, kw):
    _, bf16 = pair
    inv = bf16.invert(image, "a cat", method="ddim" if method == "p2p" else method, steps=3, progress=False)
    out = bf16.edit(inv, method, target, output_type="pt", progress=False, **kw)
    assert out.shape == (1, 3, SIZE, SIZE) and torch.isfinite(out).all()


def test_sampler_steps_keep_the_wider_dtype():
    x = torch.randn(2, 4, 8, 8)
    out = torch.randn(2, 4, 8, 8)
    s, s_next = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.5])
    for dx, do, want in ((torch.float32, torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                         (torch.float32, torch.float32, torch.float32)):
        assert euler_step(x.to(dx), out.to(do), s, s_next)[0].dtype == want
        assert flow_euler_step(x.to(dx), out.to(do), s / 4, s_next / 4)[0].dtype == want
        xd = x.to(dx)
        assert dpmpp_2m_step(xd, out.to(do), s, s_next, init_dpm_state(xd))[0].dtype == want
    # a float32 latent with a bf16 model output: the update itself is done in float32
    got = euler_step(x, out.bfloat16(), s, s_next)[0]
    want = euler_step(x, out.bfloat16().float(), s, s_next)[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_sdxl_vae_stays_fp32_in_fp16_unless_fixed(tiny_sdxl_dir, tiny_sd15_dir):
    """The loader's rule (diffusers' force_upcast): SDXL + fp16 -> fp32 VAE; bf16 keeps its range."""
    assert engine.load(tiny_sdxl_dir, dtype="fp16").vae_dtype == torch.float32
    assert engine.load(tiny_sdxl_dir, dtype="bf16").vae_dtype == torch.bfloat16
    assert engine.load(tiny_sd15_dir, dtype="fp16").vae_dtype == torch.float16
