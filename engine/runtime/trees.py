"""Flatten the inputs of a denoising step into tensor leaves plus a hashable structure.

A CUDA graph reads its inputs from fixed addresses, so every tensor a step reads (latent,
sampler tables, conditioning, attention-plan indices and weights) must live in a static
buffer, and everything else (shapes, dtypes, Python constants such as a sampler's
prediction type or a plan's layer set) must be the same at every replay. `flatten` splits
an input tree into exactly those two parts: the tensors, and a ``spec`` that is hashable
and equal for two inputs iff one captured graph can serve both (the cache key).

Supported nodes: tensors, None / bool / int / float / str / torch.dtype / frozenset and
other hashable constants, tuples, lists, dicts, and dataclasses (``Guidance``,
``Conditioning``, ``AttentionPlan``, ``CrossMix``, samplers, sampler states).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

# Dataclass fields whose tensors are *written* by the step (the attention kernel's map
# store): after a replay their static buffers are copied back into the caller's tensors.
OUTPUT_FIELDS = frozenset({"store"})


@dataclass(frozen=True)
class TensorSpec:
    """What a graph needs to know about a tensor leaf: everything but its values."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    output: bool = False  # written by the step (copied back after a replay)


def flatten(tree, leaves: list[Tensor] | None = None, output: bool = False):
    """tree -> (leaves, spec). Leaves are returned in a fixed depth-first order."""
    leaves = [] if leaves is None else leaves
    if isinstance(tree, Tensor):
        leaves.append(tree)
        return leaves, TensorSpec(tuple(tree.shape), tree.dtype, str(tree.device), output)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        items = []
        for f in dataclasses.fields(tree):
            _, sub = flatten(getattr(tree, f.name), leaves, output or f.name in OUTPUT_FIELDS)
            items.append((f.name, sub))
        return leaves, ("dataclass", type(tree), tuple(items))
    if isinstance(tree, (list, tuple)) and not _is_constant(tree):
        subs = tuple(flatten(v, leaves, output)[1] for v in tree)
        return leaves, ("list" if isinstance(tree, list) else "tuple", subs)
    if isinstance(tree, dict):
        items = tuple((k, flatten(v, leaves, output)[1]) for k, v in tree.items())
        return leaves, ("dict", items)
    hash(tree)  # a constant must be hashable to be part of a cache key (raises TypeError)
    return leaves, ("const", tree)


def unflatten(spec, leaves: list[Tensor]):
    """Inverse of `flatten`: rebuild the tree from ``spec`` with ``leaves`` as its tensors."""
    it = iter(leaves)
    out = _build(spec, it)
    if next(it, None) is not None:
        raise ValueError("unflatten: more leaves than the spec has tensors")
    return out


def output_indices(spec) -> list[int]:
    """Positions (in leaf order) of the tensors marked as step outputs."""
    found: list[int] = []
    _walk(spec, found, [0])
    return found


def _is_constant(seq) -> bool:
    """A tuple/list with no tensors and no containers inside is kept whole as a constant
    (e.g. a sampler's ``noise_steps`` or a plan's ``own`` range): shorter specs, same key."""
    return isinstance(seq, tuple) and all(isinstance(v, (bool, int, float, str, type(None))) for v in seq)


def _build(spec, it):
    if isinstance(spec, TensorSpec):
        return next(it)
    kind = spec[0]
    if kind == "const":
        return spec[1]
    if kind in ("list", "tuple"):
        vals = [_build(s, it) for s in spec[1]]
        return vals if kind == "list" else tuple(vals)
    if kind == "dict":
        return {k: _build(s, it) for k, s in spec[1]}
    cls, items = spec[1], spec[2]
    obj = object.__new__(cls)  # no __init__ / __post_init__: the values were valid when flattened
    for name, sub in items:
        object.__setattr__(obj, name, _build(sub, it))
    return obj


def _walk(spec, found: list[int], pos: list[int]) -> None:
    if isinstance(spec, TensorSpec):
        if spec.output:
            found.append(pos[0])
        pos[0] += 1
        return
    kind = spec[0]
    if kind == "const":
        return
    subs = spec[1] if kind in ("list", "tuple") else [s for _, s in (spec[1] if kind == "dict" else spec[2])]
    for s in subs:
        _walk(s, found, pos)
