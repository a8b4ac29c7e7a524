"""pix2pix-zero (engine.editing.pix2pix_zero, engine.editing.regularise) on tiny SD1.5 / SDXL,
against diffusers' StableDiffusionPix2PixZeroPipeline where the two agree by design."""

import pytest
import torch

from engine.editing import Inversion, edit_program, editor
from engine.editing.pix2pix_zero import edit_direction
from engine.editing.regularise import NoiseRegulariser, autocorrelation_loss, kl_loss

diffusers = pytest.importorskip("diffusers")

STEPS = 4
SRC = "a red cat"


@pytest.fixture(scope="module")
def ref(tiny_sd15_dir):
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe = diffusers.StableDiffusionPix2PixZeroPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        scheduler=diffusers.DDIMScheduler.from_config(sd.scheduler.config),
        inverse_scheduler=diffusers.DDIMInverseScheduler.from_config(sd.scheduler.config),
        feature_extractor=None, safety_checker=None, caption_generator=None, caption_processor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- the regulariser ---------------------------------------------------------------------------


def test_losses_match_diffusers(ref):
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 32, 32, generator=g)
    ours = autocorrelation_loss(eps, torch.Generator().manual_seed(7))
    theirs = ref.auto_corr_loss(eps, generator=torch.Generator().manual_seed(7))  # the same shifts, in order
    torch.testing.assert_close(ours.sum(), theirs, rtol=1e-6, atol=1e-9)
    # KL: per image here; diffusers pools the batch (equal for one image).
    torch.testing.assert_close(kl_loss(eps[:1]), ref.kl_divergence(eps[:1]).reshape(1), rtol=1e-6, atol=1e-7)


def test_regulariser_lowers_both_losses_and_keeps_images_apart():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 4, 16, 16, generator=g)
    eps = base + 0.5 * torch.roll(base, 1, 2) + 0.3  # correlated, off-centre
    reg = NoiseRegulariser()
    a = torch.full((1,), 0.5)
    out = reg(eps, torch.zeros_like(eps), a, "epsilon", torch.Generator().manual_seed(0))
    assert kl_loss(out) < kl_loss(eps)
    assert autocorrelation_loss(out, torch.Generator().manual_seed(3)) < autocorrelation_loss(eps, torch.Generator().manual_seed(3))
    other = torch.randn(1, 4, 16, 16, generator=g)  # a second image changes nothing for the first but the draws
    both = NoiseRegulariser(lambda_ac=0.0)(torch.cat([eps, other]), torch.zeros(2, 4, 16, 16), a.expand(2), "epsilon")
    torch.testing.assert_close(both[:1], NoiseRegulariser(lambda_ac=0.0)(eps, torch.zeros_like(eps), a, "epsilon"),
                               rtol=1e-6, atol=1e-7)


# ---- inversion and edit against diffusers ------------------------------------------------------


def test_inversion_matches_diffusers(sd15_pipe, ref, image):
    ours = sd15_pipe.invert(image, SRC, method="pix2pix-zero", steps=STEPS, seed=3, progress=False)
    assert ours.method == "pix2pix-zero"
    theirs = ref.invert(prompt=SRC, image=ours.x0, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3),
                        output_type="latent").latents
    torch.testing.assert_close(ours.latents[0], theirs, rtol=1e-4, atol=5e-5)  # its explicit softmax vs our kernel
    plain = sd15_pipe.invert(image, SRC, method="ddim", steps=STEPS, progress=False)
    assert (plain.latents[0] - ours.latents[0]).abs().max() > 1e-3  # the regularisation did something


def test_edit_without_attention_guidance_matches_diffusers(sd15_pipe, ref):
    """λ = 0: both are guided DDIM from the inverted latent with caption + direction. With λ > 0
    they differ by design: diffusers keeps the latent of its *unconditional* row (``x_in.chunk(2)[0]``),
    moved by that row's maps, and evaluates the edit row at a latent it then drops; the paper
    (and ours) moves x_t by the edit's own maps. Diffusers also averages per-head errors, ours
    the head-averaged maps the seam stores."""
    g = torch.Generator().manual_seed(4)
    inv = sd15_pipe.invert(torch.rand(1, 3, 64, 64, generator=g), SRC, method="pix2pix-zero", steps=STEPS,
                           progress=False)
    src_e = torch.randn(3, 77, 32, generator=g)
    tgt_e = src_e + 0.3 * torch.randn(3, 77, 32, generator=g)
    want = ref(prompt=SRC, source_embeds=src_e, target_embeds=tgt_e, num_inference_steps=STEPS, guidance_scale=3.0,
               latents=inv.latents[0], cross_attention_guidance_amount=0.0, output_type="latent").images
    got = editor("pix2pix-zero")(sd15_pipe, inv, direction=tgt_e.mean(0) - src_e.mean(0), negative_prompt="",
                                 guidance_scale=3.0, cross_attention_guidance=0.0, progress=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # 3-row calls vs 2-row: GEMM rounding


# ---- the edit's own parts ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request, sd15_pipe, sdxl_pipe, image):
    pipe = sd15_pipe if request.param == "sd15" else sdxl_pipe
    return pipe, pipe.invert(image, SRC, method="pix2pix-zero", steps=STEPS, progress=False)


def test_directions_from_words_sentences_and_prompts(case):
    pipe, _ = case
    enc = lambda p: pipe.encode_prompt(p, guidance=False)[0]  # noqa: E731
    d = edit_direction(pipe, [SRC], direction=("red", "blue"))  # the caption with the word swapped
    torch.testing.assert_close(d.context, enc("a blue cat").context - enc(SRC).context, rtol=0, atol=1e-6)
    if d.pooled is not None:
        torch.testing.assert_close(d.pooled, enc("a blue cat").pooled - enc(SRC).pooled, rtol=0, atol=1e-6)
    d = edit_direction(pipe, ["a dog"], direction=("red", "blue"))  # not in the caption: the bare words
    torch.testing.assert_close(d.context, enc("blue").context - enc("red").context, rtol=0, atol=1e-6)
    sents = (["a red cat", "a red car"], ["a blue cat", "a blue car"])
    d = edit_direction(pipe, [SRC], direction=sents)
    want = enc(sents[1]).context.mean(0) - enc(sents[0]).context.mean(0)
    torch.testing.assert_close(d.context[0], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(edit_direction(pipe, [SRC], "a blue cat").context,
                               enc("a blue cat").context - enc(SRC).context, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        edit_direction(pipe, [SRC], "a blue cat", ("red", "blue"))
    assert edit_direction(pipe, [SRC]).context.abs().max() == 0  # neither: a reconstruction


def test_attention_guidance_pulls_the_maps_to_the_reference(case):
    """The hook's step lowers Σ||M^edit − M^ref||² at the first step (a small λ: first order)."""
    pipe, inv = case
    prog = edit_program("pix2pix-zero")(pipe, inv, direction=("red", "blue"), cross_attention_guidance=1e-3)
    losses = []
    guide = prog._guide

    def spy(i, ref):
        from engine.models.attention import AttentionPlan

        def loss():
            maps = prog._maps(prog.b)
            prog.denoiser(prog.x, prog._t(i), prog.edit_cond_rows, AttentionPlan(store=maps))
            return float(sum(((maps[l] - ref[l]) ** 2).sum() for l in maps))

        before = loss()
        guide(i, ref)
        losses.append((before, loss()))

    prog._guide = spy
    with torch.no_grad():
        prog.model_input()  # the set-up: reference maps of step 0, then the guided step
    before, after = losses[0]
    assert after < before


def test_edit_runs_with_the_reconstruction_one_step_ahead(case):
    """The reference rows ride in the edit's calls with the next timestep; without a direction
    (source = target) and no guidance the edit is the reconstruction itself."""
    from engine.step import run

    pipe, inv = case
    prog = edit_program("pix2pix-zero")(pipe, inv, SRC, guidance_scale=1.0, cross_attention_guidance=0.0)
    x, t = prog.model_input()
    assert x.shape[0] == 2 and t[0] == prog.sampler.timesteps[1] and t[1] == prog.sampler.timesteps[0]
    run([prog], pipe.denoiser)
    rec = editor("ddim")(pipe, inv, SRC, guidance_scale=1.0, progress=False)
    torch.testing.assert_close(prog.result(), rec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prog.x_src, rec, rtol=1e-4, atol=1e-4)


def test_pix2pix_zero_inversions_save_and_bad_input_is_refused(case, tmp_path):
    pipe, inv = case
    back = Inversion.load(inv.save(tmp_path / "p2pz.safetensors"))
    assert back.method == "pix2pix-zero" and back.settings["regularisation"]["lambda_ac"] == 20.0
    out = editor("pix2pix-zero")(pipe, back, direction=("red", "blue"), progress=False)
    assert out.shape == inv.x0.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="cross_attention_guidance"):
        editor("pix2pix-zero")(pipe, inv, "a blue cat", cross_attention_guidance=-1.0, progress=False)
    with pytest.raises(ValueError, match="direction must be"):
        editor("pix2pix-zero")(pipe, inv, direction="blue", progress=False)
