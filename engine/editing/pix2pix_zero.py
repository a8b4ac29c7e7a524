"""pix2pix-zero (Parmar et al. 2023, "Zero-shot Image-to-Image Translation"), for SD and SDXL.

* **Inversion** (``method="pix2pix-zero"``): DDIM inversion under the image's caption with
  the predicted noise regularised before every update (:mod:`engine.editing.regularise`:
  auto-correlation and KL, λ 20, 5 steps), so the inverted latent stays Gaussian-like.
* **Edit direction**: the mean text embedding of sentences with the target concept minus
  that of sentences with the source one (the paper generates ~1000 sentences per word with
  GPT-3). ``direction=(source, target)`` takes two lists of sentences, or two words: then
  each image's caption with the word swapped (``"a red cat"`` / ``"a blue cat"``), or the bare
  words when the caption lacks it; or a precomputed tensor [L, D]. Without ``direction``, the
  target prompt minus the caption (neither: no direction, a reconstruction). The edit's
  condition is caption + direction.
* **Cross-attention guidance**: the edit keeps the *reference* cross-attention maps, those of
  the reconstruction (the caption, no guidance: the official code's negative prompt is the
  caption itself). Before each step, x_t ← x_t − λ ∇_{x_t} Σ_layers ||M_t^edit − M_t^ref||²
  (λ = 0.1, every cross-attention layer), then the guided step with the caption as the
  unconditional rows (scale 5, the official ``negative_guidance_scale``).

The edit is one program on the one loop. The reconstruction rides along in the same model
calls **one step ahead** (its rows carry the next timestep: calls mix timesteps), storing its
maps through the attention plan; the per-step hook then has M_{t}^ref when it needs it, and
no pass over all steps is stored (the reference pipelines keep every step's maps). The
gradient is taken in the hook, from one extra forward/backward of the edit's conditional
rows with their maps stored differentiably (head-averaged maps, the seam's; the reference
averages the per-head squared error, a stronger pull for the same λ).
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from ..models.attention import AttentionPlan
from ..prompts import Conditioning, as_list
from ..step import Guidance, RowCond, SamplerProgram
from .common import run_one
from .ddim import DDIMInversion, inversion_inputs
from .optim import default_checkpointing, trainable
from .p2p import layer_grid
from .regularise import NoiseRegulariser


# ---- inversion --------------------------------------------------------------------------------


class RegularisedInversion(DDIMInversion):
    """DDIM inversion whose noise predictions are regularised before each update."""

    def __init__(self, pipe, g, x0, steps: int, settings: dict, reg: NoiseRegulariser, generator, callback=None):
        super().__init__(pipe, g, x0, steps, settings, callback)
        self.reg, self.gen = reg, generator
        self.ac = pipe.schedule.alphas_cumprod.to(pipe.device)
        self.ptype = pipe.schedule.config.prediction_type

    def advance(self, pred):
        t = self.sampler.timesteps[self.i]
        a = self.ac[t.long()].expand(self.x.shape[0])  # [B] the model's noise level, as diffusers' get_epsilon
        super().advance(self.reg(pred, self.sampler.scale_model_input(self.x, self.i), a, self.ptype, self.gen))

    def result(self):
        return replace(super().result(), method="pix2pix-zero")


def invert_program(pipe, image, prompt: str = "", *, steps: int = 50, lambda_ac: float = 20.0,
                   lambda_kl: float = 20.0, reg_steps: int = 5, rolls: int = 5, seed: int = 0,
                   height: int | None = None, width: int | None = None, callback=None) -> RegularisedInversion:
    """Invert under the caption ``prompt`` (guidance 1) with noise regularisation; ``seed``
    draws the auto-correlation shifts."""
    reg = NoiseRegulariser(lambda_ac, lambda_kl, reg_steps, rolls)
    g, x0, settings = inversion_inputs(pipe, image, prompt, steps, 1.0, height=height, width=width)
    settings["regularisation"] = dict(lambda_ac=lambda_ac, lambda_kl=lambda_kl, steps=reg_steps, rolls=rolls, seed=seed)
    return RegularisedInversion(pipe, g, x0, steps, settings, reg, torch.Generator().manual_seed(int(seed)), callback)


def invert(pipe, image, prompt: str = "", *, progress: bool = True, **params):
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)


# ---- the edit direction ----------------------------------------------------------------------


def _mean_embedding(pipe, sentences: list[str]) -> Conditioning:
    c = pipe.encode_prompt(sentences, guidance=False)[0]  # [n, L, D]
    return Conditioning(c.context.float().mean(0, keepdim=True), None if c.pooled is None else c.pooled.float().mean(0, keepdim=True))


def _swap_word(caption: str, word: str, new: str) -> str | None:
    pattern = rf"\b{re.escape(word)}\b"
    return re.sub(pattern, new, caption) if re.search(pattern, caption) else None


def edit_direction(pipe, captions: list[str], target_prompt=None, direction=None) -> Conditioning:
    """The per-image direction [B, L, D] (+ pooled [B, P]) added to the captions' embeddings."""
    B = len(captions)
    if direction is not None and target_prompt is not None:
        raise ValueError("pix2pix-zero takes a target_prompt or a direction, not both")
    if direction is None:  # the target prompt minus the caption (none: a reconstruction)
        targets = captions if target_prompt is None else as_list(target_prompt, B, "target_prompt")
        pairs = [([c], [t]) for c, t in zip(captions, targets)]
    elif isinstance(direction, torch.Tensor):
        d = direction.float().reshape(-1, *direction.shape[-2:])  # [1 or B, L, D]
        return Conditioning(d.expand(B, -1, -1), None)
    else:
        if not (isinstance(direction, (tuple, list)) and len(direction) == 2):
            raise ValueError("direction must be (source, target): two words, two lists of sentences, or a tensor [L, D]")
        src, tgt = direction
        if isinstance(src, str) and isinstance(tgt, str):  # two words: the captions with the word swapped
            pairs = []
            for c in captions:
                swapped = _swap_word(c, src, tgt)
                pairs.append(([c], [swapped]) if swapped is not None else ([src], [tgt]))
        else:
            src, tgt = as_list(src, None, "direction source sentences"), as_list(tgt, None, "direction target sentences")
            pairs = [(src, tgt)] * B
    parts = []
    for s, t in pairs:
        a, b = _mean_embedding(pipe, s), _mean_embedding(pipe, t)
        parts.append(Conditioning(b.context - a.context, None if a.pooled is None else b.pooled - a.pooled))
    return Conditioning.cat(parts)


# ---- the edit --------------------------------------------------------------------------------


class Pix2PixZeroEdit(SamplerProgram):
    """Rows [reconstruction x B (one step ahead), uncond x B, edit x B]; see the module docstring."""

    def __init__(self, pipe, g: Guidance, caption: Conditioning, rp, amount: float, checkpointing: bool, callback=None):
        f = pipe.vae_scale_factor
        self.H, self.W = rp.x.shape[-2] * f, rp.x.shape[-1] * f
        super().__init__(pipe.denoiser, g, rp.x, rp.sampler, height=self.H, width=self.W, start=rp.first + rp.start,
                         callback=callback)
        den, B = self.denoiser, rp.x.shape[0]
        self.b, self.amount, self.ckpt = B, amount, checkpointing
        self.x_src = rp.x.clone()  # [B, C, h, w] the reconstruction, one step ahead of self.x
        self.src_rows = den.condition(caption, self.H, self.W)  # [B]
        self.edit_cond_rows = den.condition(g.cond, self.H, self.W)  # [B]: the rows whose maps are guided
        self.both = RowCond.cat([self.src_rows, self.rows])  # [3B] (or [2B] without guidance)
        h, w = rp.x.shape[-2:]
        L = caption.context.shape[1]
        self.layers = {l.index: layer_grid(h, w, l.scale) for l in den.attn_layers if l.cross}
        if not self.layers:
            raise ValueError("pix2pix-zero's cross-attention guidance needs a model with cross-attention layers")
        n = len(self.both)
        self.store = {i: torch.zeros(n, gh * gw, L, device=rp.x.device) for i, (gh, gw) in self.layers.items()}
        self.src_plan = AttentionPlan(store=self.store)  # [n, Nq, L] per layer; rows [0, B) are the reference
        self.started = False

    def _maps(self, rows: int) -> dict:
        L = next(iter(self.store.values())).shape[-1]
        return {i: torch.zeros(rows, gh * gw, L, device=self.x.device) for i, (gh, gw) in self.layers.items()}

    @property
    def src_active(self) -> bool:
        return self.i + 1 < self.end  # the reconstruction's next step exists

    def _start(self) -> None:
        """Before the first call: the reconstruction's first step alone (its maps and update),
        then the guidance of the edit's first step."""
        i, den = self.i, self.denoiser
        ref = self._maps(self.b)
        out = den(self.sampler.scale_model_input(self.x_src, i), self._t(i), self.src_rows, AttentionPlan(store=ref))
        self.x_src = self.sampler.step(i, self.x_src, out.float())[0]
        self._guide(i, ref)
        self.started = True

    def _t(self, i: int):
        return self.sampler.timesteps[i].expand(self.b)  # [B]

    def _guide(self, i: int, ref: dict) -> None:
        """x_t ← x_t − λ ∇ Σ_layers ||M^edit − M^ref||² (each image's loss its own)."""
        if self.amount == 0:
            return
        den, maps = self.denoiser, self._maps(self.b)
        with trainable(den.unet, self.ckpt):
            x = self.x.detach().requires_grad_()
            den(self.sampler.scale_model_input(x, i), self._t(i), self.edit_cond_rows, AttentionPlan(store=maps))
            loss = sum(((maps[l] - ref[l]) ** 2).sum((1, 2)) for l in maps).sum()
            (grad,) = torch.autograd.grad(loss, x)
        self.x = (x - self.amount * grad).detach()

    # ---- the protocol -------------------------------------------------------------------
    def cond(self):
        return self.both if self.src_active else self.rows

    def plan(self):
        return self.src_plan if self.src_active else None

    def model_input(self):
        if not self.started:
            self._start()
        x, t = super().model_input()  # the edit's rows at step i
        if not self.src_active:
            return x, t
        j = self.i + 1
        x_src = self.sampler.scale_model_input(self.x_src, j)  # [B, C, h, w]
        return torch.cat([x_src, x]), torch.cat([self._t(j), t])

    def combine(self, out):
        if not self.src_active:
            return None, super().combine(out)
        return out[:self.b], super().combine(out[self.b:])

    def advance(self, outs):
        src_out, guided = outs
        ref = None
        if src_out is not None:  # the reconstruction's step i+1, and its maps: the reference of step i+1
            self.x_src = self.sampler.step(self.i + 1, self.x_src, src_out.float())[0]
            ref = {l: m[:self.b] for l, m in self.store.items()}  # views: used below, before the next call writes
        super().advance(guided)
        if ref is not None:
            self._guide(self.i, ref)


def edit_program(pipe, inv, target_prompt=None, *, direction=None, guidance_scale: float = 5.0,
                 cross_attention_guidance: float = 0.1, negative_prompt=None, checkpointing: bool | None = None,
                 callback=None) -> Pix2PixZeroEdit:
    """Edit a (pix2pix-zero, or any deterministic) inversion along ``direction`` (see the module
    docstring). ``guidance_scale``: classifier-free guidance against the caption (or
    ``negative_prompt``); ``cross_attention_guidance``: λ (0: no guidance)."""
    if cross_attention_guidance < 0:
        raise ValueError(f"cross_attention_guidance must be >= 0, got {cross_attention_guidance}")
    rp = inv.replay(pipe.schedule, pipe.device, pipe.dtype)
    if rp.noise is not None:
        raise ValueError("pix2pix-zero edits a deterministic inversion (method='pix2pix-zero' or 'ddim'), "
                         f"not a {inv.method!r} one with noise maps")
    B = inv.x0.shape[0]
    captions = as_list(inv.settings.get("prompt", ""), B, "inversion prompt")
    caption = inv.source if len(inv.source) == B else pipe.encode_prompt(captions, guidance=False)[0]
    caption = caption.to(pipe.device, torch.float32)
    d = edit_direction(pipe, captions, target_prompt, direction).to(pipe.device, torch.float32)
    if d.context.shape[1:] != caption.context.shape[1:]:
        raise ValueError(f"the direction is {list(d.context.shape[1:])} but this model's text embeddings are "
                         f"{list(caption.context.shape[1:])}")
    edit = Conditioning(caption.context + d.context,
                        None if caption.pooled is None else caption.pooled + (0 if d.pooled is None else d.pooled))
    uncond = None
    if guidance_scale > 1.0:
        uncond = caption if negative_prompt is None else pipe.encode_prompt(captions, negative_prompt)[1]
        uncond = uncond.to(pipe.device, pipe.dtype)
    g = Guidance(edit.to(pipe.device, pipe.dtype), uncond, None, guidance_scale)
    return Pix2PixZeroEdit(pipe, g, caption.to(pipe.device, pipe.dtype), rp, cross_attention_guidance,
                           default_checkpointing(pipe.denoiser, checkpointing), callback)


def edit(pipe, inv, target_prompt=None, *, progress: bool = True, **params):
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)
