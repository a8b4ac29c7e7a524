"""engine.load(FLUX folder).generate against diffusers' FluxPipeline with the same weights and seeds."""

import pytest
import torch

import engine
from engine.flux import FluxPipeline

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pair(tiny_flux_dir, flux_pipe):
    from diffusers import FluxPipeline as Reference

    return flux_pipe, Reference.from_pretrained(tiny_flux_dir).to(torch.float32)


def _dev(pipe) -> bool:
    return pipe.transformer.config.guidance_embeds


def test_loads_as_flux(flux_pipe):
    assert isinstance(flux_pipe, FluxPipeline) and flux_pipe.arch == "flux"
    assert flux_pipe.latent_channels == 16 and flux_pipe.size_multiple == 4
    assert "FluxPipeline(" in repr(flux_pipe)


@pytest.mark.parametrize("true_cfg", [1.0, 2.5])
def test_generate_matches_diffusers(pair, true_cfg):
    ours, ref = pair
    kw = dict(height=32, width=24, num_inference_steps=4, max_sequence_length=16, output_type="pt",
              generator=torch.Generator().manual_seed(3))
    if true_cfg > 1:
        kw.update(true_cfg_scale=true_cfg, negative_prompt="blurry")
    if _dev(ours):
        kw["guidance_scale"] = 3.5
    want = ref(PROMPT, **kw).images  # [1, 3, H, W] in [0, 1]
    mine = dict(height=32, width=24, steps=4, seed=3, guidance_scale=true_cfg, output_type="pt", progress=False)
    if true_cfg > 1:
        mine["negative_prompt"] = "blurry"
    if _dev(ours):
        mine["embedded_guidance"] = 3.5
    got = ours.generate(PROMPT, **mine)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_rows_of_different_requests_share_calls(flux_pipe):
    """Two generations with different settings run through one model call per step and each
    equals the request run alone."""
    a = dict(prompt="a red circle", steps=3, seed=1, height=16, width=16)
    b = dict(prompt="a blue square", steps=3, seed=2, height=16, width=16, guidance_scale=2.0)
    if _dev(flux_pipe):
        b["embedded_guidance"] = 5.0
    together = flux_pipe.edit_many([a, b], output_type="pt")
    assert flux_pipe.last_loop.calls == 3
    for req, got in zip((a, b), together):
        alone = flux_pipe.edit_many([req], output_type="pt")[0]
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


def test_progress_and_callback(flux_pipe):
    seen = []
    flux_pipe.generate("a circle", steps=2, height=16, width=16, seed=0, progress=False,
                       callback=lambda d: seen.append((d["i"], tuple(d["x"].shape))))
    assert seen == [(0, (1, 16, 8, 8)), (1, (1, 16, 8, 8))]  # 16 px over the tiny VAE's factor 2


def test_bad_input_errors(flux_pipe):
    with pytest.raises(ValueError, match="multiples of 4"):
        flux_pipe.generate("x", height=18, width=16)
    with pytest.raises(ValueError, match="does not take chroma_key"):
        flux_pipe.generate("x", chroma_key="green", alpha=False, height=16, width=16)
    with pytest.raises(ValueError, match="T5 tokens but this model reads at most 15"):
        flux_pipe.generate("a very long prompt " * 5, height=16, width=16)
    if not _dev(flux_pipe):
        with pytest.raises(ValueError, match="no guidance embedding"):
            flux_pipe.generate("x", embedded_guidance=3.5, height=16, width=16)
    with pytest.raises(ValueError, match="runs on UNet"):
        flux_pipe.invert(torch.rand(1, 3, 16, 16), "x", method="ddim")


def test_offload_text_encoders_keeps_results(tiny_flux_dir):
    pipe = engine.load(tiny_flux_dir)
    before = pipe.encode_prompt("a red circle", guidance=False)[0]
    pipe.offload_text_encoders("cpu")
    after = pipe.encode_prompt("a red circle", guidance=False)[0]
    torch.testing.assert_close(after.context, before.context, rtol=0, atol=0)
    assert next(pipe.text_encoders[1].parameters()).device.type == "cpu"


def test_graph_runner_static_buffers_are_bit_identical(flux_pipe):
    """FLUX rows through the CUDA-graph runner's static-buffer plumbing ("fake" capture on CPU):
    a generation and an RF-Inversion edit as eager."""
    from engine.runtime.graphs import GraphRunner

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    inv = flux_pipe.invert(image, "a circle", method="rf-inversion", steps=3, progress=False)
    reqs = [dict(prompt="a red circle", steps=3, seed=0, height=16, width=16, guidance_scale=2.0),
            dict(inv=inv, method="rf-inversion", target_prompt="a blue circle")]
    eager = flux_pipe.edit_many(reqs, output_type="pt")
    faked = flux_pipe.edit_many(reqs, output_type="pt", cuda_graphs=GraphRunner(mode="fake"))
    for a, b in zip(eager, faked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
