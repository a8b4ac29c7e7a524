"""Prompt-to-Prompt editing of an inverted real image (Hertz et al. 2022, "Prompt-to-Prompt
Image Editing with Cross Attention Control"), for SD and SDXL.

The source branch (the inverted image under its own prompt) and the edit branch (the
target prompt) run side by side, with their unconditional rows, in ONE UNet call per
timestep: rows [uncond_src, uncond_edit, cond_src, cond_edit] (B images each). The edit's
conditional rows take attention from the source's (P2P edits the conditional half only):

* cross-attention, steps [start, end) of ``cross_replace_steps`` (per word if a dict):
  replace (word swap): the source's probabilities; refine (added words): aligned target
  tokens take their source token's probability, new tokens keep their own; re-weight:
  borrowed probabilities scaled per token by the equalizer. All three are one
  :class:`~engine.models.attention.CrossMix` (exact, two kernel calls, no maps formed).
* self-attention, steps [0, self_replace_steps·S): the source's map softmax(q_src k_srcᵀ)
  applied to the edit's values (kernel ``q_from``/``k_from``), at layers whose queries are
  downsampled by at least ``self_replace_min_scale`` from the latent. P2P's rule is
  ``Nq <= 16**2`` at SD's 64×64 latent, i.e. scale >= 4 (16×16 and 8×8); we state it
  relative to the latent so it carries to SDXL (its 32×32 level) and to other sizes.
* local blending: the kernel stores head-averaged cross-attention maps of the blend
  layers (down/up layers at the resolution nearest 16×16, as P2P) into our buffers; they
  are summed over layers and steps, and from step ``blend_start``·S on the mask
  (words' maps, 3×3 max-pool, nearest upsample, divided by its max, > threshold, union
  of the source's and the edit's) keeps the source outside it:
  x_edit = x_src + mask · (x_edit − x_src).

The per-step attention plans are built once, from device tensors, before the loop; the
loop only picks one per step (no host syncs, no re-planning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.attention import AttentionPlan, CrossMix
from ..pipeline import Guidance
from ..prompts import Conditioning, as_list
from ..sampling import make_sampler
from .p2p_align import align, token_ids, token_mask, word_token_indices

EDIT_TYPES = ("replace", "refine", "reweight")


def _window(value, n: int, what: str) -> tuple[int, int]:
    """A fraction f (-> [0, f)) or a pair (f0, f1) of the steps -> integer [start, end) over n."""
    lo, hi = (0.0, value) if isinstance(value, (int, float)) else tuple(value)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{what} must be a fraction in [0, 1] or a pair 0 <= start <= end <= 1, got {value!r}")
    return int(lo * n), int(hi * n)


def cross_alphas(tokenizer, targets: list[str], steps: int, cross_replace_steps, length: int) -> torch.Tensor:
    """a [S, B, L]: 1 where target token j borrows the source's cross-attention at step i.

    As P2P's ``get_time_words_attention_alpha``: the table has S+1 rows, so a fraction f
    covers steps [0, int(f·(S+1))); a dict {word: fraction or (start, end)} overrides the
    window for that word's tokens (in the target prompt), "default_" sets the rest
    (default (0, 1) when a dict is given)."""
    spec = dict(cross_replace_steps) if isinstance(cross_replace_steps, dict) else {"default_": cross_replace_steps}
    spec.setdefault("default_", (0.0, 1.0))
    a = torch.zeros(steps + 1, len(targets), length)
    s, e = _window(spec.pop("default_"), steps + 1, "cross_replace_steps")
    a[s:e] = 1.0
    for word, value in spec.items():
        s, e = _window(value, steps + 1, f"cross_replace_steps[{word!r}]")
        for b, prompt in enumerate(targets):
            idx = word_token_indices(tokenizer, prompt, word)
            if not idx:
                raise ValueError(f"cross_replace_steps: word {word!r} is not in the target prompt {prompt!r}")
            a[:, b, idx] = 0.0
            a[s:e, b, idx] = 1.0
    return a[:steps]


def blend_layers(unet, resolution: int, latent_hw: tuple[int, int]) -> list:
    """Cross-attention layers of the down and up blocks whose query grid is nearest
    ``resolution`` (P2P: SD's five 16×16 layers, ``down_cross[2:4] + up_cross[:3]``)."""
    import math

    cands = [l for l in unet.attn_layers if l.cross and l.place in ("down", "up")]
    if not cands:
        raise ValueError("local blending needs cross-attention layers in the down or up blocks")
    side = lambda l: min(latent_hw) / l.scale  # noqa: E731
    best = min(abs(math.log2(side(l) / resolution)) for l in cands)
    near = [l for l in cands if abs(math.log2(side(l) / resolution)) == best]
    smallest = max(l.scale for l in near)  # a tie between two levels: the coarser, as P2P's 16² over 32²
    return [l for l in near if l.scale == smallest]


def _grid(h: int, w: int, scale: int) -> tuple[int, int]:
    while scale > 1:  # stride-2 convs with padding 1: ceil(h / 2) per level
        h, w, scale = (h + 1) // 2, (w + 1) // 2, scale // 2
    return h, w


def _sampler(pipe, inv, skip):
    """The inversion's sampler and the first step to run: DDIM (eta 0) for "ddim"; for
    "ddpm" (edit-friendly, engine.editing.ddpm) DDIM with the inversion's eta, driven by
    the stored noise maps, from step int(skip·S)."""
    if inv.method == "ddim":
        smp, start = make_sampler("ddim", pipe.schedule, inv.steps, device=pipe.device), 0
    else:
        if inv.noise is None:
            raise ValueError("this 'ddpm' inversion has no noise maps")
        eta = float(inv.settings.get("eta", 1.0))
        smp = make_sampler("ddim", pipe.schedule, inv.steps, eta=eta, device=pipe.device)
        skip = inv.settings.get("skip", 0.0) if skip is None else skip
        start = int(inv.steps * skip)
    if not torch.equal(smp.timesteps.cpu().long(), inv.timesteps.cpu().long()):
        raise ValueError(f"cannot rebuild the {inv.method} steps of this inversion with this pipeline's schedule")
    return smp, start


@torch.no_grad()
def edit(pipe, inv, target_prompt=None, *, guidance_scale: float | None = None, cross_replace_steps=0.8,
         self_replace_steps=0.4, edit_type: str | None = None, equalizer: dict | None = None,
         reweight: dict | None = None, local_blend_words=None, blend_threshold: float = 0.3,
         blend_start: float = 0.2, blend_resolution: int = 16, self_replace_min_scale: int = 4,
         negative_prompt=None, source: str = "denoise", skip: float | None = None, callback=None,
         progress: bool = True):
    """Prompt-to-Prompt edit of ``inv`` (a "ddim" or "ddpm" :class:`Inversion`) towards
    ``target_prompt``; returns the edited latents [B, C, h, w].

    guidance_scale: classifier-free guidance of both branches (default: the inversion's,
        as the plain DDIM edit; P2P's paper uses 7.5).
    cross_replace_steps: fraction (or (start, end), or {word: fraction, "default_": ...})
        of the steps in which the edit borrows the source's cross-attention.
    self_replace_steps: fraction (or (start, end)) of the steps with self-attention injection.
    edit_type: "replace" (word swap; same token count), "refine" (added/removed words;
        token alignment) or "reweight" (``equalizer`` on a same-length prompt); None:
        replace when the token counts agree, else refine.
    equalizer / reweight: {word (of the target prompt): weight} scaling the borrowed
        cross-attention of those tokens while it is borrowed (combines with replace and
        refine, as P2P's AttentionReweight with a previous controller).
    local_blend_words: (source words, target words) to blend locally, or None.
    blend_threshold, blend_start, blend_resolution: mask threshold, first blended step
        (fraction), query grid side whose maps make the mask (nearest available).
    self_replace_min_scale: self-attention is replaced at layers downsampled at least
        this much from the latent (4 = P2P's 16² layers at SD 512).
    source: "denoise" (the source branch denoises with the source prompt; with equal
        prompts the result is exactly the plain regeneration) or "inversion" (the source
        rows read the stored inversion latents each step: its exact trajectory).
    skip: "ddpm" only, the fraction of the noisiest steps not run (default: the inversion's);
        the step fractions above count the steps that run.
    callback: gets dict(i, t, x [2B: source rows, then edit rows], mask or None,
        maps {layer: stored maps [rows, Nq, L]} or None) after each step.
    """
    if inv.method not in ("ddim", "ddpm"):
        raise ValueError(f"p2p edits a 'ddim' or 'ddpm' inversion, got {inv.method!r}")
    if source not in ("denoise", "inversion"):
        raise ValueError(f"source must be 'denoise' or 'inversion', got {source!r}")
    if guidance_scale is None:
        guidance_scale = float(inv.settings.get("guidance_scale", 1.0))
    if equalizer is not None and reweight is not None:
        raise ValueError("pass the equalizer as equalizer= or reweight=, not both")
    equalizer = equalizer if equalizer is not None else reweight
    smp, start = _sampler(pipe, inv, skip)
    dev, S, B = pipe.device, inv.steps - start, inv.latents.shape[1]  # S: the steps we run
    tok, L = pipe.tokenizers[0], inv.source.context.shape[1]
    sources = as_list(inv.settings.get("prompt", ""), B, "inversion prompt")
    targets = as_list(sources if target_prompt is None else target_prompt, B, "target_prompt")

    # ---- what each edit token borrows: mapper [B, L], aligned m [B, L], equalizer eq [B, L]
    src_ids, tgt_ids = [token_ids(tok, p) for p in sources], [token_ids(tok, p) for p in targets]
    same = all(len(s) == len(t) for s, t in zip(src_ids, tgt_ids))
    edit_type = edit_type or ("replace" if same else "refine")
    if edit_type not in EDIT_TYPES:
        raise ValueError(f"edit_type must be one of {EDIT_TYPES}, got {edit_type!r}")
    if edit_type in ("replace", "reweight") and not same:
        raise ValueError(
            f"edit_type={edit_type!r} needs source and target prompts with the same token count, got "
            f"{[len(s) - 2 for s in src_ids]} and {[len(t) - 2 for t in tgt_ids]}: use edit_type='refine' "
            f"to add or remove words")
    if edit_type == "reweight" and not equalizer:
        raise ValueError("edit_type='reweight' needs equalizer={word: weight}")
    if edit_type == "refine":
        pairs = [align(s, t, L) for s, t in zip(src_ids, tgt_ids)]
        mapper = torch.stack([p[0] for p in pairs])  # [B, L]
        m = torch.stack([p[1] for p in pairs])  # [B, L]
    else:
        mapper, m = None, torch.ones(B, L)
    eq = torch.ones(B, L)
    for word, weight in (equalizer or {}).items():
        for b, prompt in enumerate(targets):
            eq[b] = torch.where(token_mask(tok, prompt, word, L, "equalizer") > 0, float(weight), eq[b])
    a = cross_alphas(tok, targets, S, cross_replace_steps, L)  # [S, B, L]
    self_lo, self_hi = _window(self_replace_steps, S, "self_replace_steps")

    # ---- rows: [uncond_src, uncond_edit, cond_src, cond_edit] (or the cond rows alone)
    cfg = guidance_scale > 1.0
    n = 4 * B if cfg else 2 * B
    c0 = 2 * B if cfg else 0  # first cond_src row
    edit_rows = torch.arange(c0 + B, c0 + 2 * B)
    from_rows = torch.arange(n)
    from_rows[edit_rows] = torch.arange(c0, c0 + B)  # [N]: edit cond rows read the source's
    from_rows = from_rows.to(dev)
    unet = pipe.unet
    cross_idx = {l.index for l in unet.attn_layers if l.cross}
    self_idx = {l.index for l in unet.attn_layers if not l.cross and l.scale >= self_replace_min_scale}

    h, w = inv.latents.shape[-2:]
    blend = None
    if local_blend_words is not None:
        src_words, tgt_words = local_blend_words
        layers = blend_layers(unet, blend_resolution, (h, w))
        gh, gw = _grid(h, w, layers[0].scale)
        words = torch.stack([token_mask(tok, p, src_words, L, "local_blend_words") for p in sources]
                            + [token_mask(tok, p, tgt_words, L, "local_blend_words") for p in targets])  # [2B, L]
        store = {l.index: torch.zeros(n, gh * gw, L, device=dev) for l in layers}  # [N, Nq, L] each
        blend = dict(store=store, words=words.to(dev), grid=(gh, gw), start=int(blend_start * S),
                     threshold=blend_threshold, acc=torch.zeros(2 * B, gh * gw, L, device=dev))

    plans, cache = [], {}
    for i in range(S):
        a_i, self_on = a[i], self_lo <= i < self_hi  # [B, L]
        key = (a_i.numpy().tobytes(), self_on)
        if key not in cache:
            cache[key] = _plan(a_i, self_on, mapper, m, eq, n, c0, B, from_rows, cross_idx, self_idx,
                               blend["store"] if blend else {}, dev)
        plans.append(cache[key])

    # ---- conditioning and the loop
    src = inv.source if len(inv.source) == B else pipe.encode_prompt(sources, guidance=False)[0]
    target = pipe.encode_prompt(targets, guidance=False)[0]
    both = Conditioning.cat([src, target]).to(dev, pipe.dtype)  # [2B, ...]: source rows, edit rows
    uncond = None
    if cfg:
        neg = inv.settings.get("negative_prompt") if negative_prompt is None else negative_prompt
        uncond = inv.uncond
        if negative_prompt is not None or uncond is None or len(uncond) != B:
            uncond = pipe.encode_prompt(sources, neg, guidance=True)[1]
        uncond = Conditioning.cat([uncond, uncond]).to(dev, pipe.dtype)
    f = pipe.vae_scale_factor
    g = Guidance(both, uncond, pipe.time_ids(2 * B, h * f, w * f), guidance_scale if cfg else 1.0)
    # The pipeline's guided step (rows [uncond_src, uncond_edit, src, edit] with guidance),
    # one closure per distinct plan.
    step_fn = {id(p): pipe.model_fn(g, p) for p in plans}
    lat = inv.latents[start:].to(dev, torch.float32)  # [S+1, B, C, h, w]; latents stay float32
    noise = None if inv.noise is None else inv.noise[start:].to(dev, pipe.dtype)  # [S, B, C, h, w]
    off = start
    x = torch.cat([lat[0], lat[0]])  # [2B, C, h, w]: source rows, edit rows
    for i in tqdm(range(S), disable=not progress):
        plan, t = plans[i], smp.timesteps[off + i].expand(2 * B)  # [2B]
        out = step_fn[id(plan)](x, t)  # [2B, C, h, w]
        z = None
        if inv.method == "ddpm" and smp.needs_noise(off + i):
            z = noise[i].repeat(2, 1, 1, 1)  # [2B, ...]: the stored maps drive both branches
        x, _ = smp.step(off + i, x, out, None, z)
        if source == "inversion":
            x = torch.cat([lat[i + 1], x[B:]])
        mask = None
        if blend is not None:
            mask = _blend_mask(blend, c0, B, (h, w))  # [B, 1, h, w]
            if i >= blend["start"]:
                x = torch.cat([x[:B], x[:B] + mask.to(x.dtype) * (x[B:] - x[:B])])
        if callback is not None:
            callback(dict(i=i, t=t, x=x, mask=mask, maps=blend["store"] if blend else None))
    return x[B:]


def _plan(a_i, self_on, mapper, m, eq, n, c0, B, from_rows, cross_idx, self_idx, store, dev) -> AttentionPlan:
    """One step's AttentionPlan. Edit token j's probability is
    alpha_j·P_src(mapper_j) + beta_j·P_edit(j), with (P2P's edit controller, refine and
    reweight folded in) alpha = a·eq·m and beta = a·eq·(1−m) + (1−a)."""
    mix = None
    if a_i.any():
        alpha_e = a_i * eq * m  # [B, L]
        beta_e = a_i * eq * (1 - m) + (1 - a_i)  # [B, L]
        rows = slice(c0 + B, c0 + 2 * B)
        alpha = torch.ones(n, a_i.shape[1])  # [N, L]: rows other than the edit's keep their own (from = self)
        alpha[rows] = alpha_e
        beta = torch.zeros(n, a_i.shape[1])
        beta[rows] = beta_e
        index = None
        if mapper is not None:
            index = torch.arange(a_i.shape[1]).repeat(n, 1)  # [N, L]
            index[rows] = mapper
        mix = CrossMix(
            q_from=from_rows, k_from=from_rows,
            index=None if index is None else index.to(dev),
            alpha=None if bool((alpha == 1).all()) else alpha.to(dev),
            beta=None if bool((beta == 0).all()) else beta.to(dev),
            own=(c0 + B, c0 + 2 * B),
        )
    self_inject = {"q_from": from_rows, "k_from": from_rows} if self_on and self_idx else None
    layers = frozenset(cross_idx | (self_idx if self_on else set()))
    return AttentionPlan(self_inject=self_inject, layers=layers, store=store, cross_mix=mix)


def _blend_mask(blend, c0: int, B: int, size) -> torch.Tensor:
    """P2P's LocalBlend on the maps summed so far: [B, 1, h, w] in {0, 1}."""
    acc = blend["acc"]
    for buf in blend["store"].values():
        acc += buf[c0:c0 + 2 * B]  # [2B, Nq, L]: cond rows, source then edit (own maps)
    maps = (acc * blend["words"][:, None, :]).sum(-1).view(2 * B, 1, *blend["grid"])  # [2B, 1, gh, gw]
    maps = F.max_pool2d(maps, 3, 1, padding=1)
    maps = F.interpolate(maps, size=size)  # nearest, as P2P
    maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-20)
    mask = maps > blend["threshold"]
    return (mask[:B] | mask[B:]).to(acc.dtype)  # the source's region and the edit's
