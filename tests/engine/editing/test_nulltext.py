"""Null-text inversion (engine.editing.nulltext) on tiny SD1.5 / SDXL: the optimised embeddings
equal the official algorithm written out by hand, edits replay them, files keep them."""

import pytest
import torch
import torch.nn.functional as F

from engine.editing import Inversion, editor

STEPS, SCALE, INNER = 4, 7.5, 4
SRC, TGT = "a red cat", "a blue cat"


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request, sd15_pipe, sdxl_pipe, image):
    pipe = sd15_pipe if request.param == "sd15" else sdxl_pipe
    nt = pipe.invert(image, SRC, method="null-text", steps=STEPS, guidance_scale=SCALE, inner_steps=INNER,
                     progress=False)
    return pipe, nt


def _unet(pipe, x, t, null_or_cond, h=64, w=64):
    den = pipe.denoiser
    return den(x, t.expand(x.shape[0]), den.condition(null_or_cond, h, w)).float()


def _reference(pipe, inv, start):
    """Mokady et al.'s ``null_optimization`` (google/prompt-to-prompt, null_text_w_ptp.ipynb) by hand
    over the DDIM inversion ``inv``: per step, Adam on the unconditional embedding so that the
    guided DDIM step lands on the inversion's next latent; returns (∅_t per step, final latent)."""
    from engine.prompts import Conditioning

    ac, ts = pipe.schedule.alphas_cumprod, inv.timesteps
    x, null, nulls = inv.latents[0].clone(), start, []
    for i, t in enumerate(ts):
        a_t = ac[t]
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else pipe.schedule.final_alpha_cumprod

        def prev_step(eps, x=x, a_t=a_t, a_prev=a_prev):
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps

        with torch.no_grad():
            e_c = _unet(pipe, x, t, inv.source)
        params = [null.context.clone().requires_grad_()] + ([] if null.pooled is None else [null.pooled.clone().requires_grad_()])
        opt = torch.optim.Adam(params, lr=1e-2 * (1.0 - i / 100.0))
        for _ in range(INNER):
            cur = Conditioning(params[0], params[1] if len(params) > 1 else None)
            e_u = _unet(pipe, x, t, cur)
            loss = F.mse_loss(prev_step(e_u + SCALE * (e_c - e_u)), inv.latents[i + 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if loss.item() < 1e-5 + i * 2e-5:
                break
        null = Conditioning(*(p.detach() for p in params)) if len(params) > 1 else Conditioning(params[0].detach())
        nulls.append(null)
        with torch.no_grad():
            e_u = _unet(pipe, x, t, null)
            x = prev_step(e_u + SCALE * (e_c - e_u))
    return nulls, x


def test_embeddings_are_the_official_optimisation(case, image):
    pipe, nt = case
    ddim = pipe.invert(image, SRC, method="ddim", steps=STEPS, progress=False)
    torch.testing.assert_close(nt.latents, ddim.latents, rtol=0, atol=0)  # stage 1: the DDIM inversion
    start = pipe.encode_prompt(SRC, guidance=True)[1]
    with torch.enable_grad():
        nulls, x = _reference(pipe, ddim, start)
    want = torch.stack([n.context for n in nulls])  # [S, B, L, D]
    assert nt.extras["null.context"].shape == want.shape
    torch.testing.assert_close(nt.extras["null.context"], want, rtol=1e-4, atol=1e-5)
    if pipe.arch == "sdxl":  # both encoders' parts: the pooled embedding is optimised too
        got_pooled = nt.extras["null.pooled"]
        torch.testing.assert_close(got_pooled, torch.stack([n.pooled for n in nulls]), rtol=1e-4, atol=1e-5)
        assert (got_pooled[-1] - start.pooled).abs().max() > 1e-4
    assert (want[-1] - start.context).abs().max() > 1e-4  # it did move
    # The reconstruction (a DDIM edit replaying ∅_t) is the optimisation pass's own trajectory.
    # (The edit runs [∅, C] as one 2-row call, the reference one row at a time: batch-size
    # rounding in the GEMMs, amplified by the guidance scale.)
    rec = editor("null-text")(pipe, nt, None, progress=False)
    torch.testing.assert_close(rec, x, rtol=1e-3, atol=5e-4)


def test_optimised_embedding_lowers_the_step_loss(case):
    """At the first step, the guided DDIM step with ∅_T lands nearer the inversion's next latent
    than with the plain ∅ it started from (the quality figure is the Shapes benchmark's)."""
    from engine.prompts import Conditioning
    from engine.sampling import make_sampler

    pipe, nt = case
    smp = make_sampler("ddim", pipe.schedule, STEPS)
    x, t = nt.latents[0], nt.timesteps[0]
    e_c = _unet(pipe, x, t, nt.source)

    def loss(null):
        e_u = _unet(pipe, x, t, null)
        return F.mse_loss(smp.step(0, x, e_u + SCALE * (e_c - e_u))[0], nt.latents[1])

    pooled = nt.extras.get("null.pooled")
    opt = Conditioning(nt.extras["null.context"][0], None if pooled is None else pooled[0])
    assert loss(opt) < 0.98 * loss(pipe.encode_prompt(SRC, guidance=True)[1])  # 4 Adam steps of lr 1e-2


def test_edits_replay_the_embeddings_and_files_keep_them(case, tmp_path):
    pipe, nt = case
    path = nt.save(tmp_path / "nt.safetensors")
    back = Inversion.load(path)
    assert back.method == "null-text" and back.settings["guidance_scale"] == SCALE
    torch.testing.assert_close(back.extras["null.context"], nt.extras["null.context"], rtol=0, atol=0)
    a = editor("null-text")(pipe, nt, TGT, progress=False)
    torch.testing.assert_close(editor("null-text")(pipe, back, TGT, progress=False), a, rtol=0, atol=0)
    # The plain ∅ instead of the optimised ones gives another edit: the edit did use them.
    plain = Inversion("ddim", nt.x0, nt.latents, nt.timesteps, nt.source, nt.uncond, settings=dict(nt.settings))
    assert (editor("ddim")(pipe, plain, TGT, guidance_scale=SCALE, progress=False) - a).abs().max() > 1e-4
    # Prompt-to-Prompt and MasaCtrl on a null-text inversion.
    for method in ("p2p", "masactrl"):
        out = editor(method)(pipe, nt, TGT, guidance_scale=SCALE, progress=False)
        assert out.shape == nt.x0.shape and torch.isfinite(out).all()


def test_p2p_source_branch_reconstructs_with_the_embeddings(case):
    """P2P's source branch (source='denoise') is the null-text reconstruction: the per-step ∅_t
    reach both branches' unconditional rows."""
    from engine.editing import edit_program
    from engine.step import run

    pipe, nt = case
    prog = edit_program("p2p")(pipe, nt, TGT, guidance_scale=SCALE, cross_replace_steps=0.0, self_replace_steps=0.0)
    run([prog], pipe.denoiser)
    rec = editor("null-text")(pipe, nt, None, progress=False)
    torch.testing.assert_close(prog.x[:1], rec, rtol=1e-3, atol=5e-4)  # 4-row vs 2-row calls: GEMM rounding


def test_bad_settings_are_refused(sd15_pipe, image, tmp_path):
    with pytest.raises(ValueError, match="guidance_scale must exceed 1"):
        sd15_pipe.invert(image, SRC, method="null-text", steps=2, guidance_scale=1.0, progress=False)
    nt = sd15_pipe.invert(image, SRC, method="null-text", steps=2, inner_steps=1, progress=False)
    with pytest.raises(ValueError, match="drop negative_prompt"):
        editor("ddim")(sd15_pipe, nt, TGT, guidance_scale=SCALE, negative_prompt="blurry", progress=False)
