"""The attention seam: every attention call of every executor goes through here.

Editing methods never patch modules. They describe what they want as data, an
:class:`AttentionPlan`, which the executor passes down with the inputs; each
attention layer asks the plan for its instructions (rows to read queries, keys
or values from, token re-weighting, a buffer to store head-averaged maps into,
IP-Adapter image tokens) and hands them to one fused kernel,
:func:`kernels.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import kernels


@dataclass(frozen=True)
class AttnLayer:
    """Identity of one attention layer, fixed when the model is built."""

    index: int  # position among all attention layers, in forward order
    name: str  # diffusers' module path, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    cross: bool  # cross-attention (keys from the text) or self-attention
    place: str  # "down", "mid" or "up"
    scale: int = 1  # spatial downsampling vs the latent: the layer sees (h/scale)*(w/scale) queries


@dataclass(frozen=True)
class CrossMix:
    """Cross-attention that mixes borrowed and own probabilities, per key token.

    Row b's output is  Σ_j [alpha_bj · P_{r}(index_bj) + beta_bj · P_b(j)] · v_bj,
    where P_r are the softmax probabilities of row r = q_from[b] (queries) and
    k_from[b] (keys), and P_b the row's own. This is Prompt-to-Prompt's edited
    cross-attention (Hertz et al. 2022, Sec. 3.2): word swap (index = identity,
    alpha = 1), refinement (index = the token alignment, alpha = 1 on aligned
    tokens, beta = 1 on new ones), re-weighting (alpha scaled by the equalizer).
    Because Σ_j alpha_j P_r(index_j) v_j = Σ_i P_r(i) ṽ_i with ṽ_i = Σ_{j: index_j=i}
    alpha_j v_j, the borrowed term is one ordinary attention call on scattered
    values (a [B, H, Nk, D] tensor); the own term is a second call on beta·v for
    the rows in ``own`` only. Weights multiply values, not probabilities: the same
    product, and it keeps the fast path (no token_weights) for unweighted calls.
    """

    q_from: torch.Tensor  # [B] int: row whose queries give the borrowed probabilities
    k_from: torch.Tensor  # [B] int: row whose keys give them
    index: torch.Tensor | None = None  # [B, Nk] int64: token of row k_from each token j borrows; None: j itself
    alpha: torch.Tensor | None = None  # [B, Nk]: weight of the borrowed probability; None: 1
    beta: torch.Tensor | None = None  # [B, Nk]: weight of the own probability (0 outside ``own``); None: 0
    own: tuple = (0, 0)  # rows [start, stop) that have an own term; merged batches: ((start, stop, edited), ...)
    edited_maps: bool = False  # store the mixed (edited) maps of the ``own`` rows instead of their own maps

    def own_ranges(self) -> tuple:
        """((start, stop, edited_maps), ...): the row ranges with an own term."""
        if not self.own or isinstance(self.own[0], tuple):
            return tuple(self.own)
        s, e = self.own
        return ((s, e, self.edited_maps),) if e > s else ()


@dataclass(frozen=True)
class KeyMask:
    """Mask-guided mutual self-attention (MasaCtrl, Cao et al. 2023, Sec. 4.3): rows
    [start, stop) read the keys/values their injection names (``k_from``/``v_from``); a query
    where ``query_fg`` is 1 reads only the keys inside ``key_fg``, one where it is 0 only
    those outside (the kernel's key / query classes, one call). Masks are at the
    latent's resolution, resized (nearest) to each layer's grid; the program may overwrite
    them in place between steps (the plan keeps the tensors, not copies)."""

    key_fg: torch.Tensor  # [n, h, w] {0, 1}: foreground of the rows whose keys are read
    query_fg: torch.Tensor  # [n, h, w] {0, 1}: where the reading rows' queries take the foreground read
    rows: tuple = (0, 0)  # rows [start, stop) of the call


@dataclass
class AttentionPlan:
    """Per-forward attention instructions, passed as data through the executor.

    ``self_inject`` / ``cross_inject``: kernel keyword arguments (``q_from``,
    ``k_from``, ``v_from``: int tensors [B]) applied to self- or cross-attention
    layers whose index is in ``layers`` (all layers when ``layers`` is None).
    ``token_weights`` [B, Nk] re-weights cross-attention probabilities.
    ``store`` maps a layer index to a caller-owned buffer [B, Nq, Nk] receiving
    head-averaged cross-attention probabilities. ``ip`` holds IP-Adapter image
    tokens per layer index: ``(k_img, v_img, scale)``.
    ``cross_mix``: a :class:`CrossMix` for the cross-attention layers in ``layers``
    (it takes the place of ``cross_inject`` there; see :meth:`mix`).
    ``features`` maps a :class:`~engine.models.features.FeatureSite` index to rows [B]:
    row b takes the features of row ``rows[b]`` there (Plug-and-Play's ResNet features).
    ``key_masks`` maps a self-attention layer index to a :class:`KeyMask` (mask-guided
    MasaCtrl): that layer's call carries the masks as the kernel's key / query classes.
    """

    self_inject: dict | None = None
    cross_inject: dict | None = None
    layers: frozenset[int] | None = None
    token_weights: torch.Tensor | None = None
    store: dict[int, torch.Tensor] = field(default_factory=dict)
    ip: dict[int, tuple] = field(default_factory=dict)
    cross_mix: CrossMix | None = None
    features: dict[int, torch.Tensor] = field(default_factory=dict)
    key_masks: dict = field(default_factory=dict)

    def feature_rows(self, site) -> torch.Tensor | None:
        return self.features.get(site.index)

    def key_mask(self, layer: AttnLayer):
        return self.key_masks.get(layer.index)

    def mix(self, layer: AttnLayer) -> CrossMix | None:
        """The composite this layer runs instead of one kernel call, or None."""
        if self.cross_mix is not None and layer.cross and (self.layers is None or layer.index in self.layers):
            return self.cross_mix
        return None

    def args(self, layer: AttnLayer) -> dict:
        """Kernel keyword arguments for ``layer`` (for a mixed layer: those of its first call)."""
        out: dict = {}
        active = self.layers is None or layer.index in self.layers
        inject = self.cross_inject if layer.cross else self.self_inject
        if layer.cross and self.mix(layer) is not None:
            inject = None  # the mix says which rows to read probabilities from
        if active and inject:
            out.update(inject)
        if layer.cross and active and self.token_weights is not None:
            out["token_weights"] = self.token_weights
        if layer.index in self.store:
            out["store"] = self.store[layer.index]
        if layer.index in self.ip:
            out["ip"] = self.ip[layer.index]
        return out


@dataclass
class PlanOverlay:
    """A plan (or None) with more instructions laid over it by an adapter at call time (IP-Adapter
    image keys / values, PuLID's id residuals): it answers the seam's questions as ``base`` does;
    subclasses add their own."""

    base: object

    def args(self, layer: AttnLayer) -> dict:
        return {} if self.base is None else self.base.args(layer)

    def mix(self, layer: AttnLayer):
        return None if self.base is None else self.base.mix(layer)

    def key_mask(self, layer: AttnLayer):
        return None if self.base is None else self.base.key_mask(layer)

    def feature_rows(self, site):
        return None if self.base is None else self.base.feature_rows(site)


def attention(q, k, v, layer: AttnLayer | None = None, plan: AttentionPlan | None = None, text: int | None = None):
    """The seam. q [B, H, Nq, D], k/v [B, H, Nk, D] -> [B, H, Nq, D].

    ``text``: joint attention (FLUX), whose first ``text`` tokens are the prompt's and the rest
    the image's; see :func:`joint_attention`."""
    if plan is None or layer is None:
        return kernels.attention(q, k, v)
    if text is not None:
        return joint_attention(q, k, v, text, plan.args(layer))
    mix = plan.mix(layer)
    if mix is not None:
        return mixed_attention(q, k, v, mix, **plan.args(layer))
    masks = plan.key_mask(layer)
    if masks is not None:
        return masked_attention(q, k, v, masks, **plan.args(layer))
    return kernels.attention(q, k, v, **plan.args(layer))


def joint_attention(q, k, v, text: int, args: dict):
    """Joint text + image attention with a plan's instructions (FLUX; Esser et al. 2024's MM-DiT).

    A stored map is image queries x text keys ([B, N, L], head-averaged, the softmax over all
    keys): what a prompt token draws where. Injected keys / values (``k_from`` / ``v_from``)
    replace only the image tokens': the row reads the source row's image (as KV-Edit, Zhu et al.
    2025, and MasaCtrl's mutual self-attention) while keeping its own prompt. The gather costs
    one copy of the keys / values (O(N D), against the attention's O(N^2 D)), inside the call:
    nothing is kept across steps. ``q_from`` reads every query of the source row."""
    args = dict(args)
    k_from, v_from = args.pop("k_from", None), args.pop("v_from", None)
    if k_from is not None:
        k = torch.cat([k[:, :, :text], k[:, :, text:].index_select(0, k_from)], dim=2)  # [B, H, L+N, D]
    if v_from is not None:
        v = torch.cat([v[:, :, :text], v[:, :, text:].index_select(0, v_from)], dim=2)
    if "store" in args:
        args.update(store_queries=(text, q.shape[2]), store_keys=(0, text))
    if "token_weights" in args:
        raise ValueError("token weights are not supported in joint (FLUX) attention")
    return kernels.attention(q, k, v, **args)


def masked_attention(q, k, v, masks, **args):
    """Run :class:`KeyMask` s (one, or a tuple over row ranges) as one kernel call: the masks become
    the kernel's key / query classes (1 = foreground), so a foreground query's softmax covers only
    the foreground keys it reads and a background query's only the background ones (as MasaCtrl's
    masked fill). Rows outside every range read every key; so does a class with no key in the
    row (a foreground that nearest downsampling erased), where the official fill of every score
    with the dtype's minimum would average v uniformly instead."""
    B, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
    key_class = torch.zeros(B, n_k, dtype=torch.int8, device=q.device)  # [B, Nk]
    query_class = torch.full((B, n_q), -1, dtype=torch.int8, device=q.device)  # [B, Nq]: -1 reads every key
    for m in masks if isinstance(masks, tuple) else (masks,):
        s, e = m.rows
        key_class[s:e] = _resized(m.key_fg, n_k) > 0.5
        query_class[s:e] = _resized(m.query_fg, n_q) > 0.5
    return kernels.attention(q, k, v, key_class=key_class, query_class=query_class, **args)


def _resized(mask, n: int):
    """[n, h, w] at the latent -> [n, N] at the grid of a layer with N tokens (nearest, as
    MasaCtrl); the grid halves (rounding up, as stride-2 convolutions) until it has N."""
    h, w = mask.shape[-2:]
    gh, gw = h, w
    while gh * gw > n:
        gh, gw = (gh + 1) // 2, (gw + 1) // 2
    if gh * gw != n:
        raise ValueError(f"a key mask of {h}x{w} fits no grid of {n} tokens; give masks at the latent size")
    if (gh, gw) != (h, w):
        mask = F.interpolate(mask[:, None].float(), size=(gh, gw), mode="nearest")[:, 0]
    return mask.flatten(1)


def mixed_attention(q, k, v, mix: CrossMix, *, store=None, ip=None, token_weights=None, scale=None, store_rows=None):
    """Run a :class:`CrossMix` as (at most) 1 + one call per ``own`` range; no attention matrix is formed.

    Call 1, all rows: probabilities of rows ``mix.q_from``/``mix.k_from`` applied to the
    values scattered into their token positions (``mixed_values``), plus IP-Adapter
    tokens if any; it fills ``store`` with every row's borrowed maps. Then, per ``own``
    range: the rows' own probabilities applied to ``beta * v``, which also overwrites
    ``store`` for those rows with their own (pre-mix) maps. A range marked ``edited``
    stores instead what the rows actually attend with, the mixed maps
    alpha · borrowed(index) + beta · own -- what Prompt-to-Prompt's official attention
    store keeps, since its controller edits the stored probabilities in place.
    """
    if token_weights is not None:
        raise ValueError("a CrossMix carries its own token weights (alpha/beta); do not also set token_weights")
    out = kernels.attention(q, k, mixed_values(v, mix), scale=scale, q_from=mix.q_from, k_from=mix.k_from,
                            store=store, ip=ip, store_rows=store_rows)  # [B, H, Nq, D]
    for s, e, edited in mix.own_ranges():
        # maps only for rows someone reads (a merged batch says which: ``store_rows``)
        maps = store is not None and (store_rows is None or any(a <= s and e <= b for a, b in store_rows))
        if mix.beta is None and not maps:
            continue
        borrowed = store[s:e].clone() if maps and edited else None  # [b, Nq, Nk]
        v_own = v[s:e] if mix.beta is None else v[s:e] * mix.beta[s:e, None, :, None].to(v.dtype)  # [b, H, Nk, D]
        own = kernels.attention(q[s:e], k[s:e], v_own, scale=scale,
                                store=store[s:e] if maps else None)  # [b, H, Nq, D]
        if mix.beta is not None:
            out[s:e] += own
        if borrowed is not None:
            store[s:e] = edited_maps(borrowed, store[s:e], mix, s, e)
    return out


def edited_maps(borrowed, own, mix: CrossMix, s: int, e: int):
    """Rows s:e's mixed maps [b, Nq, Nk]: alpha_j · borrowed(index_j) + beta_j · own_j (head means
    mix linearly, since alpha and beta do not depend on the head)."""
    if mix.index is not None:
        borrowed = borrowed.gather(2, mix.index[s:e, None, :].expand_as(borrowed))
    if mix.alpha is not None:
        borrowed = borrowed * mix.alpha[s:e, None, :].to(borrowed.dtype)
    if mix.beta is None:
        return borrowed
    return borrowed + own * mix.beta[s:e, None, :].to(own.dtype)


def mixed_values(v, mix: CrossMix):
    """ṽ [B, H, Nk, D]: ṽ_i = Σ_{j: index_j = i} alpha_j v_j (the values each borrowed
    probability multiplies). Identity index and alpha None give v itself."""
    if mix.alpha is not None:
        v = v * mix.alpha[:, None, :, None].to(v.dtype)  # [B, H, Nk, D]
    if mix.index is not None:
        idx = mix.index[:, None, :, None].expand(v.shape)  # [B, H, Nk, D]
        v = torch.zeros_like(v).scatter_add_(2, idx, v)
    return v


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.cross = context_dim is not None
        ctx = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx, dim, bias=False)
        self.to_v = nn.Linear(ctx, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.layer: AttnLayer | None = None  # assigned by the executor after construction

    def forward(self, x, context=None, plan: AttentionPlan | None = None):
        b, n, c = x.shape  # [B, N, C]
        ctx = context if self.cross else x
        h = self.heads
        # Views, not copies: the kernel takes strides.
        q = self.to_q(x).view(b, n, h, c // h).transpose(1, 2)  # [B, H, N, D]
        k = self.to_k(ctx).view(b, ctx.shape[1], h, c // h).transpose(1, 2)  # [B, H, Nk, D]
        v = self.to_v(ctx).view(b, ctx.shape[1], h, c // h).transpose(1, 2)  # [B, H, Nk, D]
        out = attention(q, k, v, self.layer, plan)  # [B, H, N, D]
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))  # [B, N, C]


def number_attention_layers(model: nn.Module, scale_of=lambda name: 1) -> list[AttnLayer]:
    """Give every Attention module of ``model`` its AttnLayer, in module order.

    ``scale_of(name)`` returns the layer's spatial downsampling factor."""
    layers = []
    for name, mod in model.named_modules():
        if isinstance(mod, Attention):
            place = name.split(".")[0].split("_")[0]  # "down_blocks.0..." -> "down"
            mod.layer = AttnLayer(len(layers), name, mod.cross, place, scale_of(name))
            layers.append(mod.layer)
    return layers
