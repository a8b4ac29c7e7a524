"""The one loop: many programs of any methods share one model call per step, and each
request's result does not depend on what it was batched with."""

import pytest
import torch

from engine.step import Loop, run

SIZE = 32  # images 32x32: latents 16x16 on the tiny pipelines


@pytest.fixture(scope="module")
def small(image):
    return torch.nn.functional.interpolate(image, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def _mix(pipe, small):
    """P2P replace, P2P refine with local blend, LEDITS++ with two concepts, DDPM, DDIM, and a
    plain generation (the issue's mix)."""
    ddim = pipe.invert(small, "a red cat", method="ddim", steps=5, progress=False)
    ddpm = pipe.invert(small, "a red cat", method="ddpm", steps=5, seed=1, progress=False)
    led = pipe.invert(small, "a red cat", method="ledits++", steps=5, seed=2, progress=False)
    return [
        dict(inv=ddim, method="p2p", target_prompt="a red dog", guidance_scale=3.0),
        dict(inv=ddim, method="p2p", target_prompt="a red fat cat", guidance_scale=3.0,
             local_blend_words=("cat", "fat cat")),
        dict(inv=led, method="ledits++", editing_prompt=["dog", "hat"], edit_threshold=0.7),
        dict(inv=ddpm, method="ddpm", target_prompt="a blue cat", guidance_scale=6.0),
        dict(inv=ddim, method="ddim", target_prompt="a blue cat", guidance_scale=4.0),
        dict(prompt="a green square", steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, seed=3),
    ]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("fixture", ["sd15_pipe", "sdxl_pipe"])
def test_edit_many_equals_each_request_alone(fixture, request, small):
    pipe = request.getfixturevalue(fixture)
    reqs = _mix(pipe, small)
    together = pipe.edit_many(reqs, output_type="pt", batch_invariant=True, bucket_rows=24)
    alone = [pipe.edit_many([r], output_type="pt", batch_invariant=True, bucket_rows=24)[0] for r in reqs]
    for got, want in zip(together, alone):
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # bit-identical whatever it shares a call with
    free = pipe.edit_many(reqs, output_type="pt")
    plain = [pipe.edit(r["inv"], r["method"], r.get("target_prompt"), output_type="pt", progress=False,
                       **{k: v for k, v in r.items() if k not in ("inv", "method", "target_prompt")})
             if "inv" in r else pipe.generate(output_type="pt", progress=False, **r) for r in reqs]
    for got, want in zip(free, plain):
        assert _rel(got, want) <= 1e-5
    assert all(_rel(a, b) > 1e-3 for a, b in zip(alone[:1], alone[4:5]))  # the requests really differ


def test_one_model_call_per_step_and_groups_by_shape(sd15_pipe, small):
    reqs = _mix(sd15_pipe, small)
    progs = [sd15_pipe._edit(dict(r)) if "inv" in r else sd15_pipe._generation(dict(r)) for r in reqs]
    loop = Loop(sd15_pipe.denoiser)
    for p in progs:
        loop.add(p)
    loop.run()
    assert loop.calls == 5  # the longest program's steps: every program shares every call
    other = sd15_pipe.generation_program("a cat", steps=3, height=2 * SIZE, width=2 * SIZE, seed=0)
    loop = Loop(sd15_pipe.denoiser)
    loop.add(other)
    loop.add(sd15_pipe.generation_program("a dog", steps=3, height=SIZE, width=SIZE, seed=0))
    loop.run()
    assert loop.calls == 6  # two latent shapes: two groups, a call each per step


def test_a_long_lived_loop_forgets_what_finished_programs_needed(sd15_pipe, small):
    """A server's loop outlives its requests: memoised rows, plans and weights go with them."""
    reqs = _mix(sd15_pipe, small)
    make = lambda r: sd15_pipe._edit(dict(r)) if "inv" in r else sd15_pipe._generation(dict(r))  # noqa: E731
    loop = Loop(sd15_pipe.denoiser)
    a, b = make(reqs[0]), make(reqs[5])  # 5 and 4 steps
    loop.add(a)
    loop.add(b)
    loop.step()
    assert loop._conds and loop._plans
    owners = lambda cache: set().union(*(o for _, _, o, _ in cache.values()))  # noqa: E731
    assert owners(loop._conds) <= {id(a), id(b)}
    loop.remove(b)  # a cancelled request
    assert owners(loop._conds) | owners(loop._plans) <= {id(a)}
    loop.run()
    assert not loop._conds and not loop._plans


@pytest.mark.parametrize("k", [1, 3])
def test_a_request_joining_late_gets_its_result_alone(sd15_pipe, small, k):
    """Continuous batching: B joins after A has run k steps, at its own step 0."""
    reqs = _mix(sd15_pipe, small)
    make = lambda r: sd15_pipe._edit(dict(r)) if "inv" in r else sd15_pipe._generation(dict(r))  # noqa: E731
    want_a = run([make(reqs[2])], sd15_pipe.denoiser)[0]
    want_b = run([make(reqs[1])], sd15_pipe.denoiser)[0]
    a, b = make(reqs[2]), make(reqs[1])
    loop = Loop(sd15_pipe.denoiser)
    loop.add(a)
    for _ in range(k):
        loop.step()
    loop.add(b)
    loop.run()
    torch.testing.assert_close(a.result(), want_a, atol=0, rtol=0)
    torch.testing.assert_close(b.result(), want_b, atol=0, rtol=0)
    assert loop.calls == k + 5


def test_invert_many_equals_each_inversion_alone(sd15_pipe, small):
    reqs = [dict(image=small, prompt="a cat", method=m, steps=4, seed=0) for m in ("ddim", "ddpm", "ledits++")]
    reqs.append(dict(image=small.flip(-1), prompt="a dog", method="ddpm", steps=6, seed=4, exact=True))
    kw = dict(batch_invariant=True, bucket_rows=24)
    together, free = sd15_pipe.invert_many(reqs, **kw), sd15_pipe.invert_many(reqs)
    for got, loose, r in zip(together, free, reqs):
        want = sd15_pipe.invert_many([r], **kw)[0]
        assert got.method == want.method == r["method"]
        torch.testing.assert_close(got.latents, want.latents, atol=0, rtol=0)
        alone = sd15_pipe.invert(progress=False, **r)
        assert _rel(loose.latents, alone.latents) <= 1e-5
        if want.noise is not None:
            torch.testing.assert_close(got.noise, want.noise, atol=0, rtol=0)
            assert _rel(loose.noise, alone.noise) <= 1e-5


def test_bucket_too_small_and_bad_requests(sd15_pipe, small):
    reqs = _mix(sd15_pipe, small)[:1]  # P2P with guidance: 4 model rows
    with pytest.raises(ValueError, match="bucket_rows=2"):
        sd15_pipe.edit_many(reqs, batch_invariant=True, bucket_rows=2)
    with pytest.raises(TypeError, match="list of dicts"):
        sd15_pipe.edit_many(reqs[0])
    with pytest.raises(ValueError, match="needs 'inv' \\(an edit\\) or 'prompt'"):
        sd15_pipe.edit_many([dict(target_prompt="x")])
    with pytest.raises(ValueError, match="needs 'image'"):
        sd15_pipe.invert_many([dict(prompt="x")])
