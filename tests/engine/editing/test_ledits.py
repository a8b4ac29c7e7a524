"""LEDITS++ (engine.editing.ledits) against diffusers' LEditsPPPipelineStableDiffusion(XL).

Tiny models: the conftest tiny UNets have cross-attention only at 1/1 and 1/2 of the latent
resolution, but diffusers' cross-attention masks aggregate the down/up maps at exactly 1/4
(``att_res = latent / 4``; with none there it crashes on an empty list). So this module
builds its own tiny SD and SDXL folders (the conftest text encoders / VAE / tokenizer, and a
3-level UNet with cross-attention at 1/1 (SD) or 1/2 (SDXL), at 1/4, and in the mid block:
only the 1/4 down/up layers may be aggregated), saved in diffusers format and loaded by both
sides. Images are 64x64 (latent 32x32, maps 8x8; diffusers wants multiples of 32).

Workarounds for diffusers 0.42 bugs (the least invasive ones, on the reference side only):
* SD ``invert`` swaps the outputs of its ``encode_prompt`` (it unpacks ``(edit, negative)``
  as ``(uncond, text)``), so a non-empty source prompt guides *away* from itself; the
  reference's ``encode_prompt`` is wrapped to swap them back during ``invert``.
* The pipelines keep their LEDITS attention processors after a masked call (and store into
  a stale store on the next call); the reference's processors are reset before each call.
* ``edit_cooldown_steps`` lists may not hold None, ``guidance_rescale > 0`` crashes (it calls
  ``.mean`` on a tuple) and the DDIM inversion crashes (float timesteps index
  ``alphas_cumprod``): those are tested here by their properties, not against diffusers.
"""

import numpy as np
import pytest
import torch

import engine
from engine.editing import Inversion
from engine.editing.sega import row_quantile

SIZE = 64
SD_STEPS, SD_SKIP = 10, 0.15  # 11 schedule steps, the first dropped; the first used t (831) is > 800
XL_STEPS, XL_SKIP = 8, 0.25  # 10 schedule steps, 2 dropped
TOL = 1e-3


def _unet_config(arch: str) -> dict:
    if arch == "sd15":
        return dict(
            sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
            norm_num_groups=32, cross_attention_dim=32, attention_head_dim=(2, 2, 4),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        )
    return dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32, 64),
        norm_num_groups=32, cross_attention_dim=64, attention_head_dim=(2, 2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 1, 2),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def _build(arch: str, folder):
    from diffusers import UNet2DConditionModel

    from engine.tiny import build_diffusers_pipeline

    base = build_diffusers_pipeline(arch)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(**_unet_config(arch))
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().max() == 0:  # e.g. conv_out: make every weight matter
                p.normal_(0, 0.05)
    pipe = type(base)(**{**base.components, "unet": unet})
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _reference(arch: str, folder):
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusion, LEditsPPPipelineStableDiffusionXL

    cls = LEditsPPPipelineStableDiffusion if arch == "sd15" else LEditsPPPipelineStableDiffusionXL
    sched = DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler",
                                                        algorithm_type="sde-dpmsolver++", solver_order=2)
    ref = cls.from_pretrained(folder, scheduler=sched)
    ref.set_progress_bar_config(disable=True)
    return ref


def _image(seed=0):
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))  # [1, 3, H, W] in [0, 1]


def _ref_invert(ref, arch, **kw):
    orig = ref.encode_prompt
    if arch == "sd15":  # diffusers bug: SD invert unpacks encode_prompt's outputs swapped
        def swapped(*a, **k):
            edit, neg, count = orig(*a, **k)
            return neg, edit, count

        ref.encode_prompt = swapped
    try:
        ref.invert(**kw)
    finally:
        ref.encode_prompt = orig


def _ref_edit(ref, **kw):
    from diffusers.models.attention_processor import AttnProcessor

    ref.unet.set_attn_processor(AttnProcessor())  # drop processors a previous masked call left behind
    return ref(output_type="np", generator=torch.Generator().manual_seed(5), **kw).images


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = _build("sd15", tmp_path_factory.mktemp("ledits") / "sd15")
    ours, ref = engine.load(folder), _reference("sd15", folder)
    img = _image()
    _ref_invert(ref, "sd15", image=img, source_prompt="a cat", num_inversion_steps=SD_STEPS, skip=SD_SKIP,
                generator=torch.Generator().manual_seed(3), height=SIZE, width=SIZE)
    inv = ours.invert(img, "a cat", method="ledits++", steps=SD_STEPS, skip=SD_SKIP, seed=3, progress=False)
    return ours, ref, inv, {}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = _build("sdxl", tmp_path_factory.mktemp("ledits") / "sdxl")
    ours, ref = engine.load(folder), _reference("sdxl", folder)
    img = _image(1)
    _ref_invert(ref, "sdxl", image=img, source_prompt="a cat", source_guidance_scale=4.0, num_inversion_steps=XL_STEPS,
                skip=XL_SKIP, generator=torch.Generator().manual_seed(4), height=SIZE, width=SIZE)
    # diffusers' parameter names, accepted as aliases
    inv = ours.invert(img, method="ledits++", source_prompt="a cat", source_guidance_scale=4.0,
                      num_inversion_steps=XL_STEPS, skip=XL_SKIP, generator=torch.Generator().manual_seed(4),
                      height=SIZE, width=SIZE, progress=False)
    return ours, ref, inv, {}


def _edit(ours, inv, **kw):
    return ours.edit(inv, "ledits++", output_type="np", progress=False, **kw)


def _case(fixture, name: str):
    """Our image for a named parity case, computed once per module."""
    ours, _, inv, cache = fixture
    if name not in cache:
        cache[name] = _edit(ours, inv, **(SD_CASES if ours.arch == "sd" else XL_CASES)[name])
    return cache[name]


# ----------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("fixture", ["sd", "sdxl"])
def test_inversion_matches_diffusers(fixture, request):
    ours, ref, inv, _ = request.getfixturevalue(fixture)
    steps = SD_STEPS if fixture == "sd" else XL_STEPS
    assert inv.timesteps.tolist() == ref.inversion_steps.tolist()
    assert inv.noise.shape == (steps, 1, 4, SIZE // 2, SIZE // 2) and inv.latents.shape[0] == steps + 1
    torch.testing.assert_close(inv.latents[0], ref.init_latents, atol=1e-5, rtol=0)
    assert (inv.noise - ref.zs).abs().max() <= 1e-4
    if fixture == "sdxl":  # num_zero_noise_steps=3
        assert torch.count_nonzero(inv.noise[-3:]) == 0 and torch.count_nonzero(inv.noise[-4]) > 0


# ----------------------------------------------------------------------------- edits vs diffusers

SD_CASES = {
    "reconstruct": dict(),
    "one_concept_intersect": dict(editing_prompt="a dog"),
    "two_noise_mask_reverse": dict(editing_prompt=["a dog", "sunglasses"], reverse_editing_direction=[False, True],
                                   use_intersect_mask=False),
    "two_attn_mask_reverse": dict(editing_prompt=["a dog", "sunglasses"], reverse_editing_direction=True,
                                  use_cross_attn_mask=True, use_intersect_mask=False, edit_guidance_scale=[6.0, 3.0]),
    "two_intersect_windows": dict(editing_prompt=["a dog", "sunglasses"], edit_threshold=[0.8, 0.6],
                                  edit_warmup_steps=[0, 2], edit_cooldown_steps=[SD_STEPS, 7]),
}
XL_CASES = {
    "reconstruct": dict(),
    "one_concept_noise_mask": dict(editing_prompt=["a dog"]),
    "two_attn_mask_reverse": dict(editing_prompt=["a dog", "sunglasses"], reverse_editing_direction=[True, False],
                                  use_cross_attn_mask=True),
    "two_intersect": dict(editing_prompt=["a dog", "sunglasses"], use_intersect_mask=True, edit_threshold=0.7),
}


@pytest.mark.parametrize("case", list(SD_CASES))
def test_sd_edit_matches_diffusers(sd, case):
    ref, kw = sd[1], SD_CASES[case]
    want = _ref_edit(ref, **kw)
    got = _case(sd, case)
    assert got.shape == want.shape == (1, SIZE, SIZE, 3)
    assert np.abs(got - want).max() <= TOL


@pytest.mark.parametrize("case", list(XL_CASES))
def test_sdxl_edit_matches_diffusers(sdxl, case):
    ref, kw = sdxl[1], XL_CASES[case]
    want = _ref_edit(ref, **kw)
    got = _case(sdxl, case)
    assert np.abs(got - want).max() <= TOL


def test_edits_are_not_trivial(sd):
    """The parity cases must tell the configurations apart (masks really select something)."""
    ours, _, inv, _ = sd
    imgs = {k: _case(sd, k) for k in SD_CASES if k != "two_intersect_windows"}
    keys = list(imgs)
    for a in range(len(keys)):
        for b in range(a + 1, len(keys)):
            assert np.abs(imgs[keys[a]] - imgs[keys[b]]).max() > 20 * TOL, (keys[a], keys[b])
    seen = []
    _edit(ours, inv, editing_prompt=["a dog", "sunglasses"], callback=lambda d: seen.append(d["masks"]))
    m = torch.stack(seen)  # [S, n, B, 1, h, w]
    assert 0 < m.mean() < 1 and m.shape == (SD_STEPS, 2, 1, 1, SIZE // 2, SIZE // 2)


# ----------------------------------------------------------------------------- properties


def test_reconstruct_equals_no_edit_and_target_prompt(sd):
    ours, _, inv, _ = sd
    rec = ours.reconstruct(inv, output_type="np", progress=False)
    np.testing.assert_array_equal(rec, _case(sd, "reconstruct"))
    np.testing.assert_array_equal(_case(sd, "one_concept_intersect"), ours.edit(
        inv, "ledits++", "a dog", output_type="np", progress=False))
    with pytest.raises(ValueError, match="not both"):
        _edit(ours, inv, editing_prompt="a dog", target_prompt="a cat")


def test_deterministic_and_save_load(sd, tmp_path):
    ours, _, inv, _ = sd
    again = ours.invert(_image(), "a cat", method="ledits++", steps=SD_STEPS, skip=SD_SKIP, seed=3, progress=False)
    torch.testing.assert_close(again.noise, inv.noise, atol=0, rtol=0)
    torch.testing.assert_close(again.latents, inv.latents, atol=0, rtol=0)
    kw = SD_CASES["two_noise_mask_reverse"]
    a = _case(sd, "two_noise_mask_reverse")
    np.testing.assert_array_equal(a, _edit(ours, again, **kw))
    loaded = Inversion.load(inv.save(tmp_path / "inv.safetensors"))
    assert loaded.method == "ledits++" and loaded.settings["total_steps"] == int(SD_STEPS * (1 + SD_SKIP))
    np.testing.assert_array_equal(a, _edit(ours, loaded, **kw))


def test_sem_guidance_replays_an_edit(sdxl):
    """Guidance captured by the callback, passed back as sem_guidance without prompts, gives
    the same image (diffusers' sem_guidance)."""
    ours, _, inv, _ = sdxl
    kept = []
    a = _edit(ours, inv, editing_prompt=["a dog"], callback=lambda d: kept.append(d["guidance"]))
    b = _edit(ours, inv, sem_guidance=torch.stack(kept))
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - _case(sdxl, "reconstruct")).max() > 20 * TOL


def test_unguided_inversion_is_edit_friendly(sd):
    """Without a source prompt, the no-edit trajectory passes through the inverted latents
    (Huberman-Spiegelglas et al. 2023): DPM-Solver++ up to its last (noise-free) step, DDIM
    (eta = 1, nonzero final variance) all the way to x0."""
    ours = sd[0]
    for sampler in ("dpmpp_2m_sde", "ddim"):
        inv = ours.invert(_image(2), "", method="ledits++", steps=6, skip=0.2, seed=0, sampler=sampler, progress=False)
        xs = []
        ours.edit(inv, "ledits++", output_type="pt", progress=False, callback=lambda d: xs.append(d["x"]))
        traj = torch.stack(xs)  # [S, B, C, h, w]
        last = len(xs) if sampler == "ddim" else len(xs) - 1
        torch.testing.assert_close(traj[:last], inv.latents[1:last + 1], atol=1e-4, rtol=0)
    assert inv.settings["sampler"] == "ddim"
    rec = ours.reconstruct(inv, output_type="pt", progress=False)
    torch.testing.assert_close(rec, ours.decode(inv.x0), atol=1e-4, rtol=0)
    edited = ours.edit(inv, "ledits++", editing_prompt="a dog", output_type="pt", progress=False)
    assert (edited - rec).abs().max() > 20 * TOL


def test_guidance_rescale_and_denoising_end(sdxl):
    ours, _, inv, _ = sdxl
    kw = XL_CASES["one_concept_noise_mask"]
    base = _case(sdxl, "one_concept_noise_mask")
    resc = _edit(ours, inv, guidance_rescale=0.7, **kw)
    assert np.isfinite(resc).all() and np.abs(resc - base).max() > TOL
    n = []
    ours.edit(inv, "ledits++", denoising_end=0.5, output_type="pt", progress=False, callback=lambda d: n.append(int(d["t"])),
              **kw)
    assert n and min(n) >= 500 and len(n) < XL_STEPS


def test_row_quantile_matches_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1024, generator=g)
    x[0, :10] = x[0, 10]  # ties
    q = torch.tensor([0.9, 0.75, 0.5, 0.0, 1.0, 0.123])
    want = torch.stack([torch.quantile(x[r], float(q[r])) for r in range(6)])
    torch.testing.assert_close(row_quantile(x, q), want, atol=0, rtol=0)


def test_bad_parameters(sd, tiny_sd15_dir):
    ours, _, inv, _ = sd
    with pytest.raises(ValueError, match="2 editing prompts"):
        _edit(ours, inv, editing_prompt=["a", "b"], edit_guidance_scale=[1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="unexpected parameters: nonsense"):
        _edit(ours, inv, nonsense=1)
    with pytest.raises(ValueError, match="empty concept"):
        _edit(ours, inv, editing_prompt=["a", " "])
    with pytest.raises(TypeError, match="alias"):
        ours.invert(_image(), "a", method="ledits++", source_prompt="b", progress=False)
    with pytest.raises(ValueError, match="samplers"):
        ours.invert(_image(), method="ledits++", sampler="euler", steps=2, progress=False)
    # The conftest tiny SD UNet has no cross-attention at 1/4 resolution: masks cannot be built
    # there. Asked for explicitly, that is an error; by default the noise mask alone is used.
    small = engine.load(tiny_sd15_dir)
    inv2 = small.invert(_image(), method="ledits++", steps=2, seed=0, progress=False)
    with pytest.raises(ValueError, match="1/4 of the latent"):
        small.edit(inv2, "ledits++", editing_prompt="x", use_intersect_mask=True, progress=False)
    default = small.edit(inv2, "ledits++", editing_prompt="x", output_type="pt", progress=False)
    noise_only = small.edit(inv2, "ledits++", editing_prompt="x", use_intersect_mask=False, output_type="pt",
                            progress=False)
    assert default.shape == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(default, noise_only, atol=0, rtol=0)


def test_edits_a_noise_map_inversion_from_its_first_step(sd15_pipe, image):
    """LEDITS++ replays any inversion with noise maps (Inversion.replay): on an edit-friendly
    DDPM inversion that skips steps it runs the steps after the skip, from the skip's latent."""
    inv = sd15_pipe.invert(image, "", method="ddpm", steps=6, guidance_scale=1.0, skip=0.5, seed=0, exact=True,
                           progress=False)
    seen = []
    out = engine.editing.editor("ledits++")(sd15_pipe, inv, editing_prompt="a dog", progress=False,
                                            callback=lambda d: seen.append(d["t"]))
    assert [int(t) for t in seen] == inv.timesteps[3:].tolist()
    rec = engine.editing.editor("ledits++")(sd15_pipe, inv, progress=False)  # no concepts: the replay
    torch.testing.assert_close(rec, inv.x0.float(), atol=1e-5, rtol=0)
    assert (out - rec).abs().max() > 1e-4
    ddim = sd15_pipe.invert(image, "", method="ddim", steps=2, progress=False)
    with pytest.raises(ValueError, match="has none"):
        engine.editing.editor("ledits++")(sd15_pipe, ddim, editing_prompt="x", progress=False)
