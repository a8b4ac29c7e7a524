"""The FLUX Denoiser: rows of latents -> flow velocities through our FLUX transformer.

Programs and samplers see FLUX latents as they see SD's, [R, C, h, w]; the Denoiser packs
them into 2 x 2 patch tokens, builds the RoPE positions, runs the transformer and unpacks the
velocity. A row's conditioning is the T5 sequence (``context``), CLIP's pooled vector
(``pooled``) and, for FLUX.1-dev, the embedded guidance value (``guidance``, per row, so rows
with different guidance share a call). Timesteps arrive as the sampler's (sigma x 1000) and
go in as diffusers' FluxPipeline passes them (t / 1000, in the model dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models.flux import image_ids, pack, unpack
from ..models.layers import row_segments
from ..prompts import Conditioning
from ..runtime.graphs import GraphRunner
from .denoiser import Denoiser, RowCond

DEFAULT_EMBEDDED_GUIDANCE = 3.5  # FluxPipeline's guidance_scale for FLUX.1-dev


class FluxDenoiser(Denoiser):
    family = "flux"

    def __init__(self, transformer: nn.Module, runner: GraphRunner | None = None,
                 weights: dict[str, Tensor] | None = None, pulid=None):
        self.transformer = transformer
        self.runner = runner
        self.weights = weights
        self.image_adapter = pulid  # PuLID (engine.models.pulid): id tokens per row, added after blocks

    @property
    def model(self) -> nn.Module:
        return self.transformer

    @property
    def embeds_guidance(self) -> bool:
        return self.transformer.config.guidance_embeds

    def condition(self, cond: Conditioning, height: int = 0, width: int = 0,
                  embedded_guidance: float | Tensor | None = None, **_) -> RowCond:
        """Text conditioning of R rows -> the transformer's row inputs. ``embedded_guidance``
        (FLUX.1-dev; default 3.5): a float or [R]."""
        if cond.pooled is None:
            raise ValueError("FLUX rows need pooled text (CLIP) as well as the T5 sequence")
        fields = {"context": cond.context.to(self.device, self.dtype),  # [R, L, D]
                  "pooled": cond.pooled.to(self.device, self.dtype)}  # [R, P]
        if self.embeds_guidance:
            g = DEFAULT_EMBEDDED_GUIDANCE if embedded_guidance is None else embedded_guidance
            fields["guidance"] = torch.as_tensor(g, dtype=torch.float32, device=self.device).expand(len(cond)).clone()  # [R]
        elif embedded_guidance is not None:
            raise ValueError("this FLUX model has no guidance embedding (FLUX.1-schnell-like): use true "
                             "classifier-free guidance (guidance_scale > 1 with a negative prompt) instead")
        imaged = self._image_fields(fields, cond)
        return RowCond(fields, imaged=imaged)

    def condition_guidance(self, g, height: int = 0, width: int = 0, **kw) -> RowCond:
        """The model rows of a :class:`~engine.step.Guidance`: [uncond, cond] (true CFG) or cond."""
        return self.condition(g.model_conditioning(), height, width, **kw)

    def _ids(self, h: int, w: int, text: int) -> tuple[Tensor, Tensor]:
        key = (h, w, text)
        cache = self.__dict__.setdefault("_id_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = (image_ids(h, w, self.device), torch.zeros(text, 3, device=self.device))  # [N, 3], [L, 3]
        return cache[key]

    def forward(self, x: Tensor, t: Tensor, rows: RowCond, plan=None, segments=None) -> Tensor:
        """x [R, C, h, w] (any float dtype), t [R] (sigma x 1000) -> velocity [R, C, h, w] (model dtype)."""
        f = rows.fields
        h, w = x.shape[-2:]
        img_ids, txt_ids = self._ids(h, w, f["context"].shape[1])
        tokens = pack(x.to(self.dtype))  # [R, N, 4C]
        plan = self._image_plan(rows, plan)  # PuLID's id residuals after its blocks
        with row_segments(segments):
            out = self._model(tokens, f["context"], f["pooled"], t.to(self.dtype) / 1000, img_ids, txt_ids,
                              f.get("guidance"), plan=plan)  # [R, N, 4C]
        return unpack(out, h, w)
