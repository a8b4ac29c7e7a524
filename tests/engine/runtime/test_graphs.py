"""CUDA-graph runner: cache keys, static-buffer plumbing ("fake" capture), eager fallback.

The "fake" mode runs the captured body through the same static buffers as a real capture,
eagerly, so on CPU it checks everything but the capture itself: results must equal the
plain `engine.sampling.sample` loop bit for bit. Real capture is tested on CUDA only.
"""

import logging

import pytest
import torch

import engine
from engine.models.attention import AttentionPlan, CrossMix
from engine.runtime import graphs
from engine.runtime.graphs import GraphRunner
from engine.runtime.loop import GuidedUNet, sample_graphed
from engine.runtime.trees import flatten, output_indices, unflatten
from engine.sampling import make_sampler, sample

SIZE = 32  # latent 16x16


def _latents(pipe, b=2, seed=0):
    h = SIZE // pipe.vae_scale_factor
    return torch.randn(b, 4, h, h, generator=torch.Generator().manual_seed(seed))


def _plan(b=4, layers=(0, 1), with_store=True):
    rows = torch.tensor([0, 1, 0, 1][:b])
    store = {1: torch.zeros(b, 16, 77)} if with_store else {}
    mix = CrossMix(q_from=rows, k_from=rows, alpha=torch.rand(b, 77), own=(2, 4))
    return AttentionPlan(self_inject={"q_from": rows, "k_from": rows}, layers=frozenset(layers), store=store,
                         cross_mix=mix)


# ---- trees and keys -------------------------------------------------------------------------


def test_flatten_roundtrip_and_output_marks():
    plan = _plan()
    leaves, spec = flatten(dict(plan=plan, scale=torch.tensor(7.5), n=3))
    back = unflatten(spec, leaves)
    assert back["n"] == 3 and back["plan"].layers == plan.layers and back["plan"].cross_mix.own == (2, 4)
    assert back["plan"].store[1] is plan.store[1] and back["plan"].cross_mix.alpha is plan.cross_mix.alpha
    marked = [leaves[i] for i in output_indices(spec)]
    assert len(marked) == 1 and marked[0] is plan.store[1]  # only the map store is written by a step


def test_key_ignores_values_but_not_structure():
    key = lambda p, **kw: GraphRunner.key("step", dict(x=torch.zeros(2, 4, 8, 8), **kw), dict(plan=p))  # noqa: E731
    base = key(_plan())
    assert key(_plan()) == base  # new values (other alpha, other rows): same graph
    assert key(_plan(layers=(0, 2))) != base  # another layer set
    assert key(_plan(with_store=False)) != base  # no map store
    assert key(_plan(b=2)) != base  # another batch
    assert GraphRunner.key("step", dict(x=torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16)), dict(plan=_plan())) != base


def test_key_follows_sampler_and_guidance_structure(sd15_pipe):
    def key(sampler, steps, scale=7.5, size=SIZE, rescale=0.0):
        g = sd15_pipe.guidance("x", guidance_scale=scale, height=size, width=size, guidance_rescale=rescale)
        m = GuidedUNet.from_guidance(sd15_pipe.unet, g)
        smp = make_sampler(sampler, sd15_pipe.schedule, steps)
        h = size // 2
        return GraphRunner.key("step", dict(x=torch.zeros(1, 4, h, h), sampler=smp), m.consts())

    base = key("ddim", 10)
    assert key("ddim", 10, scale=3.0) == base  # the scale is a static input, not a constant
    assert key("euler", 10) != base and key("ddim", 20) != base  # sampler class / tables
    assert key("ddim", 10, size=64) != base  # resolution
    assert key("ddim", 10, scale=1.0) != base  # no guidance: another forward
    assert key("ddim", 10, rescale=0.5) != key("ddim", 10, rescale=0.0)


# ---- fake capture: static buffers, eager body -----------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_sde", "ddpm"])
@pytest.mark.parametrize("whole_loop", [False, True])
def test_fake_capture_is_bit_identical_to_the_plain_loop(sd15_pipe, sampler, whole_loop):
    g = sd15_pipe.guidance(["a red circle", "a blue square"], guidance_scale=6.0, height=SIZE, width=SIZE)
    smp = make_sampler(sampler, sd15_pipe.schedule, 3)
    x = _latents(sd15_pipe) * smp.init_noise_sigma
    want = sample(sd15_pipe.model_fn(g), x.clone(), smp, generator=torch.Generator().manual_seed(1), progress=False)
    runner = GraphRunner(mode="fake")
    got = sample_graphed(runner, GuidedUNet.from_guidance(sd15_pipe.unet, g), x.clone(), smp,
                         generator=torch.Generator().manual_seed(1), progress=False, whole_loop=whole_loop)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert 1 <= len(runner.cache) <= 2  # DDPM's last step draws no noise: a second graph


def test_fake_capture_sdxl_callback_and_reuse_across_prompts(sdxl_pipe):
    runner = GraphRunner(mode="fake")
    smp = make_sampler("dpmpp_2m", sdxl_pipe.schedule, 4)
    for prompt, scale in (("a cat", 5.0), ("a dog on a hill", 8.0)):
        g = sdxl_pipe.guidance(prompt, guidance_scale=scale, height=SIZE, width=SIZE, num_images=2, guidance_rescale=0.3)
        seen_plain, seen_graph = [], []
        want = sample(sdxl_pipe.model_fn(g), _latents(sdxl_pipe), smp, progress=False, callback=lambda d: seen_plain.append(d))
        got = sample_graphed(runner, GuidedUNet.from_guidance(sdxl_pipe.unet, g), _latents(sdxl_pipe), smp, progress=False,
                             callback=lambda d: seen_graph.append(d))
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        for a, b in zip(seen_plain, seen_graph):
            assert a["i"] == b["i"]
            torch.testing.assert_close(b["x"], a["x"], atol=0, rtol=0)
            torch.testing.assert_close(b["x0"], a["x0"], atol=0, rtol=0)
    assert len(runner.cache) == 1  # new prompt and scale: the same graph, new static inputs


def test_fake_capture_copies_attention_maps_back(sd15_pipe):
    """A plan's map store is written into the static buffer and handed back after each run."""
    layer = next(l for l in sd15_pipe.unet.attn_layers if l.cross)
    h = SIZE // 2
    n_q = (h // layer.scale) ** 2
    g = sd15_pipe.guidance("a cat", guidance_scale=1.0, height=SIZE, width=SIZE, num_images=2)
    x, t = _latents(sd15_pipe), torch.tensor([900, 500])
    want = torch.zeros(2, n_q, 77)
    out_want = sd15_pipe.unet(x, t, g.cond.context, plan=AttentionPlan(store={layer.index: want}))
    got = torch.zeros(2, n_q, 77)
    model = GuidedUNet.from_guidance(sd15_pipe.unet, g, plan=AttentionPlan(store={layer.index: got}))
    runner = GraphRunner(mode="fake")
    out = runner.run("fwd", lambda inp, c: model.forward(inp["x"], inp["t"], c), dict(x=x, t=t), model.consts())
    torch.testing.assert_close(out, out_want, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert want.abs().sum() > 0


# ---- eager fallback -------------------------------------------------------------------------


def test_cpu_falls_back_to_eager_and_logs_once(sd15_pipe, caplog):
    graphs._LOGGED.clear()
    kw = dict(steps=3, guidance_scale=7.0, height=SIZE, width=SIZE, output_type="pt", progress=False)
    lat = _latents(sd15_pipe, 1)
    want = sd15_pipe.generate("a cat", latents=lat.clone(), **kw)
    with caplog.at_level(logging.WARNING, logger="overpaint"):
        got = sd15_pipe.generate("a cat", latents=lat.clone(), cuda_graphs=True, **kw)
        again = sd15_pipe.generate("a dog", latents=lat.clone(), cuda_graphs=True, **kw)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.isfinite(again).all()
    msgs = [r.getMessage() for r in caplog.records if "cuda graphs" in r.getMessage()]
    assert len(msgs) == 1 and "device is cpu" in msgs[0]


def test_too_many_structures_fall_back(sd15_pipe, caplog):
    graphs._LOGGED.clear()
    runner = GraphRunner(mode="fake", max_graphs=1)
    body = lambda inp, c: inp["x"] * 2  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="overpaint"):
        runner.run("f", body, dict(x=torch.ones(2)))
        out = runner.run("f", body, dict(x=torch.ones(3)))
    torch.testing.assert_close(out, torch.full((3,), 2.0))
    assert len(runner.cache) == 1 and any("dynamic shapes" in r.getMessage() for r in caplog.records)


def test_bad_mode():
    with pytest.raises(ValueError, match="graph mode"):
        GraphRunner(mode="sometimes")


# ---- real capture (CUDA only) ---------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_sde"])
@pytest.mark.parametrize("whole_loop", [False, True])
def test_cuda_capture_matches_eager(tiny_sdxl_dir, sampler, whole_loop):
    pipe = engine.load(tiny_sdxl_dir, device="cuda")
    g = pipe.guidance("a cat", guidance_scale=5.0, height=SIZE, width=SIZE, num_images=2)
    smp = make_sampler(sampler, pipe.schedule, 4, device="cuda")
    x = _latents(pipe).cuda()
    want = sample(pipe.model_fn(g), x.clone(), smp, generator=torch.Generator().manual_seed(0), progress=False)
    runner = GraphRunner(mode="cuda")
    model = GuidedUNet.from_guidance(pipe.unet, g)
    for _ in range(2):  # the second call replays
        got = sample_graphed(runner, model, x.clone(), smp, generator=torch.Generator().manual_seed(0),
                             progress=False, whole_loop=whole_loop)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert runner.captures == 1 and all(e is not None and e.graph is not None for e in runner.cache.values())


@cuda
def test_cuda_generate_with_graphs(tiny_sd15_dir):
    pipe = engine.load(tiny_sd15_dir, device="cuda", dtype="bf16")
    kw = dict(steps=6, guidance_scale=7.0, height=SIZE, width=SIZE, output_type="pt", progress=False, seed=0)
    want = pipe.generate("a cat", **kw)
    got = pipe.generate("a cat", cuda_graphs=True, **kw)
    other = pipe.generate("a dog", cuda_graphs=True, **{**kw, "guidance_scale": 3.0})
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    assert torch.isfinite(other).all() and pipe.graphs.captures == 1
