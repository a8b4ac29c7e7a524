"""Plug-and-Play and MasaCtrl (engine.editing.pnp, engine.editing.masactrl) on tiny SD1.5 / SDXL."""

import pytest
import torch
import torch.nn.functional as F

from engine.editing import edit_program, editor
from engine.editing.masactrl import default_start_layer
from engine.editing.pnp import pnp_attention_layers
from engine.models.attention import Attention

STEPS = 4
SRC, TGT = "a red cat", "a blue cat"


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request, sd15_pipe, sdxl_pipe, image):
    pipe = sd15_pipe if request.param == "sd15" else sdxl_pipe
    return pipe, pipe.invert(image, SRC, method="ddim", steps=STEPS, progress=False)


def _regen(pipe, inv, prompt, scale):
    return editor("ddim")(pipe, inv, prompt, guidance_scale=scale, progress=False)


def _close(got, want, tol=1e-5):
    """Equal up to batch-size rounding (CPU GEMMs round differently for 3 and 2 rows)."""
    err = (got - want).abs().max() / want.abs().max()
    assert err <= tol, f"relative error {err:.2e}"


# ---- injection off: plain DDIM regeneration ---------------------------------------------------


def test_pnp_without_injection_is_ddim_regeneration(case):
    pipe, inv = case
    got = editor("pnp")(pipe, inv, TGT, guidance_scale=3.0, pnp_attn_t=0.0, pnp_f_t=0.0, progress=False)
    _close(got, _regen(pipe, inv, TGT, 3.0))


def test_masactrl_without_injection_is_ddim_regeneration(case):
    pipe, inv = case
    got = editor("masactrl")(pipe, inv, TGT, guidance_scale=3.0, start_step=STEPS, progress=False)
    _close(got, _regen(pipe, inv, TGT, 3.0))


def test_injection_changes_the_edit(case):
    pipe, inv = case
    plain = _regen(pipe, inv, TGT, 3.0)
    for method, kw in (("pnp", {}), ("masactrl", dict(start_step=0, start_layer=0))):
        got = editor(method)(pipe, inv, TGT, guidance_scale=3.0, progress=False, **kw)
        assert (got - plain).abs().max() > 1e-3, method


# ---- injection on: the stated rows and layers read the source ---------------------------------


def _one_call(pipe, program):
    """Run the program's first model call with observers on every attention module: each
    module's input and output, for an explicit recomputation."""
    seen = {}

    def keep(mod, args, out):  # returns None: observes, changes nothing
        seen[mod.layer.index] = (args[0].clone(), out.clone())

    hooks = [m.register_forward_hook(keep) for m in pipe.unet.modules() if isinstance(m, Attention)]
    try:
        x, t = program.model_input()
        with torch.no_grad():
            pipe.denoiser(x, t, program.cond(), program.plan())
    finally:
        for h in hooks:
            h.remove()
    return seen


def _explicit(mod, x_q, x_k, x_v):
    """to_out(softmax(q kᵀ/√d) v) of one row, q/k/v from the given inputs (float64)."""
    h, c = mod.heads, x_q.shape[-1]
    split = lambda y: y.double().view(y.shape[0], h, c // h).transpose(0, 1)  # noqa: E731  [H, N, D]
    w = lambda lin, y: F.linear(y.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())  # noqa: E731
    q, k, v = split(w(mod.to_q, x_q)), split(w(mod.to_k, x_k)), split(w(mod.to_v, x_v))
    o = torch.softmax(q @ k.transpose(-1, -2) / (c // h) ** 0.5, -1) @ v  # [H, N, D]
    return w(mod.to_out[0], o.transpose(0, 1).reshape(-1, c))


def _modules(pipe):
    return {m.layer.index: m for m in pipe.unet.modules() if isinstance(m, Attention)}


def test_pnp_target_rows_read_source_queries_and_keys(case):
    pipe, inv = case
    prog = edit_program("pnp")(pipe, inv, TGT, guidance_scale=3.0)
    seen, mods = _one_call(pipe, prog), _modules(pipe)
    injected = pnp_attention_layers(pipe.unet)
    assert injected and all(not mods[i].layer.cross and mods[i].layer.place == "up" for i in injected)
    for i, (x, out) in seen.items():
        if mods[i].layer.cross:
            continue
        for r in (1, 2):  # uncond and cond target rows; row 0 is the source
            src = 0 if i in injected else r
            want = _explicit(mods[i], x[src], x[src], x[r])
            torch.testing.assert_close(out[r].double(), want, atol=2e-5, rtol=2e-5)


def test_masactrl_edit_rows_read_source_keys_and_values(case):
    pipe, inv = case
    n_self = sum(not l.cross for l in pipe.unet.attn_layers)
    lo = n_self // 2
    prog = edit_program("masactrl")(pipe, inv, TGT, guidance_scale=3.0, start_step=0, start_layer=lo)
    seen, mods = _one_call(pipe, prog), _modules(pipe)
    selfs = [l.index for l in pipe.unet.attn_layers if not l.cross]
    injected = set(selfs[lo:])
    for i, (x, out) in seen.items():
        if mods[i].layer.cross:
            continue
        for r, src in ((1, 0), (3, 2), (0, 0), (2, 2)):  # rows [u_src, u_edit, c_src, c_edit]
            kv = src if i in injected else r
            want = _explicit(mods[i], x[r], x[kv], x[kv])
            torch.testing.assert_close(out[r].double(), want, atol=2e-5, rtol=2e-5)


def test_masactrl_default_layers_follow_the_reference():
    assert default_start_layer(16) == 10 and default_start_layer(70) == 44


def test_mask_guided_masactrl_runs_and_masks_follow_the_words(sd15_pipe, image):
    inv = sd15_pipe.invert(image, SRC, method="ddim", steps=STEPS, progress=False)
    masks = []
    out = editor("masactrl")(sd15_pipe, inv, TGT, guidance_scale=3.0, start_step=1, mask_words=("cat", "cat"),
                             progress=False, callback=lambda d: masks.append(d["masks"]))
    assert out.isfinite().all() and len(masks) == STEPS
    key_fg, query_fg = masks[-1]
    assert key_fg.shape == inv.x0.shape[:1] + inv.x0.shape[-2:]
    assert 0 < key_fg.sum() < key_fg.numel()  # min-max normalised maps over 0.1: some, not all
    with pytest.raises(ValueError, match="start_step >= 1"):
        edit_program("masactrl")(sd15_pipe, inv, TGT, start_step=0, mask_words=("cat", "cat"))


def test_errors_name_the_fix(sd15_pipe, image):
    inv = sd15_pipe.invert(image, SRC, method="ddpm", steps=STEPS, progress=False)
    for method in ("pnp", "masactrl"):
        with pytest.raises(ValueError, match="method='ddim'"):
            edit_program(method)(sd15_pipe, inv, TGT)
    inv = sd15_pipe.invert(image, SRC, method="ddim", steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="pnp_f_t"):
        edit_program("pnp")(sd15_pipe, inv, TGT, pnp_f_t=1.5)
    with pytest.raises(ValueError, match="self-attention layers"):
        edit_program("masactrl")(sd15_pipe, inv, TGT, start_layer=999)


def test_pnp_default_layers_state_the_reference_rule(sd15_pipe, sdxl_pipe):
    """SD (first up block without attention): up_blocks[1].resnets[1] and every decoder
    self-attention but up_blocks[1].attentions[0]; SDXL: the same rule from up_blocks[0]."""
    from engine.editing.pnp import default_feature_site

    for pipe, first in ((sd15_pipe, 1), (sdxl_pipe, 0)):
        unet = pipe.unet
        assert default_feature_site(unet) == f"up_blocks.{first}.resnets.1"
        names = {l.name for l in unet.attn_layers if l.index in pnp_attention_layers(unet)}
        want = {l.name for l in unet.attn_layers if not l.cross and l.name.startswith("up_blocks")
                and not l.name.startswith(f"up_blocks.{first}.attentions.0.")}
        assert names == want


def test_batched_with_other_programs_each_edit_is_as_alone(sd15_pipe, image):
    """PnP (features), mask-guided MasaCtrl (key masks over row ranges) and a P2P edit share
    model calls through edit_many; each result matches its run alone (batch-size rounding)."""
    pipe = sd15_pipe
    inv = pipe.invert(image, SRC, method="ddim", steps=STEPS, progress=False)
    reqs = [dict(inv=inv, method="pnp", target_prompt=TGT, guidance_scale=3.0),
            dict(inv=inv, method="masactrl", target_prompt=TGT, guidance_scale=3.0, start_step=1,
                 mask_words=("cat", "cat")),
            dict(inv=inv, method="p2p", target_prompt=TGT, guidance_scale=3.0)]
    together = pipe.edit_many([dict(r) for r in reqs], output_type="pt")
    for r, got in zip(reqs, together):
        alone = pipe.edit_many([dict(r)], output_type="pt")[0]
        torch.testing.assert_close(got, alone, rtol=0, atol=1e-4)
