"""Imagic (Kawar et al. 2023, "Imagic: Text-Based Real Image Editing with Diffusion Models").

Three stages (Sec. 3):

A. **Text embedding optimisation**: from the target text's embedding e_tgt, optimise e_opt so
   the frozen model reconstructs the image: the DDPM loss at random timesteps (Adam, lr 1e-3,
   500 steps, the paper's / diffusers community ``imagic_stable_diffusion.py`` defaults).
B. **Model fine-tuning**: with e_opt frozen, fine-tune the UNet on the same loss (lr 2e-6,
   1000 steps), fully or as LoRA (``tune="lora"``; our option: a delta of a few MB).
C. **Interpolation**: generate from noise with e = alpha·e_tgt + (1 − alpha)·e_opt on the tuned
   model (alpha 1 to 2; guidance 7.5).

``pipe.invert(image, target_text, method="imagic")`` runs A and B as one program on the one
loop -- one optimisation iteration per loop step, in its hook (it runs no rows of the loop's
model calls), so other requests keep stepping while it trains, and progress and callbacks
are the loop's. The :class:`~engine.editing.Inversion` keeps e_tgt (``source``), e_opt and
the UNet delta (``extras``: ``imagic.e_opt.*``, ``imagic.delta.*``); the tuned weights are
never written into the model or its files (:mod:`engine.models.deltas`). ``pipe.edit(inv,
"imagic", alpha=...)`` is stage C: a generation whose rows carry the delta's weights
(``UNetDenoiser.with_weights``), so it groups apart from untuned requests.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..models.deltas import make_delta
from ..prompts import Conditioning
from ..step import Program, SamplerProgram
from .common import image_size, run_one
from .inversion import Inversion
from .optim import default_checkpointing, detached, noise_loss, parameters, tensors, trainable

DELTA, E_OPT = "imagic.delta.", "imagic.e_opt."


class ImagicTuning(Program):
    """Stages A and B: ``embed_steps`` + ``tune_steps`` iterations, one per loop step."""

    def __init__(self, pipe, x0, target: Conditioning, settings: dict, *, embed_steps: int, embed_lr: float,
                 tune_steps: int, tune_lr: float, tune: str, lora_rank: int, seed: int, checkpointing: bool,
                 callback=None):
        self.pipe, self.denoiser, self.x0, self.settings = pipe, pipe.denoiser, x0.float(), settings
        self.target = target.to(pipe.device, torch.float32)
        self.e = parameters(self.target)  # e_opt, float32
        self.opt = torch.optim.Adam(tensors(self.e), lr=embed_lr)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.n_embed, self.n_tune, self.k = embed_steps, tune_steps, 0
        self.delta = make_delta(tune, pipe.unet, rank=lora_rank, generator=self.gen)
        self.tune_opt = torch.optim.Adam(self.delta.parameters(), lr=tune_lr)
        self.ckpt, self.callback, self.loss = checkpointing, callback, None
        self.H, self.W = settings["height"], settings["width"]

    # No rows in the loop's calls: each step is one optimisation iteration in the hook.
    def model_input(self):
        return None

    def model_rows(self) -> int:
        return 0

    def advance(self, _):
        den, sched = self.denoiser, self.pipe.schedule
        if self.k < self.n_embed:  # A: the embedding, model frozen
            with trainable(den.unet, self.ckpt):
                loss = noise_loss(den, sched, self.x0, self.e, self.H, self.W, self.gen)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        else:  # B: the UNet delta, embedding frozen (no checkpointing: a recomputation would see the model's own weights)
            with trainable(den.unet, False):
                loss = noise_loss(den.with_weights(self.delta.weights()), sched, self.x0, detached(self.e),
                                  self.H, self.W, self.gen)
                self.tune_opt.zero_grad(set_to_none=True)
                loss.backward()
                self.tune_opt.step()
        self.loss = loss.detach()
        if self.callback is not None:
            self.callback(dict(i=self.k, stage="embedding" if self.k < self.n_embed else "tune", loss=self.loss))
        self.k += 1

    @property
    def done(self) -> bool:
        return self.k >= self.n_embed + self.n_tune

    @property
    def steps_left(self) -> int:
        return max(self.n_embed + self.n_tune - self.k, 0)

    def result(self) -> Inversion:
        e = detached(self.e)
        extras = {E_OPT + "context": e.context}
        if e.pooled is not None:
            extras[E_OPT + "pooled"] = e.pooled
        extras.update({DELTA + n: t for n, t in self.delta.tensors().items()})
        dev = self.x0.device
        return Inversion("imagic", self.x0, self.x0[None].clone(), torch.zeros(0, dtype=torch.long), detached(self.target),
                         settings=self.settings, extras={k: v.to(dev) for k, v in extras.items()})


def invert_program(pipe, image, prompt: str, *, embed_steps: int = 500, embed_lr: float = 1e-3,
                   tune_steps: int = 1000, tune_lr: float | None = None, tune: str = "full", lora_rank: int = 4,
                   seed: int = 0, height: int | None = None, width: int | None = None,
                   checkpointing: bool | None = None, callback=None) -> ImagicTuning:
    """Stages A and B for ``image`` and the **target** text ``prompt`` (Imagic optimises from the
    edit's own embedding). ``tune``: "full" (lr 2e-6, the paper's) or "lora" (``lora_rank``; lr
    1e-4 unless given); ``seed`` draws the training noise and timesteps."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("Imagic needs the target text as the prompt: pipe.invert(image, 'a photo of ...', method='imagic')")
    if embed_steps < 0 or tune_steps < 0 or embed_lr <= 0 or (tune_lr is not None and tune_lr <= 0):
        raise ValueError("embed_steps and tune_steps must be >= 0 and the learning rates positive")
    tune_lr = tune_lr if tune_lr is not None else 2e-6 if tune == "full" else 1e-4
    x0 = pipe.encode_image(image, height, width)  # [B, C, h, w]
    if x0.shape[0] != 1:
        raise ValueError(f"Imagic tunes the model to one image; got {x0.shape[0]}: invert them one at a time")
    h, w = image_size(pipe, x0)
    target = pipe.encode_prompt(prompt, guidance=False)[0]
    settings = dict(prompt=prompt, height=h, width=w, embed_steps=embed_steps, embed_lr=embed_lr,
                    tune_steps=tune_steps, tune_lr=tune_lr, tune=tune, lora_rank=lora_rank, seed=seed)
    return ImagicTuning(pipe, x0, target, settings, embed_steps=embed_steps, embed_lr=embed_lr, tune_steps=tune_steps,
                        tune_lr=tune_lr, tune=tune, lora_rank=lora_rank, seed=seed,
                        checkpointing=default_checkpointing(pipe.denoiser, checkpointing), callback=callback)


def invert(pipe, image, prompt: str, *, progress: bool = True, **params) -> Inversion:
    return run_one(pipe, invert_program(pipe, image, prompt, **params), progress)


def tuned_weights(pipe, inv: Inversion) -> dict:
    """The UNet parameters of an Imagic inversion's delta, in the model's dtypes."""
    s = inv.settings
    saved = {k[len(DELTA):]: v.to(pipe.device) for k, v in inv.extras.items() if k.startswith(DELTA)}
    with torch.no_grad():
        return make_delta(s["tune"], pipe.unet, rank=s.get("lora_rank", 4), tensors=saved).weights()


def edit_program(pipe, inv: Inversion, target_prompt=None, *, alpha: float = 1.0, guidance_scale: float = 7.5,
                 steps: int = 50, seed: int | None = None, sampler: str | None = None, eta: float = 0.0,
                 negative_prompt=None, callback=None) -> SamplerProgram:
    """Stage C: generate with alpha·e_tgt + (1 − alpha)·e_opt on the tuned UNet."""
    if inv.method != "imagic":
        raise ValueError(f"method='imagic' edits an Imagic inversion, not a {inv.method!r} one: "
                         f"pipe.invert(image, target_text, method='imagic') first")
    if target_prompt is not None and target_prompt != inv.settings.get("prompt"):
        raise ValueError(f"this Imagic inversion was tuned for {inv.settings.get('prompt')!r}; "
                         f"invert again with the new text (or leave target_prompt out)")
    s, dev = inv.settings, pipe.device
    e_opt = Conditioning(inv.extras[E_OPT + "context"], inv.extras.get(E_OPT + "pooled"))
    mix = lambda a, b: None if a is None else alpha * a.float() + (1 - alpha) * b.float()  # noqa: E731
    cond = Conditioning(mix(inv.source.context, e_opt.context), mix(inv.source.pooled, e_opt.pooled))
    # A generation (its latents, sampler and noise draws) whose conditional rows are the mix.
    gen = pipe.generation_program("", negative_prompt, steps=steps, guidance_scale=guidance_scale, height=s["height"],
                                  width=s["width"], seed=seed, sampler=sampler, eta=eta)
    g = replace(gen.g, cond=cond.to(dev, pipe.dtype))
    den = pipe.denoiser.with_weights(tuned_weights(pipe, inv))
    return SamplerProgram(den, g, gen.x, gen.sampler, height=s["height"], width=s["width"], noise=gen.noise,
                          callback=callback)


def edit(pipe, inv: Inversion, target_prompt=None, *, progress: bool = True, **params):
    return run_one(pipe, edit_program(pipe, inv, target_prompt, **params), progress)
