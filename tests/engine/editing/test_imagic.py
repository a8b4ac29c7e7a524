"""Imagic (engine.editing.imagic, engine.models.deltas) on tiny SD1.5 / SDXL: both optimisation
stages against the same loss written with diffusers' UNet and scheduler, the user's model and
files untouched, the delta's weights reaching the edit, and the stage running inside the loop."""

import hashlib

import pytest
import torch
import torch.nn.functional as F

from engine.editing import Inversion, editor, inversion_program
from engine.editing.imagic import E_OPT, tuned_weights
from engine.step import Loop

diffusers = pytest.importorskip("diffusers")

TGT = "a blue cat"


def _reference(folder, x0, e, embed_steps, tune_steps, seed, embed_lr=1e-3, tune_lr=2e-6):
    """The diffusers community ``imagic_stable_diffusion.py`` loop (fp32, no accelerator) with
    diffusers' UNet and DDPMScheduler.add_noise, the draws in our order (t, then noise)."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    g = torch.Generator().manual_seed(seed)
    e = e.clone().requires_grad_()
    unet.requires_grad_(False)

    def loss(emb):
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        return F.mse_loss(unet(sched.add_noise(x0, noise, t), t, emb).sample, noise)

    opt = torch.optim.Adam([e], lr=embed_lr)
    for _ in range(embed_steps):
        opt.zero_grad()
        loss(e).backward()
        opt.step()
    e = e.detach()
    unet.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    opt = torch.optim.Adam(unet.parameters(), lr=tune_lr)
    for _ in range(tune_steps):
        opt.zero_grad()
        loss(e).backward()
        opt.step()
    return e, {n: p.detach() - before[n] for n, p in unet.named_parameters()}


def _generated(pipe, **request):
    """A generation's latents (the program's result, before decoding)."""
    from engine.step import run

    with torch.no_grad():
        return run([pipe.program("generate", request)], pipe.denoiser)[0]


def _hashes(folder):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_both_stages_match_the_reference_and_leave_the_model_alone(sd15_pipe, tiny_sd15_dir, image):
    files = _hashes(tiny_sd15_dir)
    params = {n: p.detach().clone() for n, p in sd15_pipe.unet.named_parameters()}
    inv = sd15_pipe.invert(image, TGT, method="imagic", embed_steps=3, tune_steps=2, tune_lr=1e-3, seed=5,
                           progress=False)
    target = sd15_pipe.encode_prompt(TGT, guidance=False)[0].context
    e, delta = _reference(tiny_sd15_dir, inv.x0, target, 3, 2, 5, tune_lr=1e-3)
    torch.testing.assert_close(inv.extras[E_OPT + "context"], e, rtol=1e-4, atol=1e-6)
    assert (e - target).abs().max() > 1e-4  # it moved
    worst = max(float((inv.extras["imagic.delta." + n] - d).abs().max()) for n, d in delta.items())
    assert worst <= 2e-6, worst  # Adam steps of lr 1e-3: the deltas agree to float rounding
    assert max(float(d.abs().max()) for d in delta.values()) > 1e-4
    # The user's model and the files it was loaded from are as they were.
    assert _hashes(tiny_sd15_dir) == files
    for n, p in sd15_pipe.unet.named_parameters():
        torch.testing.assert_close(p, params[n], rtol=0, atol=0)
        assert not p.requires_grad


def test_untuned_edit_is_a_plain_generation_of_the_target(sd15_pipe, image):
    """No optimisation and alpha 1: the tuned weights equal the model's and the mix is e_tgt, so
    the edit is ``generate(target)`` with the same seed, bit for bit."""
    inv = sd15_pipe.invert(image, TGT, method="imagic", embed_steps=0, tune_steps=0, progress=False)
    got = editor("imagic")(sd15_pipe, inv, alpha=1.0, steps=3, seed=7, guidance_scale=3.0, progress=False)
    want = _generated(sd15_pipe, prompt=TGT, steps=3, seed=7, guidance_scale=3.0, height=64, width=64)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_lora_delta_saves_small_and_reaches_the_edit(arch, sd15_pipe, sdxl_pipe, image, tmp_path):
    pipe = sd15_pipe if arch == "sd15" else sdxl_pipe
    inv = pipe.invert(image, TGT, method="imagic", embed_steps=2, tune_steps=3, tune="lora", lora_rank=2,
                      tune_lr=1e-2, progress=False)
    deltas = {k: v for k, v in inv.extras.items() if k.startswith("imagic.delta.")}
    assert deltas and all(k.endswith((".down", ".up")) for k in deltas)
    assert all(v.shape[0] == 2 or v.shape[1] == 2 for v in deltas.values())  # rank 2
    w = tuned_weights(pipe, inv)
    base = dict(pipe.unet.named_parameters())
    assert all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out")) for n in w)
    assert max(float((w[n] - base[n]).abs().max()) for n in w) > 0  # up left zero: it trained
    if arch == "sdxl":
        assert E_OPT + "pooled" in inv.extras
    back = Inversion.load(inv.save(tmp_path / "imagic.safetensors"))
    kw = dict(alpha=1.5, steps=2, seed=1, progress=False)
    a = editor("imagic")(pipe, inv, **kw)
    torch.testing.assert_close(editor("imagic")(pipe, back, **kw), a, rtol=0, atol=0)
    untuned = Inversion("imagic", inv.x0, inv.latents, inv.timesteps, inv.source, settings=dict(inv.settings),
                        extras={k: v for k, v in inv.extras.items() if not k.startswith("imagic.delta.")}
                        | {k: torch.zeros_like(v) if k.endswith(".up") else v for k, v in deltas.items()})
    assert (editor("imagic")(pipe, untuned, **kw) - a).abs().max() > 1e-5  # the delta changed the edit


def test_tuning_runs_in_the_loop_beside_other_requests(sd15_pipe, image):
    """The tuning program runs no model rows: a generation sharing the loop steps on, and its
    result is what it is alone."""
    alone = _generated(sd15_pipe, prompt="a red dog", steps=3, seed=2, height=64, width=64)
    tuning = inversion_program("imagic")(sd15_pipe, image, TGT, embed_steps=2, tune_steps=2)
    gen = sd15_pipe.program("generate", dict(prompt="a red dog", steps=3, seed=2, height=64, width=64))
    loop = Loop(sd15_pipe.denoiser)
    loop.add(tuning)
    loop.add(gen)
    assert loop.rows == len(gen.cond())  # the tuning adds none
    with torch.no_grad():
        loop.run()
    assert loop.calls == 3 and tuning.done
    torch.testing.assert_close(gen.result(), alone, rtol=0, atol=0)
    assert tuning.result().method == "imagic"


def test_bad_imagic_requests_are_refused(sd15_pipe, image):
    ddim = sd15_pipe.invert(image, "a red cat", method="ddim", steps=2, progress=False)
    with pytest.raises(ValueError, match="edits an Imagic inversion"):
        editor("imagic")(sd15_pipe, ddim, progress=False)
    inv = sd15_pipe.invert(image, TGT, method="imagic", embed_steps=0, tune_steps=0, progress=False)
    with pytest.raises(ValueError, match="invert again with the new text"):
        editor("imagic")(sd15_pipe, inv, "a green cat", progress=False)
    with pytest.raises(ValueError, match="tune must be"):
        sd15_pipe.invert(image, TGT, method="imagic", tune="half", progress=False)
    with pytest.raises(ValueError, match="target text"):
        sd15_pipe.invert(image, "", method="imagic", progress=False)
