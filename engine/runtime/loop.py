"""The sampling loop through a `GraphRunner`: one graph per step (model + guidance + sampler
update), or the whole loop in one graph for few-step models.

`sample_graphed` has the semantics of `engine.sampling.sample` (same noise draws, same
callback, same results bit for bit in eager and "fake" modes); the model is a
`GuidedUNet`, whose tensors (text conditioning, guidance scale) are graph inputs rather
than closure constants, so a new prompt or scale replays the same graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..pipeline import Guidance, cfg_combine
from ..prompts import Conditioning
from ..sampling.front import randn
from ..sampling.samplers import Sampler, SamplerState
from .graphs import GraphRunner

LOOP_MAX_STEPS = 4  # up to this many steps (and no callback) the whole loop is one graph


@dataclass
class GuidedUNet:
    """Pipeline.model_fn as data: ``unet`` plus the tensors of one :class:`Guidance`.

    ``consts()`` holds every tensor the forward reads (the graph's const inputs): the
    context [R, L, D] (R = 2B with guidance: uncond rows, then cond rows), SDXL's added
    embeddings, and the guidance scale / rescale as 0-dim float32 tensors.
    """

    unet: nn.Module
    context: Tensor  # [R, L, Dctx]
    added: dict | None  # {"text_embeds": [R, Dpool], "time_ids": [R, 6]} (SDXL)
    scale: Tensor | None  # [] float32; None: no guidance
    rescale: Tensor | None = None  # [] float32; None: no rescaling
    keep: Tensor | None = None  # [] float32, 1 - rescale rounded as the float expression is
    plan: object = None  # AttentionPlan or None

    @classmethod
    def from_guidance(cls, unet: nn.Module, g: Guidance, plan=None) -> GuidedUNet:
        dev = g.cond.context.device
        f32 = lambda v: torch.tensor(v, dtype=torch.float32, device=dev)  # noqa: E731
        if g.uncond is None:
            added = None if g.cond.pooled is None else {"text_embeds": g.cond.pooled, "time_ids": g.time_ids}
            return cls(unet, g.cond.context, added, None, plan=plan)
        both = Conditioning.cat([g.uncond, g.cond])
        added = None
        if both.pooled is not None:
            added = {"text_embeds": both.pooled, "time_ids": torch.cat([g.time_ids, g.time_ids])}
        rescale = keep = None
        if g.rescale > 0:
            rescale, keep = f32(g.rescale), f32(1 - g.rescale)
        return cls(unet, both.context, added, f32(g.scale), rescale, keep, plan)

    @property
    def out_dtype(self) -> torch.dtype:
        """Dtype of the guided output (guidance combines in float32)."""
        return torch.float32 if self.scale is not None else self.unet.dtype

    def consts(self) -> dict:
        return dict(context=self.context, added=self.added, scale=self.scale, rescale=self.rescale,
                    keep=self.keep, plan=self.plan)

    def forward(self, x: Tensor, t: Tensor, c: dict) -> Tensor:
        """x [B, C, h, w], t [B] -> guided output [B, C, h, w], from the tensors in ``c``."""
        if c["scale"] is None:
            return self.unet(x, t, c["context"], c["added"], plan=c["plan"])
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), c["context"], c["added"], plan=c["plan"])  # [2B, ...]
        return cfg_combine(out, c["scale"], c["rescale"] if c["rescale"] is not None else 0.0, c["keep"])


def denoise_step(model: GuidedUNet, inp: dict, c: dict):
    """One step. inp: x, state, i ([B] int64 step per row), noise (per step);
    c: sampler and the model's tensors (per call: copied only when they change)."""
    smp: Sampler = c["sampler"]
    x, i = inp["x"], inp["i"]
    out = model.forward(smp.scale_model_input(x, i), smp.timesteps[i], c["model"])  # [B, C, h, w]
    return smp.step(i, x, out, inp["state"], inp["noise"])


def _draw(sampler: Sampler, i: int, shape, dtype, device, generator, noise_fn):
    """The noise of step i, drawn exactly as `sample` draws it (before the step, since the
    graph runs model and step together; ``noise_fn`` gets None for the model output)."""
    if not sampler.needs_noise(i):
        return None
    if noise_fn is not None:
        return noise_fn(i, None)
    return randn(shape, generator, device, sampler.noise_dtype or dtype)


@torch.no_grad()
def sample_graphed(
    runner: GraphRunner,
    model: GuidedUNet,
    x: Tensor,
    sampler: Sampler,
    *,
    generator=None,
    noise_fn: Callable[[int, Tensor | None], Tensor] | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
    start: int = 0,
    state: SamplerState | None = None,
    whole_loop: bool | None = None,
) -> Tensor:
    """`engine.sampling.sample` through ``runner``. ``whole_loop``: one graph for all steps
    (default: when at most LOOP_MAX_STEPS steps run and there is no callback)."""
    state = sampler.init_state(x) if state is None else state
    b, n = x.shape[0], len(sampler)
    todo = list(range(start, n))
    if whole_loop is None:
        whole_loop = len(todo) <= LOOP_MAX_STEPS and callback is None
    rows = torch.arange(n, device=x.device)[:, None].expand(n, b)  # [S, B] step index of every row
    consts = dict(model=model.consts(), sampler=sampler)
    if whole_loop and todo:
        noise = [_draw(sampler, i, x.shape, model.out_dtype, x.device, generator, noise_fn) for i in todo]
        inp = dict(x=x, state=state, i=rows[start:], noise=noise)
        body = lambda inp, c: _loop_body(model, inp, c)  # noqa: E731
        x, _ = runner.run(("loop", id(model.unet)), body, inp, consts)
        return x.clone()
    body = lambda inp, c: denoise_step(model, inp, c)  # noqa: E731
    for i in tqdm(todo, disable=not progress):
        noise = _draw(sampler, i, x.shape, model.out_dtype, x.device, generator, noise_fn)
        inp = dict(x=x, state=state, i=rows[i], noise=noise)
        x, state = runner.run(("step", id(model.unet)), body, inp, consts)
        if callback is not None:
            # static outputs are overwritten by the next replay: hand out copies
            callback(dict(i=i, t=sampler.timesteps[i].expand(b), x=x.clone(), x0=state.x0.clone()))
    return x.clone()


def _loop_body(model: GuidedUNet, inp: dict, c: dict):
    x, state = inp["x"], inp["state"]
    for k, noise in enumerate(inp["noise"]):
        x, state = denoise_step(model, dict(x=x, state=state, i=inp["i"][k], noise=noise), c)
    return x, state
