"""The Denoiser: one model call on a batch of rows, whatever programs they belong to.

A program never touches the model. It hands the loop its rows: latents, a per-row
timestep, its conditioning in the family-neutral form of :class:`~engine.prompts.Conditioning`
(turned into the model's own inputs once, by the Denoiser's ``condition``) and an
attention plan. The Denoiser owns everything model-family specific -- SD's context,
SDXL's pooled embeddings and micro-conditioning time ids (:class:`UNetDenoiser`); FLUX's
T5 sequence, pooled CLIP and embedded guidance (:mod:`engine.step.flux_denoiser`) -- and
how the call runs (:class:`Denoiser`): eagerly, or through a
:class:`~engine.runtime.graphs.GraphRunner` (CUDA graphs with an eager fallback; "fake"
mode on CPU runs the same static-buffer plumbing).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.layers import row_segments
from ..prompts import Conditioning
from ..runtime.graphs import GraphRunner


@dataclass
class RowCond:
    """The model inputs of R rows besides latents and timesteps: named tensors, each [R, ...].

    Family-neutral on purpose: the loop concatenates, pads and slices rows of any family
    without knowing what the fields mean; only the Denoiser that made them reads them.
    """

    fields: dict[str, Tensor]
    controlled: bool = False  # some row has a control image (host-side: a call without one skips the ControlNet)
    imaged: bool = False  # some row reads an image prompt (host-side: a call without one skips the IP-Adapter)

    def __len__(self) -> int:
        return next(iter(self.fields.values())).shape[0]

    @staticmethod
    def cat(parts: list["RowCond"]) -> "RowCond":
        return RowCond({k: torch.cat([p.fields[k] for p in parts]) for k in parts[0].fields},
                       any(p.controlled for p in parts), any(p.imaged for p in parts))

    def signature(self) -> tuple:
        """What must agree for rows to share a call: field names, trailing shapes, dtypes."""
        return tuple((k, tuple(v.shape[1:]), v.dtype) for k, v in self.fields.items())

    def pad(self, n: int) -> "RowCond":
        """n more rows (copies of row 0: idle rows whose outputs nobody reads)."""
        return RowCond({k: torch.cat([v, v[:1].expand(n, *v.shape[1:])]) for k, v in self.fields.items()},
                       self.controlled, self.imaged)


class Denoiser:
    """What every model family's Denoiser shares: the model key, the runner (eager or CUDA
    graphs), parameter overrides, and the call. A family implements ``model``, ``condition``,
    ``condition_guidance`` and ``forward``."""

    family = ""
    runner: GraphRunner | None = None
    # Parameter overrides {name: tensor}: a fine-tune (Imagic) runs the same modules with its
    # own weights, the model's untouched (torch.func.functional_call, per call).
    weights: dict[str, Tensor] | None = None
    controlnet = None
    # An image adapter (IP-Adapter on UNets, PuLID on FLUX): rows carry its tokens and a scale, and
    # it turns them into plan instructions per call (``plan(tokens, scale, base)``).
    image_adapter = None

    @property
    def model(self) -> nn.Module:
        raise NotImplementedError

    @property
    def model_key(self) -> tuple:
        """Programs with equal model keys may join one loop (same model)."""
        return (self.family, id(self.model), id(self.controlnet), id(self.image_adapter))

    def _image_fields(self, fields: dict, cond: Conditioning) -> bool:
        """Image-prompt rows: tokens [R, T, C] and scale [R] for every row once an image adapter is
        attached (zeros at scale 0 for rows without an image, so all rows share calls); whether any
        row reads an image (decided here, on the host, once per program)."""
        has = cond.image is not None and bool((cond.image_scale != 0).any())
        a = self.image_adapter
        if a is None:
            if has:
                raise ValueError("an image prompt needs an image adapter: pipe.load_ip_adapter(path) (SD, SDXL) or "
                                 "pipe.load_pulid(path) (FLUX) first")
            return False
        r = len(cond)
        if cond.image is None:
            fields["image"] = torch.zeros(r, a.tokens, a.token_dim, device=self.device, dtype=self.dtype)
            fields["image_scale"] = torch.zeros(r, device=self.device)
        else:
            fields["image"] = cond.image.to(self.device, self.dtype)  # [R, T, C]
            fields["image_scale"] = cond.image_scale.to(self.device, torch.float32)  # [R]
        return has

    def _image_plan(self, rows: RowCond, plan):
        """The plan with the image adapter's instructions when a row of the call reads an image."""
        if not rows.imaged:
            return plan
        return self.image_adapter.plan(rows.fields["image"], rows.fields["image_scale"], plan)

    @property
    def key(self) -> tuple:
        """Rows of programs with equal keys may share a model call (same model and weights)."""
        return self.model_key + ((id(self.weights),) if self.weights is not None else ())

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def attn_layers(self) -> list:
        return self.model.attn_layers

    def _with(self, **changes) -> "Denoiser":
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    def with_runner(self, runner: GraphRunner | None) -> "Denoiser":
        return self._with(runner=runner)

    def with_weights(self, weights: dict[str, Tensor] | None) -> "Denoiser":
        """The same model call with the model's parameters ``weights`` (by name) in place of its own."""
        return self._with(weights=weights)

    def _model(self, *args, **kwargs):
        if self.weights is not None:
            return torch.func.functional_call(self.model, self.weights, args, kwargs, strict=False)
        return self.model(*args, **kwargs)

    def forward(self, x: Tensor, t: Tensor, rows: RowCond, plan=None, segments=None) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, t: Tensor, rows: RowCond, plan=None, segments=None) -> Tensor:
        if self.runner is None:
            return self.forward(x, t, rows, plan, segments)
        body = lambda inp, c: self.forward(inp["x"], inp["t"], c["rows"], c["plan"], c["segments"])  # noqa: E731
        out = self.runner.run(("model", self.key), body, dict(x=x, t=t),
                              dict(rows=rows, plan=plan, segments=segments))  # segments: part of the graph key
        return out.clone() if self.runner.resolve([x]) == "cuda" else out  # static outputs are reused by the next replay

    def guided(self, g, height: int, width: int, plan=None):
        """(x [B, ...], t [B]) -> the guided prediction of ``g``'s B sample rows: one call of
        the model rows ([uncond, cond] with guidance). For code that drives a model step by
        hand (tests, extraction); methods are programs and never need it."""
        rows = self.condition_guidance(g, height, width)

        def fn(x, t):
            if g.guided:
                x, t = torch.cat([x, x]), torch.cat([t, t])
            return g.combine(self(x, t, rows, plan))

        return fn


class UNetDenoiser(Denoiser):
    """SD / SDXL UNet rows -> model output, eager or through a GraphRunner."""

    family = "unet"

    def __init__(self, unet: nn.Module, text_projection_dim: int | None = None, runner: GraphRunner | None = None,
                 controlnet: nn.Module | None = None, weights: dict[str, Tensor] | None = None, ip_adapter=None):
        self.unet = unet
        self.text_projection_dim = text_projection_dim
        self.runner = runner
        self.controlnet = controlnet  # with one, every row carries a control image and scale (0: none)
        self.weights = weights
        self.image_adapter = ip_adapter  # with one, every row carries image tokens and a scale (0: none)

    @property
    def model(self) -> nn.Module:
        return self.unet

    @property
    def sdxl(self) -> bool:
        return self.unet.config.addition_embed_type == "text_time"

    # ---- conditioning -------------------------------------------------------------------
    def time_ids(self, n: int, height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None) -> Tensor | None:
        """SDXL micro-conditioning rows [n, 6]: original size, crop top-left, target size."""
        if not self.sdxl:
            return None
        ids = list(original_size or (height, width)) + list(crops_coords_top_left) + list(target_size or (height, width))
        cfg = self.unet.config
        expected = cfg.projection_class_embeddings_input_dim
        got = cfg.addition_time_embed_dim * len(ids) + (self.text_projection_dim or 0)
        if expected != got:
            raise ValueError(f"UNet expects an added embedding of {expected} but text encoder 2 and time ids give {got}")
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(n, 1)

    def condition(self, cond: Conditioning, height: int, width: int, time_ids: Tensor | None = None,
                  control=None, **size_kw) -> RowCond:
        """Text conditioning of R rows at an image size -> the UNet's row inputs. ``control``:
        (images [R or 1, 3, H, W] in [0, 1], scale: float) for the ControlNet; rows without
        control get a zero image at scale 0, which adds exactly 0, so they can share a call with
        controlled rows; a call with no controlled row skips the ControlNet."""
        fields = {"context": cond.context.to(self.device, self.dtype)}  # [R, L, D]
        if cond.pooled is not None:
            if time_ids is None:
                time_ids = self.time_ids(len(cond), height, width, **size_kw)
            fields["text_embeds"] = cond.pooled.to(self.device, self.dtype)  # [R, P]
            fields["time_ids"] = time_ids.to(self.device, self.dtype)  # [R, 6]
        if control is not None and self.controlnet is None:
            raise ValueError("a control image needs a ControlNet: pipe.load_controlnet(path) first")
        if self.controlnet is not None:
            r = len(cond)
            image, scale = control if control is not None else (torch.zeros(1, 3, height, width), 0.0)
            if tuple(image.shape[-2:]) != (height, width):
                raise ValueError(f"the control image is {image.shape[-1]}x{image.shape[-2]} but the output is "
                                 f"{width}x{height}; resize it to the output size")
            fields["control"] = image.to(self.device, self.dtype).expand(r, -1, -1, -1) if image.shape[0] == 1 \
                else image.to(self.device, self.dtype).repeat(r // image.shape[0], 1, 1, 1)  # [R, 3, H, W]
            fields["control_scale"] = torch.as_tensor(scale, dtype=torch.float32, device=self.device).expand(r).clone()  # [R]
        imaged = self._image_fields(fields, cond)
        return RowCond(fields, controlled=control is not None, imaged=imaged)

    def condition_guidance(self, g, height: int, width: int, control=None, **size_kw) -> RowCond:
        """The model rows of a :class:`~engine.step.Guidance`: [uncond, cond] (2B) or cond (B),
        with its own SDXL time ids (doubled for the guided rows) or ones made from the size.
        ``control`` (images [B or 1, ...], scale) applies to both halves, as diffusers does."""
        ids = g.time_ids if g.time_ids is None or not g.guided else torch.cat([g.time_ids, g.time_ids])  # [R, 6]
        return self.condition(g.model_conditioning(), height, width, time_ids=ids, control=control, **size_kw)

    # ---- the call -----------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, rows: RowCond, plan=None, segments=None) -> Tensor:
        """x [R, C, h, w] (any float dtype), t [R] -> model output [R, C, h, w] (model dtype).
        ``segments``: how per-row embeddings split (see ``models.layers.row_segments``)."""
        f = rows.fields
        added = {"text_embeds": f["text_embeds"], "time_ids": f["time_ids"]} if "text_embeds" in f else None
        with row_segments(segments):
            res = {}
            if rows.controlled:  # the ControlNet reads the same rows; no attention plan (its layers are its own)
                down, mid = self.controlnet(x, t, f["context"], f["control"], f["control_scale"], added)
                res = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            plan = self._image_plan(rows, plan)  # IP-Adapter keys / values, read in the text attention's pass
            return self._model(x, t, f["context"], added, plan=plan, **res)  # the UNet casts x to its dtype
