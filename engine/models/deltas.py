"""Weight deltas: a fine-tune kept apart from the model it tunes.

A delta trains float32 tensors of its own and gives the UNet's parameters it changes as
``{name: tensor}`` (``weights()``), which the Denoiser passes per call
(``UNetDenoiser.with_weights``: ``torch.func.functional_call``). The model's parameters
are never written, so a loaded pipeline and the checkpoint files behind it stay as they
were, and tuned and untuned requests can run side by side.

* :class:`FullDelta` -- every parameter (as Imagic fine-tunes the UNet); its saved form is
  the size of the UNet in float32.
* :class:`LoRADelta` -- low-rank updates W + (alpha / r) · up @ down of the attention
  projections (Hu et al. 2022, "LoRA"; diffusers' targets ``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``; ``down`` ~ N(0, 1/r), ``up`` = 0, so training starts from the model).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class FullDelta:
    kind = "full"

    def __init__(self, unet: nn.Module, tensors: dict[str, Tensor] | None = None):
        self.base = dict(unet.named_parameters())
        self.master = {n: p.detach().float().clone() for n, p in self.base.items()}  # the tuned weights, float32
        if tensors is not None:  # a saved delta
            for n, d in tensors.items():
                if n not in self.master:
                    raise ValueError(f"this delta changes {n!r}, which the model does not have: another model's tune")
                self.master[n] += d.to(self.master[n])

    def parameters(self) -> list[Tensor]:
        return [m.requires_grad_() for m in self.master.values()]

    def weights(self) -> dict[str, Tensor]:
        """The tuned parameters in the model's dtypes (differentiable w.r.t. the masters)."""
        return {n: m.to(self.base[n].dtype) for n, m in self.master.items()}

    def tensors(self) -> dict[str, Tensor]:
        """What to save: tuned minus base, per parameter (float32)."""
        return {n: (m.detach() - self.base[n].detach().float()) for n, m in self.master.items()}


class LoRADelta:
    kind = "lora"

    def __init__(self, unet: nn.Module, rank: int = 4, alpha: float | None = None,
                 tensors: dict[str, Tensor] | None = None, generator: torch.Generator | None = None):
        if rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {rank}")
        self.rank, self.scale = rank, (rank if alpha is None else alpha) / rank
        self.base = {n: p for n, p in unet.named_parameters()
                     if n.endswith(".weight") and p.ndim == 2 and n[:-len(".weight")].endswith(LORA_TARGETS)}
        if not self.base:
            raise ValueError("LoRA found no attention projection (to_q / to_k / to_v / to_out.0) in this model")
        self.down, self.up = {}, {}
        for n, w in self.base.items():
            out_f, in_f = w.shape
            if tensors is not None:
                self.down[n], self.up[n] = tensors[f"{n}.down"].float(), tensors[f"{n}.up"].float()
            else:
                self.down[n] = (torch.randn(rank, in_f, generator=generator) / rank).to(w.device)  # [r, in]
                self.up[n] = torch.zeros(out_f, rank, device=w.device)  # [out, r]

    def parameters(self) -> list[Tensor]:
        return [t.requires_grad_() for n in self.base for t in (self.down[n], self.up[n])]

    def weights(self) -> dict[str, Tensor]:
        return {n: w + (self.scale * (self.up[n] @ self.down[n])).to(w.dtype) for n, w in self.base.items()}

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for n in self.base:
            out[f"{n}.down"], out[f"{n}.up"] = self.down[n].detach(), self.up[n].detach()
        return out


def make_delta(kind: str, unet: nn.Module, *, rank: int = 4, alpha: float | None = None,
               tensors: dict[str, Tensor] | None = None, generator: torch.Generator | None = None):
    """A new (or, with ``tensors``, a saved) delta of ``kind`` "full" or "lora" for ``unet``."""
    if kind == "full":
        return FullDelta(unet, tensors)
    if kind == "lora":
        return LoRADelta(unet, rank, alpha, tensors, generator)
    raise ValueError(f"tune must be 'full' or 'lora', got {kind!r}")
