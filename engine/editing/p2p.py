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
  applied to the edit's values (kernel ``q_from``/``k_from``), at layers with few queries.
  The official rule is ``Nq <= 16**2`` (SD's 16×16 and 8×8 layers at 512²); we scale that
  count with the latent (at most the queries of the grid 4x below it, ~h·w/16), so the same
  layers are picked at any resolution and on SDXL, where the absolute count picks others.
* local blending: the kernel stores head-averaged cross-attention maps of the blend
  layers (down/up layers at the resolution nearest 16×16, as P2P) into our buffers; they
  are summed over layers and steps, and from step ``blend_start``·S on the mask
  (words' maps, 3×3 max-pool, nearest upsample, divided by its max, > threshold, union
  of the source's and the edit's) keeps the source outside it:
  x_edit = x_src + mask · (x_edit − x_src). The edit rows' maps are their own softmax by
  default; ``blend_maps="edited"`` sums the maps after replacement instead, as the
  official attention store does (its controller edits the stored probabilities in place).

The edit is a :class:`P2PEdit` program on the one loop: the per-step attention plans are
built once, before the loop, and the program hands out one per step (no host syncs, no
re-planning); other programs' rows may share its model calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.attention import AttentionPlan, CrossMix
from .branches import SOURCES, BranchEdit, branch_guidance, branch_prompts
from .common import run_one
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


def layer_grid(h: int, w: int, scale: int) -> tuple[int, int]:
    """The query grid of a layer downsampled ``scale``x from an h x w latent."""
    while scale > 1:  # stride-2 convs with padding 1: ceil(h / 2) per level
        h, w, scale = (h + 1) // 2, (w + 1) // 2, scale // 2
    return h, w


class P2PEdit(BranchEdit):
    """Prompt-to-Prompt's two branches: the plan of step k borrows the source's attention;
    after the update the local blend keeps the source outside the mask."""

    def __init__(self, pipe, g, rp, plans, blend, source: str, callback=None, uncond_steps=None):
        super().__init__(pipe, g, rp, plans, source, callback, uncond_steps)
        self.blend, self.mask = blend, None

    def after_update(self, i):
        super().after_update(i)
        k, b, x = i - self.i0, self.b, self.x
        if self.blend is not None:
            self.mask = _blend_mask(self.blend, self.blend["c0"], b, tuple(x.shape[-2:]))  # [B, 1, h, w]
            if k >= self.blend["start"]:
                self.x = torch.cat([x[:b], x[:b] + self.mask.to(x.dtype) * (x[b:] - x[:b])])

    def report(self, i):
        return dict(super().report(i), mask=self.mask, maps=self.blend["store"] if self.blend else None)


def edit_program(pipe, inv, target_prompt=None, *, guidance_scale: float | None = None,
                 source_guidance_scale: float | None = None, cross_replace_steps=0.8, self_replace_steps=0.4,
                 edit_type: str | None = None, equalizer: dict | None = None, reweight: dict | None = None,
                 local_blend_words=None, blend_threshold: float = 0.3, blend_start: float = 0.2,
                 blend_resolution: int = 16, blend_maps: str = "own", self_replace_max_queries: int | None = None,
                 self_replace_min_scale: int | None = None, negative_prompt=None, source: str = "denoise",
                 skip: float | None = None, callback=None, image_prompt=None) -> P2PEdit:
    """Prompt-to-Prompt edit of ``inv`` (an :class:`Inversion` that replays: "ddim" or "ddpm")
    towards ``target_prompt``; the program's result is the edited latents [B, C, h, w].

    guidance_scale: classifier-free guidance of the edit branch (default: the inversion's,
        as the plain DDIM edit; P2P's paper uses 7.5). source_guidance_scale: the source
        branch's (default: guidance_scale). On an edit-friendly DDPM inversion the official
        recipe guides the source with the inversion's scale (3.5), so that it retraces the
        inversion, and the edit with 15.
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
    blend_maps: which maps of the edit rows the mask sums: "own" (the rows' own softmax,
        before replacement) or "edited" (after replacement: during cross-replace steps the
        borrowed source maps, as the official attention store, which the controller edits
        in place).
    self_replace_max_queries: self-attention is replaced at layers with at most this many
        queries. Default: P2P's rule ``Nq <= 16**2`` at SD's 64×64 latent, scaled to the
        latent (the query count of the grid 4x below it, ~h·w/16), so it picks the same layers
        at any resolution and model.
        self_replace_min_scale: instead, layers downsampled at least this much.
    source: "denoise" (the source branch denoises with the source prompt; with equal
        prompts the result is exactly the plain regeneration) or "inversion" (the source
        rows read the stored inversion latents each step: its exact trajectory).
    skip: noise-map inversions only, the fraction of the noisiest steps not run (default:
        the inversion's); the step fractions above count the steps that run (the official
        code counts all steps and applies them from the first step run).
    callback: gets dict(i, t, x [2B: source rows, then edit rows], mask or None,
        maps {layer: stored maps [rows, Nq, L]} or None) after each step.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be 'denoise' or 'inversion', got {source!r}")
    if blend_maps not in ("own", "edited"):
        raise ValueError(f"blend_maps must be 'own' or 'edited', got {blend_maps!r}")
    if self_replace_max_queries is not None and self_replace_min_scale is not None:
        raise ValueError("give self_replace_max_queries or self_replace_min_scale, not both")
    if guidance_scale is None:
        guidance_scale = float(inv.settings.get("guidance_scale", 1.0))
    if source_guidance_scale is None:
        source_guidance_scale = guidance_scale
    if equalizer is not None and reweight is not None:
        raise ValueError("pass the equalizer as equalizer= or reweight=, not both")
    equalizer = equalizer if equalizer is not None else reweight
    rp = inv.replay(pipe.schedule, pipe.device, pipe.dtype, skip)
    dev, S, B = pipe.device, rp.steps, rp.x.shape[0]  # S: the steps we run
    tok, L = pipe.tokenizers[0], inv.source.context.shape[1]
    sources, targets = branch_prompts(inv, target_prompt, B)

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
    cfg = max(guidance_scale, source_guidance_scale) > 1.0
    n = 4 * B if cfg else 2 * B
    c0 = 2 * B if cfg else 0  # first cond_src row
    edit_rows = torch.arange(c0 + B, c0 + 2 * B)
    from_rows = torch.arange(n)
    from_rows[edit_rows] = torch.arange(c0, c0 + B)  # [N]: edit cond rows read the source's
    from_rows = from_rows.to(dev)
    unet = pipe.unet
    h, w = rp.x.shape[-2:]
    cross_idx = {l.index for l in unet.attn_layers if l.cross}
    self_idx = {l.index for l in unet.attn_layers
                if not l.cross and _self_replaced(l, (h, w), self_replace_max_queries, self_replace_min_scale)}

    blend = None
    if local_blend_words is not None:
        src_words, tgt_words = local_blend_words
        layers = blend_layers(unet, blend_resolution, (h, w))
        gh, gw = layer_grid(h, w, layers[0].scale)
        words = torch.stack([token_mask(tok, p, src_words, L, "local_blend_words") for p in sources]
                            + [token_mask(tok, p, tgt_words, L, "local_blend_words") for p in targets])  # [2B, L]
        store = {l.index: torch.zeros(n, gh * gw, L, device=dev) for l in layers}  # [N, Nq, L] each
        blend = dict(store=store, words=words.to(dev), grid=(gh, gw), start=int(blend_start * S), c0=c0,
                     threshold=blend_threshold, acc=torch.zeros(2 * B, gh * gw, L, device=dev))

    plans, cache = [], {}
    for i in range(S):
        a_i, self_on = a[i], self_lo <= i < self_hi  # [B, L]
        key = (a_i.numpy().tobytes(), self_on)
        if key not in cache:
            cache[key] = _plan(a_i, self_on, mapper, m, eq, n, c0, B, from_rows, cross_idx, self_idx,
                               blend["store"] if blend else {}, dev, blend_maps == "edited")
        plans.append(cache[key])

    g = branch_guidance(pipe, inv, sources, targets, guidance_scale, source_guidance_scale, negative_prompt,
                        image_prompt)
    nulls = inv.uncond_steps(rp.start, negative_prompt) if g.guided else None  # null-text: ∅_t per step
    return P2PEdit(pipe, g, rp, plans, blend, source, callback, nulls)


@torch.no_grad()
def edit(pipe, inv, target_prompt=None, *, progress: bool = True, **params):
    """Prompt-to-Prompt edit (see :func:`edit_program`); returns the edited latents [B, C, h, w]."""
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)


def _self_replaced(layer, latent_hw, max_queries, min_scale) -> bool:
    if min_scale is not None:
        return layer.scale >= min_scale
    gh, gw = layer_grid(*latent_hw, layer.scale)
    if max_queries is None:  # the official 16² at SD's 64² latent: the query grid 4x below the latent's
        qh, qw = layer_grid(*latent_hw, 4)
        max_queries = qh * qw
    return gh * gw <= max_queries


def _plan(a_i, self_on, mapper, m, eq, n, c0, B, from_rows, cross_idx, self_idx, store, dev,
          edited_maps: bool = False) -> AttentionPlan:
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
            own=(c0 + B, c0 + 2 * B), edited_maps=edited_maps,
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
