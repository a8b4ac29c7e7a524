"""Plug-and-Play diffusion features (Tumanyan et al. 2023, "Plug-and-Play Diffusion Features
for Text-Driven Image-to-Image Translation"), for SD and SDXL.

The source image is DDIM-inverted; the edit regenerates from its noisiest latent under the
target prompt while a *source row* replays the inversion's stored trajectory in the same
model call: model rows [source x B, uncond x B, cond x B] (the reference's batch
``[source, uncond, cond]``). The target rows (unconditional and conditional) take

* the source row's ResNet output at ``up_blocks[1].resnets[1]`` during the first
  ``pnp_f_t`` of the steps (feature injection: :mod:`engine.models.features`);
* the source row's self-attention queries and keys (``q_from``/``k_from``; their own
  values) in the decoder's self-attention layers -- up blocks 1 to 3, except the first
  transformer of up block 1 (the reference's ``{1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}``) --
  during the first ``pnp_attn_t`` of the steps.

The reference is SD-only. Its rule, stated on the UNet's layout so that it carries to
SDXL (whose first up block already has attention) and other UNets: the ResNet is
``resnets[1]`` of the first up block with attention, and the self-attention layers are
those of every up block from there on, except that block's first transformer.

Defaults as the reference code (``pnp_attn_t=0.5``, ``pnp_f_t=0.8``, guidance 7.5; its
inversion runs 50 DDIM steps with an empty prompt). The source row is conditioned on the
inversion's prompt (the reference's empty prompt when the image was inverted with "").
Everything is data in the per-step plans; the edit is one program on the one loop.
"""

from __future__ import annotations

import torch

from ..models.attention import AttentionPlan
from ..prompts import as_list
from ..step import SamplerProgram
from .common import guidance_for, run_one

def first_attention_up_block(unet) -> int:
    """Index of the first up block with attention (SD: 1, SDXL: 0)."""
    for i, block in enumerate(unet.up_blocks):
        if block.attentions is not None:
            return i
    raise ValueError("Plug-and-Play needs a UNet whose decoder has attention blocks")


def default_feature_site(unet) -> str:
    """The reference's ``up_blocks[1].resnets[1]`` on SD: resnets[1] of the first up block with attention."""
    return f"up_blocks.{first_attention_up_block(unet)}.resnets.1"


def pnp_attention_layers(unet, blocks: dict | None = None) -> set[int]:
    """Self-attention layer indices of the decoder transformers ``blocks`` ({up block: [its
    attentions]}; default: the reference's, see the module docstring)."""
    first = first_attention_up_block(unet) if blocks is None else None
    picked = set()
    for l in unet.attn_layers:
        parts = l.name.split(".")
        if l.cross or parts[0] != "up_blocks":
            continue
        blk, att = int(parts[1]), int(parts[3])
        chosen = (blk >= first and (blk, att) != (first, 0)) if blocks is None else att in blocks.get(blk, ())
        if chosen:
            picked.add(l.index)
    if not picked:
        raise ValueError("Plug-and-Play found no decoder self-attention layer to inject; "
                         "give pnp_attn_blocks={up block: [attention indices]}")
    return picked


class PnPEdit(SamplerProgram):
    """Target rows [uncond, cond] (or cond) and a source row per image reading the inversion."""

    def __init__(self, pipe, g, rp, src_rows, plans, callback=None):
        h, w = rp.x.shape[-2:]
        f = pipe.vae_scale_factor
        super().__init__(pipe.denoiser, g, rp.x, rp.sampler, height=h * f, width=w * f,
                         start=rp.first + rp.start, callback=callback)
        tgt = self.rows
        self.rows = type(tgt).cat([src_rows, tgt])  # [source x B, uncond x B, cond x B]
        self.n_src, self.i0, self.rp, self.plans = len(src_rows), rp.first + rp.start, rp, plans

    def model_input(self):
        k = self.i - self.i0
        x_src = self.sampler.scale_model_input(self.rp.latents[self.rp.start + k], self.i)  # [B, C, h, w]
        x_tgt = self.sampler.scale_model_input(self.x, self.i)
        x_rows = torch.cat([x_src] + [x_tgt] * self.copies)  # [R, C, h, w]
        return x_rows, self.sampler.timesteps[self.i].expand(x_rows.shape[0])

    def combine(self, out):
        return super().combine(out[self.n_src:])  # the source row's prediction is not used

    def plan(self):
        return self.plans[self.i - self.i0]


def edit_program(pipe, inv, target_prompt=None, *, guidance_scale: float = 7.5, negative_prompt=None,
                 pnp_attn_t: float = 0.5, pnp_f_t: float = 0.8, feature_site: str | None = None,
                 pnp_attn_blocks: dict | None = None, callback=None) -> PnPEdit:
    """Plug-and-Play edit of a DDIM inversion ``inv`` towards ``target_prompt``; the program's
    result is the edited latents [B, C, h, w].

    pnp_attn_t: fraction of the steps (the first ones) in which the target's decoder
        self-attention uses the source's queries and keys. pnp_f_t: fraction in which the
        ResNet features at ``feature_site`` (a module path; default: the reference's, see the
        module docstring) are the source's. pnp_attn_blocks: {up block:
        [attention indices]} to inject instead of the reference's layers. With both
        fractions 0 the edit is exactly the plain DDIM regeneration under the target.
    """
    for name, v in (("pnp_attn_t", pnp_attn_t), ("pnp_f_t", pnp_f_t)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {v}")
    if inv.noise is not None:
        raise ValueError("Plug-and-Play replays a DDIM inversion's trajectory; invert with method='ddim'")
    rp = inv.replay(pipe.schedule, pipe.device, pipe.dtype)
    s, B, dev, S = inv.settings, rp.x.shape[0], pipe.device, rp.steps
    h, w = s.get("height"), s.get("width")
    target = as_list(s.get("prompt", "") if target_prompt is None else target_prompt, B, "target_prompt")
    g = guidance_for(pipe, target, negative_prompt, guidance_scale, h, w, B)
    g_src = guidance_for(pipe, as_list(s.get("prompt", ""), B, "inversion prompt"), None, 1.0, h, w, B)
    src_rows = pipe.denoiser.condition_guidance(g_src, h, w)  # [B]: the source rows' conditioning

    n_tgt = 2 * B if g.guided else B
    reads = torch.cat([torch.arange(B), torch.arange(B).repeat(n_tgt // B)]).to(dev)  # [R]: every row reads the source
    n_attn, n_feat = int(S * pnp_attn_t), int(S * pnp_f_t)
    site = pipe.unet.site(feature_site or default_feature_site(pipe.unet)) if n_feat else None
    attn = frozenset(pnp_attention_layers(pipe.unet, pnp_attn_blocks)) if n_attn else frozenset()
    def plan(a: bool, f: bool):  # one plan object per combination: the loop memoises merges by identity
        return None if not (a or f) else AttentionPlan(
            self_inject={"q_from": reads, "k_from": reads} if a else None, layers=attn if a else frozenset(),
            features={site.index: reads} if f else {})

    cache, plans = {}, []
    for k in range(S):
        on = (k < n_attn, k < n_feat)
        if on not in cache:
            cache[on] = plan(*on)
        plans.append(cache[on])
    return PnPEdit(pipe, g, rp, src_rows, plans, callback)


@torch.no_grad()
def edit(pipe, inv, target_prompt=None, *, progress: bool = True, **params):
    """Plug-and-Play edit (see :func:`edit_program`); returns the edited latents [B, C, h, w]."""
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)
