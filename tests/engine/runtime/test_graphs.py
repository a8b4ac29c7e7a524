"""CUDA-graph runner: cache keys, static-buffer plumbing ("fake" capture), eager fallback.

The "fake" mode runs the captured body (the Denoiser's model call) through the same static
buffers as a real capture, eagerly, so on CPU it checks everything but the capture itself:
generation, inversions and edits -- alone or batched in the one loop -- must equal the eager
loop bit for bit. Real capture is tested on CUDA only.
"""

import logging

import pytest
import torch

import engine
from engine.models.attention import AttentionPlan, CrossMix
from engine.runtime import graphs
from engine.runtime.graphs import GraphRunner
from engine.runtime.trees import flatten, output_indices, unflatten
from engine.step import run

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


def _program(pipe, prompt="x", scale=7.5, size=SIZE, sampler="ddim", steps=3, b=1, seed=0, **kw):
    return pipe.generation_program(prompt, steps=steps, guidance_scale=scale, height=size, width=size, num_images=b,
                                   sampler=sampler, seed=seed, **kw)


def _model_key(pipe, prog):
    x, t = prog.model_input()
    return GraphRunner.key(("model", pipe.denoiser.key), dict(x=x, t=t), dict(rows=prog.cond(), plan=prog.plan()))


def test_key_follows_rows_and_shapes_not_values(sd15_pipe):
    base = _model_key(sd15_pipe, _program(sd15_pipe))
    assert _model_key(sd15_pipe, _program(sd15_pipe, "a dog on a hill", scale=3.0)) == base  # values, not structure
    assert _model_key(sd15_pipe, _program(sd15_pipe, sampler="ddpm", steps=7)) == base  # the sampler is outside the call
    assert _model_key(sd15_pipe, _program(sd15_pipe, size=64)) != base  # resolution
    assert _model_key(sd15_pipe, _program(sd15_pipe, scale=1.0)) != base  # no guidance: half the rows
    assert _model_key(sd15_pipe, _program(sd15_pipe, b=2)) != base


# ---- fake capture: static buffers, eager body -----------------------------------------------


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "dpmpp_2m_sde", "ddpm"])
def test_fake_capture_is_bit_identical_to_eager(sd15_pipe, sampler):
    kw = dict(sampler=sampler, b=2, scale=6.0)
    want = run([_program(sd15_pipe, ["a red circle", "a blue square"], **kw)], sd15_pipe.denoiser)[0]
    runner = GraphRunner(mode="fake")
    got = run([_program(sd15_pipe, ["a red circle", "a blue square"], **kw)], sd15_pipe.denoiser.with_runner(runner))[0]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(runner.cache) == 1 and next(iter(runner.cache.values())).replays == 3


def test_fake_capture_sdxl_callback_and_reuse_across_prompts(sdxl_pipe):
    runner = GraphRunner(mode="fake")
    for prompt, scale in (("a cat", 5.0), ("a dog on a hill", 8.0)):
        seen_plain, seen_graph = [], []
        kw = dict(sampler="dpmpp_2m", steps=4, b=2, guidance_rescale=0.3)
        want = run([_program(sdxl_pipe, prompt, scale, callback=seen_plain.append, **kw)], sdxl_pipe.denoiser)[0]
        got = run([_program(sdxl_pipe, prompt, scale, callback=seen_graph.append, **kw)],
                  sdxl_pipe.denoiser.with_runner(runner))[0]
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
    rows = sd15_pipe.denoiser.condition(g.cond, SIZE, SIZE)
    x, t = _latents(sd15_pipe), torch.tensor([900, 500])
    want = torch.zeros(2, n_q, 77)
    out_want = sd15_pipe.denoiser(x, t, rows, AttentionPlan(store={layer.index: want}))
    got = torch.zeros(2, n_q, 77)
    out = sd15_pipe.denoiser.with_runner(GraphRunner(mode="fake"))(x, t, rows, AttentionPlan(store={layer.index: got}))
    torch.testing.assert_close(out, out_want, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert want.abs().sum() > 0


def _edit_requests(pipe, image):
    ddim = pipe.invert(image, "a red cat", method="ddim", steps=4, guidance_scale=1.0, progress=False)
    ddpm = pipe.invert(image, "a red cat", method="ddpm", steps=4, seed=1, progress=False)
    led = pipe.invert(image, "a red cat", method="ledits++", steps=4, seed=2, progress=False)
    return [
        dict(inv=ddim, method="p2p", target_prompt="a red dog", guidance_scale=3.0, local_blend_words=("cat", "dog")),
        dict(inv=ddpm, method="ddpm", target_prompt="a blue cat", guidance_scale=6.0),
        dict(inv=led, method="ledits++", editing_prompt=["dog", "hat"], edit_threshold=0.7),
        dict(prompt="a green square", steps=3, guidance_scale=5.0, height=SIZE * 2, width=SIZE * 2, seed=3),
        dict(inv=ddim, method="pnp", target_prompt="a blue cat", guidance_scale=3.0),  # feature injection
        dict(inv=ddim, method="masactrl", target_prompt="a blue cat", guidance_scale=3.0, start_step=1,
             mask_words=("cat", "cat")),  # key masks rewritten in place between steps
    ]


@pytest.mark.parametrize("together", [False, True])
def test_fake_capture_of_edits_and_inversions_is_bit_identical(sd15_pipe, image, together):
    """Every method's step runs through the static-buffer plumbing (P2P's blend maps and
    LEDITS++'s mask maps come back as graph outputs) with the eager results, alone or batched."""
    reqs = _edit_requests(sd15_pipe, image)
    runner = GraphRunner(mode="fake")
    kw = dict(output_type="pt")
    if together:
        want = sd15_pipe.edit_many(reqs, **kw)
        got = sd15_pipe.edit_many(reqs, cuda_graphs=runner, **kw)
    else:
        want = [sd15_pipe.edit_many([r], **kw)[0] for r in reqs]
        got = [sd15_pipe.edit_many([r], cuda_graphs=runner, **kw)[0] for r in reqs]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sum(e.replays for e in runner.cache.values()) > 0
    inv = [dict(image=image, prompt="a cat", method=m, steps=3, seed=0) for m in ("ddim", "ddpm", "ledits++")]
    eager, fake = sd15_pipe.invert_many(inv), sd15_pipe.invert_many(inv, cuda_graphs=GraphRunner(mode="fake"))
    for a, b in zip(fake, eager):
        torch.testing.assert_close(a.latents, b.latents, atol=0, rtol=0)
        if b.noise is not None:
            torch.testing.assert_close(a.noise, b.noise, atol=0, rtol=0)


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


def test_out_of_memory_during_capture_runs_eagerly_and_captures_again_later(monkeypatch):
    """An uncapturable step runs eagerly from then on; running out of memory while capturing is a
    passing shortage (a server under load): that call runs eagerly and a later one captures again,
    until a few shortages in a row make the key eager for good."""
    graphs._LOGGED.clear()
    runner = GraphRunner(mode="auto")
    monkeypatch.setattr(runner, "resolve", lambda leaves: "cuda")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    failure = [torch.OutOfMemoryError("CUDA out of memory (injected)")]
    attempts = []

    def pool():
        attempts.append(1)
        raise failure[0]

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", pool)
    body = lambda inp, c: inp["x"] * 2  # noqa: E731
    for i in range(graphs.MAX_SHORTAGES):
        torch.testing.assert_close(runner.run("f", body, dict(x=torch.ones(2))), torch.full((2,), 2.0))
        assert len(attempts) == i + 1  # every call tried to capture again
    assert list(runner.cache.values()) == [None]  # then eager for good
    runner = GraphRunner(mode="auto")
    monkeypatch.setattr(runner, "resolve", lambda leaves: "cuda")
    failure[0] = RuntimeError("operation not permitted when stream is capturing")
    torch.testing.assert_close(runner.run("f", body, dict(x=torch.ones(2))), torch.full((2,), 2.0))
    assert list(runner.cache.values()) == [None]  # an uncapturable step: eager from the first failure


def test_bad_mode():
    with pytest.raises(ValueError, match="graph mode"):
        GraphRunner(mode="sometimes")


# ---- real capture (CUDA only) ---------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")


@cuda
def test_cuda_capture_of_edits_matches_eager(tiny_sd15_dir, image):
    pipe = engine.load(tiny_sd15_dir, device="cuda")
    reqs = _edit_requests(pipe, image.cuda())
    want = pipe.edit_many(reqs, output_type="pt")
    runner = GraphRunner(mode="cuda")
    for _ in range(2):  # the second call replays
        got = pipe.edit_many(reqs, output_type="pt", cuda_graphs=runner)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert runner.captures >= 1 and all(e is not None and e.graph is not None for e in runner.cache.values())


@cuda
def test_cuda_generate_with_graphs(tiny_sd15_dir):
    pipe = engine.load(tiny_sd15_dir, device="cuda", dtype="bf16")
    kw = dict(steps=6, guidance_scale=7.0, height=SIZE, width=SIZE, output_type="pt", progress=False, seed=0)
    want = pipe.generate("a cat", **kw)
    got = pipe.generate("a cat", cuda_graphs=True, **kw)
    other = pipe.generate("a dog", cuda_graphs=True, **{**kw, "guidance_scale": 3.0})
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
    assert torch.isfinite(other).all() and pipe.graphs.captures == 1


@cuda
def test_edit_steps_make_no_host_syncs(tiny_sd15_dir, image):
    """Capturable step math: once built, P2P (with local blend), LEDITS++ (masks) and DDPM
    programs run their steps without a device-to-host sync."""
    from engine.step import Loop

    pipe = engine.load(tiny_sd15_dir, device="cuda")
    progs = [pipe._edit(dict(r)) for r in _edit_requests(pipe, image.cuda()) if "inv" in r]
    loop = Loop(pipe.denoiser)
    for p in progs:
        loop.add(p)
    loop.step()  # first step: lazy allocations, merged plans
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loop.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(p.done for p in progs)
