"""Merging the attention plans of several programs into one plan for their shared call.

Each program describes attention over its own rows (indices local to it, starting at 0):
which rows read another row's queries / keys / values, a :class:`CrossMix`, token
weights, buffers to store maps into. The loop stacks programs' rows at offsets; this
module turns their plans into one :class:`MergedPlan` over all rows of the call:

* indices are shifted by each program's offset; rows of a program that gives no
  instruction at a layer read themselves (identity injection, which computes the same
  attention as none);
* a layer where any program mixes (Prompt-to-Prompt) runs one CrossMix for all rows,
  with alpha = 1, beta = 0 and identity indices for the others;
* feature instructions (Plug-and-Play) become one row index per site, identity for rows
  of programs that give none; key masks (mask-guided MasaCtrl) keep each program's mask
  tensors (programs update them in place between steps) with their row ranges shifted;
* maps are *outputs*, kept apart from the instructions: the kernel writes every row's
  maps of a stored layer into one scratch buffer [R, Nq, Nk], and :meth:`MergedPlan.copy_back`
  hands each program its rows after the call (the CUDA-graph runner treats fields named
  ``store`` as written by the step).

A merged plan depends only on which plan objects sit at which offsets, so the loop
memoises it: programs reuse plan objects across steps and merging happens once per
composition, not once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..models.attention import AttentionPlan, AttnLayer, CrossMix

INJECT = ("q_from", "k_from", "v_from")


@dataclass
class LayerCall:
    """One layer's kernel instructions for every row of the call."""

    inject: dict  # subset of INJECT -> [R] int64
    token_weights: Tensor | None = None  # [R, Nk]
    mix: CrossMix | None = None
    store: Tensor | None = None  # [R, Nq, Nk] scratch the kernel writes (an output)
    store_rows: tuple | None = None  # ((start, stop), ...): the rows whose maps some program reads


@dataclass
class MergedPlan:
    """Per-layer instructions over all rows of a call; duck-types AttentionPlan at the seam."""

    calls: dict  # layer index -> LayerCall
    features: dict = field(default_factory=dict)  # feature site index -> rows [R] int64
    key_masks: dict = field(default_factory=dict)  # layer index -> tuple of KeyMask over row ranges

    def mix(self, layer: AttnLayer) -> CrossMix | None:
        c = self.calls.get(layer.index)
        return None if c is None else c.mix

    def feature_rows(self, site):
        return self.features.get(site.index)

    def key_mask(self, layer: AttnLayer):
        return self.key_masks.get(layer.index)

    def args(self, layer: AttnLayer) -> dict:
        c = self.calls.get(layer.index)
        if c is None:
            return {}
        out = dict(c.inject)
        if c.token_weights is not None:
            out["token_weights"] = c.token_weights
        if c.store is not None:
            out["store"] = c.store
            out["store_rows"] = c.store_rows
        return out

    def copy_back(self) -> None:
        """Hand each program the stored maps of its rows (after the model call)."""
        for dst, layer, lo in getattr(self, "_writes", ()):
            dst.copy_(self.calls[layer].store[lo:lo + dst.shape[0]])


def _touched(plan: AttentionPlan, layers: list[AttnLayer]) -> list[AttnLayer]:
    return [l for l in layers if plan.args(l) or plan.mix(l) is not None or plan.key_mask(l) is not None]


def merge(fragments: list[tuple[AttentionPlan | None, int, int]], total: int, layers: list[AttnLayer],
          device) -> AttentionPlan | MergedPlan | None:
    """fragments: (plan over its own rows or None, offset, rows); total: rows of the call
    (padding rows included). Returns one plan over all rows."""
    live = [(p, off, n) for p, off, n in fragments if p is not None]
    if not live:
        return None
    if len(live) == 1 and live[0][1] == 0 and live[0][2] == total:
        return live[0][0]  # one program fills the call: its plan as it is
    for p, _, _ in live:
        if p.ip:
            raise ValueError("a plan's own per-layer IP-Adapter keys / values cannot be merged with other programs' "
                             "plans; give image tokens as conditioning (Conditioning.image, read by the Denoiser's "
                             "image adapter), which shares calls, or "
                             "run such a request alone")
    touched = sorted({l.index: l for p, _, _ in live for l in _touched(p, layers)}.items())
    calls, writes = {}, []
    for idx, layer in touched:
        call, w = _merge_layer(layer, live, total, device)
        calls[idx] = call
        writes += w
    merged = MergedPlan(calls, _merge_features(live, total, device), _merge_key_masks(live, layers))
    merged._writes = writes  # not a dataclass field: graphs see only the instructions and the scratch
    return merged


def _merge_features(live, total: int, device) -> dict:
    sites = sorted({i for p, _, _ in live for i in getattr(p, "features", {})})
    out = {}
    for i in sites:
        rows = torch.arange(total, device=device)  # [R]: rows of other programs read themselves
        for p, off, n in live:
            if i in getattr(p, "features", {}):
                rows[off:off + n] = p.features[i].to(device).long() + off
        out[i] = rows
    return out


def _merge_key_masks(live, layers: list[AttnLayer]) -> dict:
    out = {}
    for layer in layers:
        parts = []
        for p, off, _ in live:
            km = p.key_mask(layer)
            for m in km if isinstance(km, tuple) else (() if km is None else (km,)):
                if p.mix(layer) is not None:
                    raise ValueError("a layer cannot both mix cross-attention and mask keys")
                parts.append(replace(m, rows=(m.rows[0] + off, m.rows[1] + off)))
        if parts:
            out[layer.index] = tuple(parts)
    return out


def _merge_layer(layer: AttnLayer, live, total: int, device):
    ident = torch.arange(total, device=device)  # [R]
    args = [(p.args(layer), p.mix(layer), off, n) for p, off, n in live]
    writes, store, store_rows = [], None, None
    stored = [(a["store"], off, n) for a, _, off, n in args if "store" in a]
    if stored:
        buf = stored[0][0]
        store = torch.zeros(total, *buf.shape[1:], dtype=buf.dtype, device=device)  # [R, Nq, Nk]
        writes = [(dst, layer.index, off) for dst, off, _ in stored]
        store_rows = tuple((off, off + n) for _, off, n in stored)  # the other rows need no maps
    if any(m is not None for _, m, _, _ in args):
        return LayerCall({}, None, _merge_mix(args, total, device, ident), store, store_rows), writes
    inject = {}
    for kind in INJECT:
        if any(kind in a for a, _, _, _ in args):
            rows = ident.clone()
            for a, _, off, n in args:
                if kind in a:
                    rows[off:off + n] = a[kind].to(device).long() + off
            inject[kind] = rows
    weights = None
    if any("token_weights" in a for a, _, _, _ in args):
        nk = next(a["token_weights"].shape[1] for a, _, _, _ in args if "token_weights" in a)
        weights = torch.ones(total, nk, device=device)
        for a, _, off, n in args:
            if "token_weights" in a:
                weights[off:off + n] = a["token_weights"]
    return LayerCall(inject, weights, None, store, store_rows), writes


def _merge_mix(args, total: int, device, ident: Tensor) -> CrossMix:
    q_from, k_from = ident.clone(), ident.clone()
    mixes = [m for _, m, _, _ in args if m is not None]
    nk = next((t.shape[1] for m in mixes for t in (m.index, m.alpha, m.beta) if t is not None), None)
    index = alpha = beta = None
    if nk is not None:
        if any(m.index is not None for m in mixes):
            index = torch.arange(nk, device=device).repeat(total, 1)  # [R, Nk]
        if any(m.alpha is not None for m in mixes):
            alpha = torch.ones(total, nk, device=device)
        if any(m.beta is not None for m in mixes):
            beta = torch.zeros(total, nk, device=device)
    own = []
    for a, m, off, n in args:
        if "token_weights" in a:
            raise ValueError("token weights cannot share a layer with a CrossMix (a mix carries its own weights: "
                             "alpha/beta); give the program's weights as its CrossMix alpha")
        if m is None:
            if any(kind in a for kind in INJECT):
                raise ValueError("a layer where one program mixes cross-attention and another injects "
                                 "rows cannot share a model call")
            continue
        q_from[off:off + n] = m.q_from.to(device).long() + off
        k_from[off:off + n] = m.k_from.to(device).long() + off
        for t, src in ((index, m.index), (alpha, m.alpha), (beta, m.beta)):
            if t is not None and src is not None:
                t[off:off + n] = src
        own += [(s + off, e + off, edited) for s, e, edited in m.own_ranges()]
    return CrossMix(q_from, k_from, index, alpha, beta, tuple(own))
