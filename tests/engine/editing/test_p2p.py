"""Prompt-to-Prompt (engine.editing.p2p) on tiny random SD1.5 / SDXL pipelines."""

import dataclasses

import pytest
import torch

import engine.models.attention as seam
from engine.editing.p2p import blend_layers, cross_alphas, edit as p2p
from engine.editing.p2p_align import align, token_ids, word_token_indices
from engine.models.attention import AttentionPlan, CrossMix, mixed_attention
from engine.editing import editor

STEPS = 5
SRC = "a red cat"


@pytest.fixture(scope="module")
def sd15(sd15_pipe):
    return sd15_pipe


@pytest.fixture(scope="module")
def sdxl(sdxl_pipe):
    return sdxl_pipe


def _invert(pipe, image, prompt=SRC, steps=STEPS):
    return pipe.invert(image, prompt, method="ddim", steps=steps, progress=False)


def _regen(pipe, inv, prompt, scale):
    """Plain DDIM regeneration from the inversion (the "ddim" editor)."""
    return editor("ddim")(pipe, inv, prompt, guidance_scale=scale, progress=False)


def _close_to_regen(got, want, tol=1e-5):
    """Equal up to batch-size rounding: CPU GEMMs round differently for 2 and 4 rows (about
    1e-7 relative per layer), which DDIM steps carry to ~5e-6 of the latents' range."""
    err = (got - want).abs().max() / want.abs().max()
    assert err <= tol, f"relative error {err:.2e}"


@pytest.fixture(scope="module")
def inv15(sd15, image):
    return _invert(sd15, image)


def _run(pipe, inv, target, **kw):
    steps = []
    kw.setdefault("guidance_scale", 3.0)
    out = p2p(pipe, inv, target, progress=False, callback=lambda d: steps.append(
        {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items() if k != "maps"}), **kw)
    return out, steps


# ---- equivalences ------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_identical_prompts_give_plain_regeneration_sd15(sd15, inv15, scale):
    kw = dict(guidance_scale=scale, cross_replace_steps=0.8, self_replace_steps=0.6, self_replace_min_scale=1)
    got, steps = _run(sd15, inv15, SRC, **kw)
    # Bit-exact against the plain regeneration run with the same rows (the image twice).
    two = dataclasses.replace(inv15, x0=inv15.x0.repeat(2, 1, 1, 1), latents=inv15.latents.repeat(1, 2, 1, 1, 1))
    same_rows = editor("ddim")(sd15, two, [SRC, SRC], guidance_scale=scale, progress=False)
    assert torch.equal(got, same_rows[:1]) and torch.equal(steps[-1]["x"][:1], same_rows[:1])
    _close_to_regen(got, _regen(sd15, inv15, SRC, scale))


def test_identical_prompts_give_plain_regeneration_sdxl(sdxl, image):
    inv = _invert(sdxl, image)
    got, _ = _run(sdxl, inv, SRC, self_replace_min_scale=1, local_blend_words=("cat", "cat"), blend_threshold=0.0)
    _close_to_regen(got, _regen(sdxl, inv, SRC, 3.0))


def test_reweight_with_weight_one_is_a_noop(sd15, inv15):
    base, _ = _run(sd15, inv15, "a red dog", cross_replace_steps=1.0)
    same, _ = _run(sd15, inv15, "a red dog", cross_replace_steps=1.0, equalizer={"dog": 1.0, "red": 1.0})
    assert torch.equal(base, same)
    ident, _ = _run(sd15, inv15, SRC, edit_type="reweight", reweight={"cat": 1.0})
    _close_to_regen(ident, _regen(sd15, inv15, SRC, 3.0))
    louder, _ = _run(sd15, inv15, SRC, edit_type="reweight", reweight={"cat": 4.0})
    assert (louder - ident).abs().max() > 1e-4


def test_replace_needs_equal_token_counts(sd15, inv15):
    with pytest.raises(ValueError, match="same token count.*refine"):
        p2p(sd15, inv15, "a red fat cat", edit_type="replace", progress=False)
    with pytest.raises(ValueError, match="not in the target prompt"):
        p2p(sd15, inv15, "a red dog", cross_replace_steps={"cat": 0.5}, progress=False)


def test_pipeline_dispatch(sd15, inv15):
    img = sd15.edit(inv15, method="p2p", target_prompt="a red dog", guidance_scale=2.0, output_type="pt",
                    progress=False)
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


# ---- attention --------------------------------------------------------------------------


def _probs(q, k):
    return torch.softmax((q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)  # [B, H, Nq, Nk]


def _heads(x, heads):
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # [B, H, N, D]


def test_stored_maps_equal_explicit_softmax(sd15):
    unet = sd15.unet
    mods = {m.layer.index: m for m in unet.modules() if isinstance(m, seam.Attention) and m.cross}
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    store = {i: torch.zeros(2, (8 // l.scale) ** 2, 77) for i, l in ((m.layer.index, m.layer) for m in mods.values())}
    seen, hooks = {}, []
    for i, m in mods.items():
        hooks.append(m.to_q.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__((i, "q"), o)))
        hooks.append(m.to_k.register_forward_hook(lambda mod, a, o, i=i: seen.__setitem__((i, "k"), o)))
    try:
        unet(x, torch.tensor([500, 20]), ctx, plan=AttentionPlan(store=store))
    finally:
        for hk in hooks:
            hk.remove()
    for i, m in mods.items():
        want = _probs(_heads(seen[i, "q"], m.heads), _heads(seen[i, "k"], m.heads)).mean(1)  # [B, Nq, Nk]
        torch.testing.assert_close(store[i].double(), want, atol=1e-6, rtol=0)


def _record_attention(monkeypatch, check):
    """Wrap the seam: check(layer, plan, q, k, v, out) after every attention call."""
    orig = seam.attention

    def wrapped(q, k, v, layer=None, plan=None):
        out = orig(q, k, v, layer, plan)
        check(layer, plan, q, k, v, out)
        return out

    monkeypatch.setattr(seam, "attention", wrapped)


def test_full_replacement_gives_source_attention_everywhere(sd15, inv15, monkeypatch):
    """cross = self = 1, all layers: edit rows' outputs are softmax(q_src k_srcᵀ) v_edit."""
    calls = []

    def check(layer, plan, q, k, v, out):
        p_src = _probs(q[2:3], k[2:3])  # rows [uncond_src, uncond_edit, cond_src, cond_edit]
        torch.testing.assert_close(out[3:4], (p_src @ v[3:4].double()).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[2:3], (p_src @ v[2:3].double()).float(), atol=1e-5, rtol=1e-5)  # own
        calls.append(layer.index)

    _record_attention(monkeypatch, check)
    _run(sd15, inv15, "a red dog", cross_replace_steps=1.0, self_replace_steps=1.0, self_replace_min_scale=1)
    assert len(calls) == STEPS * len(sd15.unet.attn_layers)


def test_self_replacement_only_at_coarse_layers_and_in_window(sd15, inv15, monkeypatch):
    replaced = set()
    step = {"n": 0}

    def check(layer, plan, q, k, v, out):
        if layer.cross:
            return
        if layer.index == 0:  # before any cross-attention both branches see the same input at step 0
            step["n"] += 1
            return
        src = (_probs(q[2:3], k[2:3]) @ v[3:4].double()).float()
        if torch.allclose(out[3:4], src, atol=1e-5, rtol=1e-5):
            replaced.add((step["n"] // 6, layer.scale))
        step["n"] += 1

    _record_attention(monkeypatch, check)
    _run(sd15, inv15, "a red dog", self_replace_steps=0.4, self_replace_min_scale=2)
    assert replaced == {(0, 2), (1, 2)}  # int(0.4 * 5) = 2 steps, mid block (scale 2) only


def test_cross_alphas_follow_p2p_windows(sd15):
    tok = sd15.tokenizers[0]
    a = cross_alphas(tok, ["a red dog"], 10, 0.8, 77)  # [S, B, L]
    assert a.shape == (10, 1, 77) and a[:8].eq(1).all() and a[8:].eq(0).all()  # int(0.8 * 11) = 8
    dog = word_token_indices(tok, "a red dog", "dog")
    a = cross_alphas(tok, ["a red dog"], 10, {"default_": 1.0, "dog": (0.2, 0.5)}, 77)
    assert a[:, 0, dog].T.eq(torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 0, 0.0])).all()
    assert a[:, 0, 0].eq(1).all()


# ---- refine -----------------------------------------------------------------------------


def test_alignment_maps_kept_tokens_to_the_source(sd15):
    tok = sd15.tokenizers[0]
    s, t = token_ids(tok, "a cat"), token_ids(tok, "a fat cat")
    mapper, aligned = align(s, t, 77)
    fat = word_token_indices(tok, "a fat cat", "fat")
    cat_t, cat_s = word_token_indices(tok, "a fat cat", "cat"), word_token_indices(tok, "a cat", "cat")
    assert aligned[fat].eq(0).all() and aligned[cat_t].eq(1).all()
    assert mapper[cat_t].tolist() == cat_s and mapper[0] == 0
    assert mapper[len(t) - 1] == len(s) - 1  # EOS to EOS, then the paddings in order
    assert mapper[len(t):].tolist() == [min(len(s) + i, 76) for i in range(77 - len(t))]
    for j in range(len(t)):
        if aligned[j]:
            assert s[mapper[j]] == t[j]


def test_mixed_attention_equals_materialised_p2p_formula():
    g = torch.Generator().manual_seed(0)
    B, H, Nq, Nk, D = 4, 2, 9, 77, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk))
    frm = torch.tensor([0, 1, 2, 2])
    index = torch.arange(Nk).repeat(B, 1)
    index[3] = torch.randint(0, Nk, (Nk,), generator=g)
    alpha, beta = torch.ones(B, Nk), torch.zeros(B, Nk)
    alpha[3], beta[3] = torch.rand(Nk, generator=g), torch.rand(Nk, generator=g)
    store = torch.zeros(B, Nq, Nk)
    out = mixed_attention(q, k, v, CrossMix(frm, frm, index, alpha, beta, own=(3, 4)), store=store)
    p_own = _probs(q, k)  # [B, H, Nq, Nk]
    p_src = _probs(q[frm], k[frm])
    p = alpha.double()[:, None, None] * torch.gather(p_src, 3, index[:, None, None].expand(B, H, Nq, Nk)) \
        + beta.double()[:, None, None] * p_own
    torch.testing.assert_close(out.double(), p @ v.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(store.double(), p_own.mean(1), atol=1e-6, rtol=0)  # every row's own maps
    # Weights on values are weights on probabilities (the kernel's token_weights).
    w = torch.rand(B, Nk, generator=g)
    via_tw = seam.kernels.attention(q, k, v, token_weights=w)
    via_v = mixed_attention(q, k, v, CrossMix(torch.arange(B), torch.arange(B), alpha=w))
    torch.testing.assert_close(via_v, via_tw, atol=1e-5, rtol=1e-5)


def test_refine_runs_and_keeps_the_source_branch(sd15, inv15):
    src_only = _regen(sd15, inv15, SRC, 3.0)
    got, steps = _run(sd15, inv15, "a red fat cat", cross_replace_steps=0.8, local_blend_words=("cat", "fat cat"))
    _close_to_regen(steps[-1]["x"][:1], src_only)
    keep = steps[-1]["mask"] == 0
    assert torch.equal(got * keep, steps[-1]["x"][:1] * keep)
    plain = _regen(sd15, inv15, "a red fat cat", 3.0)
    assert (got - plain).abs().max() > 1e-4  # the attention edit did something
    assert torch.isfinite(got).all()


# ---- local blend ------------------------------------------------------------------------


def test_local_blend_mask_and_regions(sd15, inv15):
    kw = dict(cross_replace_steps=0.8, local_blend_words=("cat", "dog"), blend_start=0.4)
    got, steps = _run(sd15, inv15, "a red dog", blend_threshold=0.5, **kw)
    free, free_steps = _run(sd15, inv15, "a red dog", cross_replace_steps=0.8)
    start = int(0.4 * STEPS)
    for s, f in zip(steps, free_steps):
        m, x = s["mask"], s["x"]
        assert m.shape == (1, 1, *inv15.latents.shape[-2:]) and ((m == 0) | (m == 1)).all() and m.max() == 1
        _close_to_regen(x[:1], f["x"][:1])  # source branch unchanged (maps stored: explicit-softmax rounding)
        if s["i"] >= start:
            keep = m == 0
            assert torch.equal((x[1:] * keep), (x[:1] * keep))  # outside the mask: the source exactly
    assert not torch.equal(got, free)
    small, steps_hi = _run(sd15, inv15, "a red dog", blend_threshold=0.95, **kw)
    assert steps_hi[-1]["mask"].sum() <= steps[-1]["mask"].sum()
    assert [l.index for l in blend_layers(sd15.unet, 16, (32, 32))] == [1, 3, 7, 9, 11]  # no mid: P2P's down/up


def test_local_blend_maps_are_the_rows_own(sd15, inv15):
    """Stored maps (for the mask) are each row's own softmax, also while the edit borrows."""
    mods = {m.layer.index: m for m in sd15.unet.modules() if isinstance(m, seam.Attention) and m.cross}
    layers = [l.index for l in blend_layers(sd15.unet, 16, tuple(inv15.latents.shape[-2:]))]
    seen, hooks, maps = [], [], []
    for i in layers:
        m = mods[i]
        hooks.append(m.to_q.register_forward_hook(lambda mod, a, o, i=i: seen.append((i, "q", o))))
        hooks.append(m.to_k.register_forward_hook(lambda mod, a, o, i=i: seen.append((i, "k", o))))
    try:
        p2p(sd15, inv15, "a red dog", guidance_scale=3.0, cross_replace_steps=1.0, local_blend_words=("cat", "dog"),
            progress=False, callback=lambda d: maps.append({k: v.clone() for k, v in d["maps"].items()}))
    finally:
        for hk in hooks:
            hk.remove()
    per_step = len(layers) * 2
    for step, stored in enumerate(maps):
        rec = {(i, kind): o for i, kind, o in seen[step * per_step:(step + 1) * per_step]}
        for i in layers:
            h = mods[i].heads
            want = _probs(_heads(rec[i, "q"], h), _heads(rec[i, "k"], h)).mean(1)  # [4, Nq, 77]
            torch.testing.assert_close(stored[i].double(), want, atol=1e-6, rtol=0)


# ---- DDPM -------------------------------------------------------------------------------


def test_ddpm_source_branch_follows_noise_maps(sd15, image):
    """Edit-friendly DDPM (engine.editing.ddpm): the source branch, driven by the stored
    noise maps, retraces the inversion's latents; equal prompts give the plain DDPM edit."""
    inv = sd15.invert(image, SRC, method="ddpm", steps=STEPS, guidance_scale=3.0, skip=0.2, progress=False)
    start = int(0.2 * STEPS)
    got, steps = _run(sd15, inv, "a red dog", guidance_scale=3.0, local_blend_words=("cat", "dog"))
    assert len(steps) == STEPS - start
    for k, s in enumerate(steps):
        _close_to_regen(s["x"][:1], inv.latents[start + k + 1], tol=1e-4)  # z = (x - mu) / sigma: 1/sigma
    same, _ = _run(sd15, inv, SRC, guidance_scale=3.0)
    two = dataclasses.replace(inv, x0=inv.x0.repeat(2, 1, 1, 1), latents=inv.latents.repeat(1, 2, 1, 1, 1),
                              noise=inv.noise.repeat(1, 2, 1, 1, 1))
    assert torch.equal(same, editor("ddpm")(sd15, two, [SRC, SRC], guidance_scale=3.0, progress=False)[:1])
    assert (got - same).abs().max() > 1e-4


def test_ddpm_source_guidance_and_target_guidance_per_row(sd15, image):
    """The official Edit-Friendly DDPM + P2P recipe: the source row guided with the
    inversion's 3.5 retraces the inversion (reconstructs the input) while the edit row uses 15."""
    inv = sd15.invert(image, SRC, method="ddpm", steps=STEPS, guidance_scale=3.5, seed=4, progress=False)
    got, steps = _run(sd15, inv, "a red dog", guidance_scale=15.0, source_guidance_scale=3.5)
    for k, s in enumerate(steps):
        _close_to_regen(s["x"][:1], inv.latents[k + 1], tol=1e-4)
    _close_to_regen(steps[-1]["x"][:1], inv.x0, tol=1e-4)  # the source row reconstructs the input
    both15, steps15 = _run(sd15, inv, "a red dog", guidance_scale=15.0)
    assert (steps15[-1]["x"][:1] - inv.x0).abs().max() > 1e-2  # one scale for both rows: the source drifts
    assert (got - both15).abs().max() > 1e-4


def test_edited_blend_maps_are_the_maps_after_replacement(sd15, inv15):
    """blend_maps="edited" (the official attention store): during full cross replacement the
    edit row's stored maps are the source row's; "own" keeps the row's own softmax."""
    kw = dict(cross_replace_steps=1.0, local_blend_words=("cat", "dog"), guidance_scale=3.0, progress=False)
    maps = {"own": [], "edited": []}
    for mode in maps:
        p2p(sd15, inv15, "a red dog", blend_maps=mode, **kw,
            callback=lambda d, mode=mode: maps[mode].append({k: v.clone() for k, v in d["maps"].items()}))
    for own, edited in zip(maps["own"], maps["edited"]):
        for layer in own:
            src, edit = 2, 3  # rows [uncond_src, uncond_edit, cond_src, cond_edit]
            torch.testing.assert_close(edited[layer][edit], edited[layer][src], atol=1e-6, rtol=0)
            torch.testing.assert_close(edited[layer][src], own[layer][src], atol=0, rtol=0)
            assert (own[layer][edit] - own[layer][src]).abs().max() > 1e-4


def test_edited_maps_follow_the_mix_formula():
    """Stored edited maps = alpha · borrowed(index) + beta · own, against explicit softmaxes."""
    g = torch.Generator().manual_seed(3)
    B, H, Nq, Nk, D = 4, 2, 6, 5, 16
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Nq, Nk, Nk))
    rows = torch.tensor([0, 1, 0, 1])
    index = torch.tensor([[0, 1, 2, 3, 4]] * 2 + [[0, 2, 1, 4, 3]] * 2)
    alpha, beta = torch.rand(B, Nk, generator=g), torch.rand(B, Nk, generator=g)
    mix = CrossMix(rows, rows, index, alpha, beta, own=(2, 4), edited_maps=True)
    store = torch.full((B, Nq, Nk), float("nan"))
    mixed_attention(q, k, v, mix, store=store)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / D**0.5, -1).mean(1)  # [B, Nq, Nk]
    for b in (2, 3):
        want = alpha[b].double() * probs[rows[b]][:, index[b]] + beta[b].double() * probs[b]
        torch.testing.assert_close(store[b].double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(store[:2].double(), probs[:2], atol=1e-6, rtol=0)


def test_self_replacement_rule_is_the_official_count_scaled_to_the_latent():
    from engine.editing.p2p import _self_replaced
    from engine.models.attention import AttnLayer

    def picked(hw, **kw):
        return [s for s in (1, 2, 4, 8) if _self_replaced(AttnLayer(0, "x", False, "down", s), hw, kw.get("q"), kw.get("m"))]

    assert picked((64, 64)) == [4, 8]  # SD 512²: the official Nq <= 16² picks the 16² and 8² layers
    assert picked((128, 128)) == [4, 8]  # SDXL 1024²: the same levels, where an absolute 16² would pick 8² only
    assert picked((96, 96)) == [4, 8]  # SD 768²: 24² and 12²
    assert picked((62, 63)) == [4, 8]  # sides not multiples of 4: the grids round up alike
    assert picked((64, 64), q=16**2 * 4) == [2, 4, 8] and picked((64, 64), m=8) == [8]


def test_skip_is_refused_for_an_inversion_that_replays_every_step(sd15, inv15):
    with pytest.raises(ValueError, match="skip applies to noise-map inversions"):
        p2p(sd15, inv15, "a red dog", skip=0.2, progress=False)
