"""LEDITS++ (Brack et al. 2024, "LEDITS++: Limitless Image Editing using Text-to-Image Models").

Two steps, as diffusers' ``LEditsPPPipelineStableDiffusion(XL)``:

``invert`` -- edit-friendly DDPM inversion (Huberman-Spiegelglas et al. 2023, "An Edit
    Friendly DDPM Noise Space", Alg. 1) on the DPM-Solver++ SDE order-2 grid (LEDITS++
    Sec. 3.2; or DDIM with eta = 1):
    1. the schedule has N = int(steps * (1 + skip)) steps; only the last ``steps`` are used;
    2. x_t = alpha_t x0 + sigma_t eps_t with an independent draw eps_t per used timestep
       (drawn cleanest first, as diffusers, so a seed gives its draws);
    3. noisiest first, the (source-guided) model output at x_t gives the solver's mean
       mu_t; the noise map z_t = (x_{t-1} - mu_t) / c_t makes the stochastic step land
       exactly on x_{t-1} (c_t: the step's noise scale), and x_{t-1} is replaced by
       mu_t + c_t z_t so rounding does not accumulate.
``edit`` -- re-run the same steps from x_T with the stored z_t, the model output being the
    unconditional one plus SEGA guidance per edit concept (``engine.editing.sega``),
    masked by cross-attention maps (stored by the attention kernel; no attention matrix
    is built here) and / or the guidance magnitude. One UNet call per step for all rows:
    [uncond x B, concept_1 x B, ..., concept_n x B].
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..images import load_image
from ..models.attention import AttentionPlan
from ..prompts import Conditioning, as_list, encode
from ..sampling import DDIMSampler, DPMSolverSampler, make_sampler, randn
from ..sampling.dpmsolver import dpmpp_2m_step, vp_alpha_sigma
from ..step import Guidance, SamplerProgram, rescale_guidance, stored_noise
from .common import run_one
from .inversion import Inversion, ledits_replay
from .sega import Concepts, attention_mask, make_map_store, mask_layers, sega_guidance, smoothing_kernel

log = logging.getLogger("overpaint")

SAMPLERS = ("dpmpp_2m_sde", "ddim")
INTERSECT_MAX_T = 800  # SD pipeline: above this timestep the intersect mask is M¹ alone


def _alias(params: dict, ours: str, value, default, theirs: str):
    """Take diffusers' name ``theirs`` for our parameter ``ours`` (either may be given)."""
    if theirs not in params:
        return value
    v = params.pop(theirs)
    if value != default and value != v:
        raise TypeError(f"got both {ours}={value!r} and its alias {theirs}={v!r}")
    return v


def _no_leftovers(params: dict, what: str) -> None:
    if params:
        raise TypeError(f"ledits++ {what} got unexpected parameters: {', '.join(sorted(params))}")



def make_ledits_sampler(pipe, name: str, total: int):
    """The sampler of diffusers' LEDITS++ pipelines for ``total`` schedule steps.

    As diffusers: "leading" spacing, steps_offset 1 and no sample clipping (its
    constructor forces the last two); DPM-Solver++ is the SDE variant of order 2, DDIM has eta 1.
    """
    if name not in SAMPLERS:
        raise ValueError(f"ledits++ supports the samplers {SAMPLERS}, got {name!r}")
    spec = ledits_replay(name, total)
    extra = {"eta": spec["eta"]} if name == "ddim" else {}
    return make_sampler(name, pipe.schedule, total, device=pipe.device, **extra, **spec["overrides"])

def _noise_tables(smp, first: int):
    """Per used step (noisiest first), as [S] tensors: (a, s) with x_t = a x0 + s eps for the
    forward noising, and c, the step's noise scale (x_prev = mu + c z)."""
    if isinstance(smp, DPMSolverSampler):
        sig = smp.sigmas[first:]  # [S+1]
        a, s = vp_alpha_sigma(sig[:-1])  # [S]
        lam = torch.log(a) - torch.log(s)  # [S]
        a_next, s_next = vp_alpha_sigma(sig[1:])
        h = torch.log(a_next) - torch.log(s_next) - lam  # [S]; +inf at a zero final sigma
        return a, s, s_next * torch.sqrt(1.0 - torch.exp(-2 * h))  # c = 0 where sigma_next = 0
    assert isinstance(smp, DDIMSampler)
    a_t, a_prev = smp.alpha_t[first:], smp.alpha_prev[first:]  # [S]
    var = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)  # DDIM sigma_t^2 (Song et al. 2021, eq. 16)
    return a_t**0.5, (1 - a_t) ** 0.5, smp.eta * var**0.5


def _mean_step(smp, i: int, x, out, state):
    """The solver's step from x without noise: (mu, state). DPM-Solver++ uses its history
    (second order after the first step) on every step, including the last, as diffusers'
    inversion does."""
    zeros = torch.zeros_like(x)
    if isinstance(smp, DPMSolverSampler):
        b = x.shape[0]
        return dpmpp_2m_step(x, out, smp.sigmas[i].expand(b), smp.sigmas[i + 1].expand(b), state,
                             prediction_type=smp.prediction_type, sde=True, noise=zeros,
                             solver_type=smp.solver_type, solver_order=smp.solver_order)
    return smp.step(i, x, out, state, zeros)


def _prepare_image(pipe, image, height, width) -> torch.Tensor:
    """Image -> [B, 3, H, W] in [0, 1] at the inversion size.

    As diffusers' image processor: the default size is the image's, rounded down to a multiple
    of the VAE factor; PIL images (and files) are resized with Lanczos. Arrays and tensors are
    resized bicubically (diffusers uses nearest for tensors)."""
    from PIL import Image

    x = load_image(image)  # [B, 3, H, W]
    f = pipe.vae_scale_factor
    h0, w0 = x.shape[-2:]
    height, width = height or h0 - h0 % f, width or w0 - w0 % f
    if height % f or width % f:
        raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    if (height, width) == (h0, w0):
        return x
    if isinstance(image, (str, Path, Image.Image)):
        pil = Image.fromarray((x[0].permute(1, 2, 0) * 255).round().byte().numpy())
        return load_image(pil.resize((width, height), resample=Image.LANCZOS))
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False).clamp(0, 1)



class LeditsInversion(SamplerProgram):
    """Step 3 of the inversion as a program: at used step j the (source-guided) model output at
    the drawn x_t gives the solver's mean; the noise map makes the stochastic step land on the
    next drawn latent, which is then replaced by what the edit's step will reproduce."""

    def __init__(self, pipe, g, smp, first: int, lat, c, settings: dict, num_zero_noise_steps: int, x0, crops):
        super().__init__(pipe.denoiser, g, lat[0], smp, height=settings["height"], width=settings["width"],
                         start=first, crops_coords_top_left=crops)
        self.lat, self.c, self.first, self.settings, self.x0 = lat, c, first, settings, x0
        self.zs = torch.zeros_like(lat[1:])  # [S, B, C, h, w]
        self.num_zero = num_zero_noise_steps

    def model_input(self):
        self.x = self.lat[self.i - self.first]  # the drawn x_t (as replaced by the previous step)
        return super().model_input()

    def advance(self, pred):
        j, steps = self.i - self.first, self.zs.shape[0]
        mu, self.state = _mean_step(self.sampler, self.i, self.x, pred, self.state)  # [B, C, h, w]
        cj = self.c[j].to(mu.dtype)
        z = torch.where(cj > 0, (self.lat[j + 1] - mu) / cj, torch.zeros_like(mu))  # no noise on a zero-variance step
        self.zs[j] = z
        if j + 1 < steps:
            self.lat[j + 1] = mu + cj * z  # what the edit's step will reproduce
        self.i += 1

    def result(self) -> Inversion:
        if self.num_zero > 0:
            self.zs[-self.num_zero:] = 0
        ts = self.sampler.timesteps[self.first:]
        return Inversion("ledits++", self.x0, self.lat, ts, self.source, self.uncond, self.zs, self.settings)


def invert_program(pipe, image, prompt="", *, steps: int = 30, guidance_scale: float = 3.5, skip: float = 0.15,
                   seed: int | None = None, generator: torch.Generator | None = None, height: int | None = None,
                   width: int | None = None, sampler: str = "dpmpp_2m_sde", negative_prompt=None,
                   crops_coords_top_left=(0, 0), num_zero_noise_steps: int | None = None, image_prompt=None,
                   **params) -> LeditsInversion:
    """LEDITS++ inversion of ``image`` (see the module docstring for the algorithm).

    Parameters (diffusers' names accepted as aliases): ``prompt`` / ``source_prompt`` describes
    the image (guidance only when non-empty and ``guidance_scale`` / ``source_guidance_scale``
    > 1); ``steps`` / ``num_inversion_steps``: steps kept after ``skip`` (a fraction in [0, 1)
    of the schedule dropped at the noisy end); ``seed`` or ``generator``: the draws of step 2;
    ``height`` / ``width``: resize first; ``sampler``: "dpmpp_2m_sde" (default) or "ddim";
    SDXL: ``crops_coords_top_left``, ``num_zero_noise_steps`` (default 3: the last noise maps
    are zeroed, as diffusers' SDXL pipeline).
    """
    prompt = _alias(params, "prompt", prompt, "", "source_prompt")
    guidance_scale = _alias(params, "guidance_scale", guidance_scale, 3.5, "source_guidance_scale")
    steps = _alias(params, "steps", steps, 30, "num_inversion_steps")
    _no_leftovers(params, "invert")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"skip must be in [0, 1), got {skip}")
    if sampler not in SAMPLERS:
        raise ValueError(f"ledits++ supports the samplers {SAMPLERS}, got {sampler!r}")
    if num_zero_noise_steps is None:
        num_zero_noise_steps = 3 if pipe.arch == "sdxl" else 0
    if seed is None and generator is None:
        seed = int(torch.seed() % 2**63)
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)

    x = _prepare_image(pipe, image, height, width)  # [B, 3, H, W]
    height, width = x.shape[-2:]
    x0 = pipe.encode_image(x)  # [B, C, h, w]
    b = x0.shape[0]
    prompts = as_list(prompt, b)
    source, uncond = pipe.encode_prompt(prompts, negative_prompt, 1, guidance=True)  # [B] rows each
    guided = any(p != "" for p in prompts) and guidance_scale > 1.0
    crops = tuple(crops_coords_top_left)
    # guided: 2B model rows [uncond, source] per step; else the unconditional rows alone. SDXL's
    # time ids come from the Denoiser (diffusers' SDXL invert swaps height and width there;
    # the same for square images).
    g = Guidance(source, uncond, None, guidance_scale) if guided else Guidance(uncond, None, None)
    g = g.with_image(image_prompt)  # Tight Inversion: the image's own tokens on the rows

    total = int(steps * (1 + skip))
    smp = make_ledits_sampler(pipe, sampler, total)
    first = len(smp) - steps
    a, s, c = _noise_tables(smp, first)  # [S] each
    bc = lambda v: v.view(-1, 1, 1, 1, 1).to(x0.dtype)  # noqa: E731  [S] -> [S, 1, 1, 1, 1]

    # 2. independent forward noising per timestep, drawn cleanest first (diffusers' order)
    eps = torch.stack([randn(x0.shape, generator, pipe.device, x0.dtype) for _ in range(steps)][::-1])  # [S, B, C, h, w]
    lat = torch.cat([bc(a) * x0 + bc(s) * eps, x0[None]])  # [S+1, B, C, h, w]; lat[j]: start of step j

    settings = dict(prompt=prompts if len(prompts) > 1 else prompts[0], steps=steps, guidance_scale=guidance_scale,
                    skip=skip, seed=seed, sampler=sampler, total_steps=total, height=int(height), width=int(width),
                    negative_prompt=negative_prompt, crops_coords_top_left=list(crops),
                    num_zero_noise_steps=num_zero_noise_steps, guided=guided, arch=pipe.arch,
                    replay=ledits_replay(sampler, total))
    prog = LeditsInversion(pipe, g, smp, first, lat, c, settings, num_zero_noise_steps, x0, crops)
    prog.source, prog.uncond = source, uncond
    return prog


@torch.no_grad()
def invert(pipe, image, prompt="", *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)


class LeditsEdit(SamplerProgram):
    """The edit: rows [uncond x B, concept_1 x B, ...]; the prediction is the unconditional output
    plus the masked SEGA terms; the stored noise maps drive every step."""

    def __init__(self, pipe, rp, rows, steps: int, *, concepts: int, sega: dict, callback=None):
        i0 = rp.first + rp.start  # the first step run (a noise-map inversion may skip some)
        super().__init__(pipe.denoiser, None, rp.x, rp.sampler, rows=rows, start=i0, end=i0 + steps,
                         noise=stored_noise(rp.noise, rp.first), callback=callback)
        self.n, self.b, self.first = concepts, rp.x.shape[0], i0
        self.sega, self.guidance, self.masks, self.map_plan = sega, None, None, sega.pop("plan")

    def plan(self):
        return self.map_plan

    def combine(self, out):
        sg, j, b, n = self.sega, self.i - self.first, self.b, self.n
        unc, concepts = out[:b], out[b:].view(n, b, *out.shape[1:])  # [B, ...], [n, B, ...]
        masks = None
        if sg["replay"] is not None and len(sg["replay"]) > j:
            guidance = sg["replay"][j].to(out.device, out.dtype)  # [B, C, h, w]
        elif n:
            if sg["maps"] is not None:
                masks = attention_mask(sg["maps"], b, sg["tokens"], sg["row_thr"], tuple(out.shape[-2:]),
                                       sg["kernel"]).view(n, b, 1, *out.shape[-2:])
            guidance = sega_guidance(unc, concepts, sg["signed"], sg["thresholds"], sg["active"][j], sg["mode"],
                                     masks, sg["user_mask"], attn_only=sg["attn_only"][j])
        else:
            guidance = torch.zeros_like(unc)
        self.guidance, self.masks = guidance, masks
        pred = unc + guidance  # [B, C, h, w]
        if n and sg["rescale"] > 0:
            pred = rescale_guidance(pred, concepts.mean(dim=0), sg["rescale"])  # against the concepts' mean
        return pred

    def report(self, i):
        j = i - self.first
        return dict(i=j, t=self.sampler.timesteps[i], x=self.x, guidance=self.guidance, masks=self.masks)


def edit_program(pipe, inv: Inversion, target_prompt=None, *, editing_prompt=None, edit_guidance_scale=5.0,
                 edit_threshold=0.9, edit_warmup_steps=0, edit_cooldown_steps=None, reverse_editing_direction=False,
                 use_cross_attn_mask: bool = False, use_intersect_mask: bool | None = None, user_mask=None,
                 sem_guidance=None, guidance_rescale: float = 0.0, negative_prompt=None,
                 denoising_end: float | None = None, crops_coords_top_left=None, seed=None, generator=None,
                 callback=None, image_prompt=None, **params) -> LeditsEdit:
    """Regenerate ``inv`` under LEDITS++ edits; its result is latents [B, C, h, w].

    Parameters as diffusers' ``LEditsPPPipelineStableDiffusion(XL).__call__``: ``editing_prompt``
    (a string or list: one SEGA concept each; ``target_prompt`` is used when it is None),
    per-concept scalars or lists ``edit_guidance_scale``, ``edit_threshold``,
    ``edit_warmup_steps``, ``edit_cooldown_steps``, ``reverse_editing_direction``; masks
    ``use_cross_attn_mask`` (M¹), ``use_intersect_mask`` (M¹ ∧ M²; default True for SD, False
    for SDXL; implies M¹), else M² alone; ``user_mask`` multiplies the guidance (broadcast
    against [B, C, h, w]); ``sem_guidance``: per-step guidance [S, B, C, h, w] to use instead
    (e.g. from ``callback``); ``guidance_rescale`` (Lin et al. 2024, Sec. 3.4, against the
    concepts' mean); ``denoising_end`` (SDXL: stop early). No randomness is drawn: ``seed``
    and ``generator`` are accepted for signature compatibility. ``callback`` gets
    dict(i, t, x, guidance, masks) after each step (masks [n, B, C|1, h, w] or None).
    ``image_prompt``: IP-Adapter tokens the rows read (a Tight Inversion's image): the
    unconditional rows its ``uncond`` tokens, the concepts' its ``cond``.
    """
    _no_leftovers(params, "edit")
    if inv.noise is None:
        raise ValueError(f"ledits++ replays stored noise maps and this {inv.method!r} inversion has none; "
                         f"invert with method='ledits++' first")
    if editing_prompt is None and target_prompt is not None:
        editing_prompt = target_prompt
    elif editing_prompt is not None and target_prompt is not None:
        raise ValueError("ledits++ edits with editing_prompt; pass either it or target_prompt, not both")
    prompts = [] if not editing_prompt else as_list(editing_prompt)
    if any(not p.strip() for p in prompts):
        raise ValueError("editing_prompt has an empty concept; give each concept some words, or drop it")
    n = len(prompts)
    if use_intersect_mask is None:
        # diffusers' default (on for SD, off for SDXL), where the model has the layers it reads.
        use_intersect_mask = pipe.arch != "sdxl" and bool(mask_layers(pipe.unet))
        if pipe.arch != "sdxl" and not use_intersect_mask:
            log.info("ledits++: no 1/4-resolution cross-attention layers; using the noise mask only")
    use_attn = n > 0 and (use_cross_attn_mask or use_intersect_mask)
    cfg = Concepts.from_params(n, edit_guidance_scale, edit_threshold, reverse_editing_direction,
                               edit_warmup_steps, edit_cooldown_steps)

    st = inv.settings
    rp = inv.replay(pipe.schedule, pipe.device, pipe.dtype)
    b, _, h, w = rp.x.shape
    rows = (1 + n) * b
    steps = rp.steps
    ts = rp.sampler.timesteps[rp.first + rp.start:]  # [S] the steps run
    if denoising_end is not None and 0 < denoising_end < 1:
        cutoff = int(round(pipe.schedule.num_train_timesteps * (1 - denoising_end)))
        steps = sum(t >= cutoff for t in inv.timesteps[rp.start:].tolist())  # once, before the loop

    # Conditioning rows [uncond x B, concept_1 x B, ...] (concept-major, as diffusers).
    _, uncond = pipe.encode_prompt([""] * b, negative_prompt, 1, guidance=True)  # [B]
    ip = image_prompt
    parts = [uncond if ip is None else uncond.with_image(ip.uncond, ip.scale)]
    if n:
        concepts = encode(pipe.text_encoders, pipe.tokenizers, prompts, pipe.device, pipe.dtype).repeat(b)
        parts.append(concepts if ip is None else concepts.with_image(ip.cond.repeat(n, 1, 1), ip.scale))
    cond = Conditioning.cat(parts)  # [R]
    crops = tuple(st.get("crops_coords_top_left", (0, 0)) if crops_coords_top_left is None else crops_coords_top_left)
    model_rows = pipe.denoiser.condition(cond, st["height"], st["width"], crops_coords_top_left=crops)

    plan = maps = tokens = kernel = None
    if use_attn:
        maps = make_map_store(pipe.unet, rows, h, w, cond.context.shape[1], pipe.device)
        plan = AttentionPlan(store=maps.store)
        tokens = _token_rows(pipe, prompts, cond.context.shape[1]).repeat_interleave(b, 0).to(pipe.device)  # [nB, Nk]
        kernel = smoothing_kernel(pipe.device)
    if use_intersect_mask:
        mode = "intersect"
    else:
        mode = "attn" if use_cross_attn_mask else "noise"
    # SD pipeline: above INTERSECT_MAX_T the intersect mask is M¹ alone (a per-step tensor, no host branch)
    attn_only = (ts > INTERSECT_MAX_T) & (pipe.arch != "sdxl")  # [S] bool
    thresholds = torch.tensor(cfg.threshold, device=pipe.device)  # [n]
    sega = dict(plan=plan, maps=maps, tokens=tokens, kernel=kernel, mode=mode, attn_only=attn_only,
                signed=cfg.signed_scale(pipe.device, torch.float32), thresholds=thresholds,
                active=cfg.active(steps, pipe.device, torch.float32), row_thr=thresholds.repeat_interleave(b),
                user_mask=None if user_mask is None else user_mask.to(pipe.device), replay=sem_guidance,
                rescale=guidance_rescale)
    return LeditsEdit(pipe, rp, model_rows, steps, concepts=n, sega=sega, callback=callback)


@torch.no_grad()
def edit(pipe, inv: Inversion, target_prompt=None, *, progress: bool = True, **params) -> torch.Tensor:
    """Regenerate ``inv`` under LEDITS++ edits (see :func:`edit_program`); latents [B, C, h, w]."""
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)


def _token_rows(pipe, prompts: list[str], n_keys: int) -> torch.Tensor:
    """[n, Nk] 1.0 on the key positions whose maps M¹ sums for each concept.

    diffusers counts the tokens as ``tokenizer(..., padding="max_length", return_length=True)
    .length - 2`` (its last tokenizer for SDXL) and sums positions 1 .. count; with the
    tokenizers of current transformers the length includes the padding, so that is every
    position but the first and last. The same call is made here so masks agree."""
    tok = pipe.tokenizers[-1]
    lengths = tok(prompts, padding="max_length", max_length=n_keys, truncation=True, return_length=True).length
    pos = torch.arange(n_keys)
    counts = torch.tensor(lengths) - 2  # [n]
    return ((pos[None] >= 1) & (pos[None] < 1 + counts[:, None])).float()
