"""MasaCtrl: mutual self-attention control (Cao et al. 2023, "MasaCtrl: Tuning-Free Mutual
Self-Attention Control for Consistent Image Synthesis and Editing"), for SD and SDXL.

The source branch (the inverted image under its prompt) and the edit branch (the target
prompt) denoise side by side (:class:`~engine.editing.branches.BranchEdit`); from step
``start_step`` on, in the self-attention layers from ``start_layer`` on (counted over the
UNet's self-attention layers in forward order: SD has 16, SDXL 70), the edit's queries read
the *source's* keys and values -- the kernel's ``k_from``/``v_from``, for the unconditional
and the conditional rows alike -- so the edit keeps the source's content while its layout
follows the target prompt. Defaults as the reference code: ``start_step=4``,
``start_layer=10`` on SD (44 on SDXL's 70 layers, as its SDXL example); other layouts take
the same fraction of their layers.

Mask-guided variant (``mask_words``): the reference's MaskAuto control. The source's and
the edit's foreground masks come from head-averaged cross-attention maps of the
conditional rows at the layers nearest 16×16 (stored by the kernel), summed over the words'
tokens, min-max normalised and thresholded at ``mask_threshold`` (0.1); the edit's
foreground queries read only the source's foreground keys, its background queries only
the background ones (:class:`~engine.models.attention.KeyMask`). The reference builds the
masks from the maps of the layers already run in the same forward pass; ours come from the
previous step's forward (the program rewrites the mask tensors in place after each step),
so the first masked step needs ``start_step >= 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.attention import AttentionPlan, KeyMask
from .branches import BranchEdit, branch_guidance, branch_prompts
from .common import run_one
from .p2p import blend_layers, layer_grid
from .p2p_align import token_mask

SD_LAYERS, SD_START_LAYER = 16, 10


def default_start_layer(n_self: int) -> int:
    """The reference's 10 of SD's 16 self-attention layers, as a fraction: 44 of SDXL's 70."""
    return round(SD_START_LAYER / SD_LAYERS * n_self)


class MasaCtrlEdit(BranchEdit):
    """The two branches; with masks, they are rebuilt after every step from the stored maps."""

    def __init__(self, pipe, g, rp, plans, source, masks=None, callback=None, uncond_steps=None):
        super().__init__(pipe, g, rp, plans, source, callback, uncond_steps)
        self.masks = masks

    def after_update(self, i):
        super().after_update(i)
        m = self.masks
        if m is None:
            return
        c0, b = self.cond_row0, self.b
        acc = sum(buf[c0:c0 + 2 * b] for buf in m["store"].values())  # [2B, Nq, L]: cond source, cond edit
        maps = (acc * m["words"][:, None, :]).sum(-1).view(2 * b, 1, *m["grid"])  # [2B, 1, gh, gw]
        lo, hi = maps.amin(dim=(2, 3), keepdim=True), maps.amax(dim=(2, 3), keepdim=True)
        maps = (maps - lo) / (hi - lo).clamp_min(1e-20)
        fg = (F.interpolate(maps, size=tuple(self.x.shape[-2:]), mode="nearest")[:, 0] >= m["threshold"])
        fg = fg.to(m["key_fg"].dtype)  # [2B, h, w]
        src, edit = fg[:b], fg[b:]
        copies = m["key_fg"].shape[0] // b  # one mask block per uncond / cond edit rows
        m["key_fg"].copy_(src.repeat(copies, 1, 1))
        m["query_fg"].copy_(edit.repeat(copies, 1, 1))

    def report(self, i):
        out = super().report(i)
        if self.masks is not None:
            out["masks"] = (self.masks["key_fg"][:self.b], self.masks["query_fg"][:self.b])
        return out


def edit_program(pipe, inv, target_prompt=None, *, guidance_scale: float = 7.5,
                 source_guidance_scale: float | None = None, start_step: int = 4, start_layer: int | None = None,
                 end_step: int | None = None, end_layer: int | None = None, mask_words=None,
                 mask_threshold: float = 0.1, mask_resolution: int = 16, negative_prompt=None,
                 source: str = "denoise", callback=None) -> MasaCtrlEdit:
    """MasaCtrl edit of a DDIM inversion ``inv`` towards ``target_prompt``; the program's result
    is the edited latents [B, C, h, w].

    start_step / end_step: the steps run (counted from the first) with mutual self-attention,
        [start_step, end_step) (end default: all). start_layer / end_layer: the
        self-attention layers, in forward order (default: the reference's 10 of 16, the same
        fraction of other UNets, to the last).
    mask_words: (source words, target words) for the mask-guided variant, or None.
    mask_threshold / mask_resolution: mask threshold after min-max normalisation; the query
        grid whose cross-attention maps make the masks (the nearest available).
    source: "denoise" (the source branch denoises with the source prompt, as the reference)
        or "inversion" (it replays the inversion's stored latents).
    With ``start_step`` past the last step the edit equals two plain DDIM regenerations.
    """
    if inv.noise is not None:
        raise ValueError("MasaCtrl regenerates a DDIM inversion; invert with method='ddim'")
    source_guidance_scale = guidance_scale if source_guidance_scale is None else source_guidance_scale
    rp = inv.replay(pipe.schedule, pipe.device, pipe.dtype)
    dev, S, B = pipe.device, rp.steps, rp.x.shape[0]
    sources, targets = branch_prompts(inv, target_prompt, B)
    g = branch_guidance(pipe, inv, sources, targets, guidance_scale, source_guidance_scale, negative_prompt)
    unet = pipe.unet
    selfs = [l for l in unet.attn_layers if not l.cross]
    lo = default_start_layer(len(selfs)) if start_layer is None else start_layer
    hi = len(selfs) if end_layer is None else end_layer
    if not 0 <= lo <= hi <= len(selfs):
        raise ValueError(f"MasaCtrl layers [{lo}, {hi}) must lie within the model's {len(selfs)} self-attention layers")
    if not 0 <= start_step:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    layers = frozenset(l.index for l in selfs[lo:hi])

    n = 4 * B if g.guided else 2 * B
    reads = torch.arange(n)
    for u in range(0, n, 2 * B):  # each [source x B, edit x B] block: the edit rows read the source's
        reads[u + B:u + 2 * B] = torch.arange(u, u + B)
    reads = reads.to(dev)

    masks, key_masks, store = None, {}, {}
    if mask_words is not None:
        if start_step < 1:
            raise ValueError("mask-guided MasaCtrl builds its masks from the previous step's maps: start_step >= 1")
        src_words, tgt_words = mask_words
        tok, L = pipe.tokenizers[0], inv.source.context.shape[1]
        h, w = rp.x.shape[-2:]
        blayers = blend_layers(unet, mask_resolution, (h, w))
        gh, gw = layer_grid(h, w, blayers[0].scale)
        words = torch.stack([token_mask(tok, p, src_words, L, "mask_words") for p in sources]
                            + [token_mask(tok, p, tgt_words, L, "mask_words") for p in targets])  # [2B, L]
        store = {l.index: torch.zeros(n, gh * gw, L, device=dev) for l in blayers}  # [N, Nq, L] each
        blocks = n // (2 * B)
        key_fg = torch.ones(blocks * B, h, w, device=dev)  # [n_edit_rows, h, w], rewritten after each step
        query_fg = torch.ones(blocks * B, h, w, device=dev)
        masks = dict(store=store, words=words.to(dev), grid=(gh, gw), threshold=mask_threshold,
                     key_fg=key_fg, query_fg=query_fg)
        # the masked rows: the edit rows of each block (uncond edit, cond edit), contiguous per block
        key_masks = tuple(KeyMask(key_fg[j * B:(j + 1) * B], query_fg[j * B:(j + 1) * B],
                                  (j * 2 * B + B, j * 2 * B + 2 * B)) for j in range(blocks))
    on = AttentionPlan(self_inject={"k_from": reads, "v_from": reads}, layers=layers, store=store,
                       key_masks={i: key_masks for i in layers} if key_masks else {})
    off = AttentionPlan(layers=frozenset(), store=store) if store else None
    stop = S if end_step is None else end_step
    plans = [on if start_step <= k < stop else off for k in range(S)]
    nulls = inv.uncond_steps(rp.start, negative_prompt) if g.guided else None  # null-text: ∅_t per step
    return MasaCtrlEdit(pipe, g, rp, plans, source, masks, callback, nulls)


@torch.no_grad()
def edit(pipe, inv, target_prompt=None, *, progress: bool = True, **params):
    """MasaCtrl edit (see :func:`edit_program`); returns the edited latents [B, C, h, w]."""
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)
