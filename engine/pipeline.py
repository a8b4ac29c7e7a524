"""The pipeline object users hold: text encoding, the batched denoising step, VAE, generation.

Every branch of a forward (unconditional and conditional rows today; source,
edit and guidance rows for the editing methods) goes through one UNet call per
timestep. Rows carry their own timestep ([B] tensor), so batches may mix rows
at different timesteps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .images import load_image, to_output
from .models.attention import AttentionPlan
from .prompts import Conditioning, as_list, encode
from .sampling import NoiseSchedule, SchedulerConfig, make_sampler, sample, sampler_name_for
from .sampling.schedule import UnsupportedConfigError

log = logging.getLogger("overpaint")


@dataclass
class Guidance:
    """Conditioning of a (possibly classifier-free-guided) batch of B rows."""

    cond: Conditioning  # [B, ...]
    uncond: Conditioning | None  # [B, ...]; None: no guidance, one UNet row per sample
    time_ids: torch.Tensor | None  # [B, 6] SDXL micro-conditioning
    scale: float = 1.0
    rescale: float = 0.0

    def __len__(self) -> int:
        return len(self.cond)

    def tile(self, n: int) -> "Guidance":
        """The same guidance for n blocks of rows (e.g. n timesteps of B images in one call)."""
        ids = None if self.time_ids is None else self.time_ids.repeat(n, 1)
        return Guidance(self.cond.tile(n), None if self.uncond is None else self.uncond.tile(n), ids,
                        self.scale, self.rescale)


def cfg_combine(out: torch.Tensor, scale, rescale=0.0, keep=None) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) of a UNet output [2B, ...] whose rows are
    [uncond, cond]; returns [B, ...] in float32 (the difference of two close half-precision
    outputs, times the scale, is where half precision hurts).

    ``scale`` / ``rescale``: Python floats, or 0-dim float32 tensors (a CUDA graph's static
    inputs; same results as the floats). A ``rescale`` float of 0 skips the rescaling.
    ``keep``: 1 - rescale, rounded from double like the float expression (for tensors).
    """
    uncond, cond = out.float().chunk(2)  # [B, ...] each
    guided = uncond + scale * (cond - uncond)
    if isinstance(rescale, torch.Tensor) or rescale > 0:
        # Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", Sec. 3.4
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + ((1 - rescale) if keep is None else keep) * guided
    return guided


class Pipeline:
    """A loaded model: ``unet``, ``vae``, text encoders, tokenizers and the noise schedule."""

    def __init__(self, components):
        c = components
        self.components = c
        self.arch = c.arch  # "sd" or "sdxl"
        self.unet = c.unet
        self.vae = c.vae
        self.text_encoders = [e for e in (c.text_encoder, c.text_encoder_2) if e is not None]
        self.tokenizers = [t for t in (c.tokenizer, c.tokenizer_2) if t is not None]
        self.scheduler_config = SchedulerConfig.from_dict(c.scheduler_config)
        self.schedule = NoiseSchedule(self.scheduler_config)
        self.model_index = c.model_index
        self.vae_dtype = c.vae_dtype
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        try:
            self.default_sampler = sampler_name_for(self.scheduler_config)
        except UnsupportedConfigError:
            # e.g. SD1.5 ships PNDM, which we do not implement: DDIM is the usual stand-in.
            self.default_sampler = "ddim"
            log.info("no sampler for scheduler %s; using ddim", self.scheduler_config.class_name)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def default_size(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor

    # ---- text ---------------------------------------------------------------------------
    def encode_prompt(self, prompt, negative_prompt=None, num_images: int = 1,
                      guidance: bool = True) -> tuple[Conditioning, Conditioning | None]:
        """Encode prompts; returns (cond, uncond), each with ``num_images`` rows per prompt.

        SDXL checkpoints with ``force_zeros_for_empty_prompt`` use zero embeddings for
        the unconditional rows when no negative prompt is given, as diffusers does.
        """
        prompts = as_list(prompt)
        cond = encode(self.text_encoders, self.tokenizers, prompts, self.device, self.dtype)
        uncond = None
        if guidance:
            if negative_prompt is None and self.arch == "sdxl" and self.model_index.get("force_zeros_for_empty_prompt", True):
                uncond = cond.zeros_like()
            else:
                neg = as_list("" if negative_prompt is None else negative_prompt, len(prompts), "negative_prompt")
                uncond = encode(self.text_encoders, self.tokenizers, neg, self.device, self.dtype)
            uncond = uncond.repeat(num_images)
        return cond.repeat(num_images), uncond

    def time_ids(self, n: int, height: int, width: int, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None) -> torch.Tensor | None:
        """SDXL micro-conditioning rows [n, 6]: original size, crop top-left, target size."""
        if self.arch != "sdxl":
            return None
        ids = list(original_size or (height, width)) + list(crops_coords_top_left) + list(target_size or (height, width))
        cfg = self.unet.config
        expected = cfg.projection_class_embeddings_input_dim
        got = cfg.addition_time_embed_dim * len(ids) + self.text_encoders[-1].config.projection_dim
        if expected != got:
            raise ValueError(f"UNet expects an added embedding of {expected} but text encoder 2 and time ids give {got}")
        return torch.tensor([ids], dtype=self.dtype, device=self.device).repeat(n, 1)

    # ---- the batched step ---------------------------------------------------------------
    def guidance(self, prompt, negative_prompt=None, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, num_images: int = 1, guidance_rescale: float = 0.0, **size_kw) -> Guidance:
        """Encode prompts into a :class:`Guidance` (unconditional rows only when scale > 1)."""
        height, width = height or self.default_size, width or self.default_size
        use_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images, use_cfg)
        time_ids = self.time_ids(len(cond), height, width, **size_kw)
        return Guidance(cond, uncond, time_ids, guidance_scale, guidance_rescale)

    def model_fn(self, g: Guidance, plan: AttentionPlan | None = None):
        """A function (x [B, C, h, w], t [B]) -> guided model output [B, C, h, w].

        With guidance, unconditional and conditional rows run in one UNet call of 2B rows.
        """
        if g.uncond is None:
            added = None if g.cond.pooled is None else {"text_embeds": g.cond.pooled, "time_ids": g.time_ids}
            return lambda x, t: self.unet(x, t, g.cond.context, added, plan=plan)
        both = Conditioning.cat([g.uncond, g.cond])
        added = None
        if both.pooled is not None:
            added = {"text_embeds": both.pooled, "time_ids": torch.cat([g.time_ids, g.time_ids])}

        def fn(x, t):
            out = self.unet(torch.cat([x, x]), torch.cat([t, t]), both.context, added, plan=plan)  # [2B, C, h, w]
            return cfg_combine(out, g.scale, g.rescale)

        return fn

    # ---- VAE ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> images [B, 3, H, W] in [0, 1] (float32)."""
        cfg = self.vae.config
        z = latents.to(self.vae_dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        images = self.vae.decode(z).sample  # [B, 3, H, W] in [-1, 1]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_image(self, image, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """An image (path, PIL, array or tensor in [0, 1]) -> scaled latents [B, C, h, w].

        The image must already have the model's size constraints (a multiple of the VAE
        factor); with ``height``/``width`` it is resized (bicubic) first. The latent is the
        posterior mode, so inversion is deterministic.
        """
        x = load_image(image)  # [B, 3, H, W] in [0, 1]
        if height or width:
            x = torch.nn.functional.interpolate(x, size=(height or x.shape[-2], width or x.shape[-1]),
                                                mode="bicubic", align_corners=False).clamp(0, 1)
        h, w = x.shape[-2:]
        f = self.vae_scale_factor
        if h % f or w % f:
            raise ValueError(f"image is {w}x{h}; this model needs sides that are multiples of {f}: "
                             f"resize or crop it (e.g. pass height={h // f * f}, width={w // f * f})")
        cfg = self.vae.config
        z = self.vae.encode((x * 2 - 1).to(self.device, self.vae_dtype)).latent_dist.mode()  # [B, C, h, w]
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = (z - mean) * cfg.scaling_factor / std
        else:
            z = z * cfg.scaling_factor
        return z.to(self.dtype)

    # ---- editing ------------------------------------------------------------------------
    def invert(self, image, prompt: str = "", method: str = "ddim", **params):
        """Invert a real image into the model's noise space; returns an :class:`Inversion`
        that can be edited many times (``edit``) and saved (``inv.save(path)``)."""
        from .editing import inverter

        return inverter(method)(self, image, prompt, **params)

    def edit(self, inv, method: str | None = None, target_prompt: str | None = None, *,
             output_type: str = "pil", **params):
        """Regenerate an inverted image under an edit. ``method``: "p2p", "ledits++",
        "ddim" or "ddpm" (default: the inversion's own method)."""
        from .editing import editor

        latents = editor(method or inv.method)(self, inv, target_prompt, **params)
        return to_output(self.decode(latents), output_type)

    def reconstruct(self, inv, *, output_type: str = "pil", **params):
        """Regenerate the source image from an inversion (no edit)."""
        return self.edit(inv, inv.method, None, output_type=output_type, **params)

    # ---- generation ---------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        m = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height <= 0 or width <= 0 or height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be positive multiples of {self.vae_scale_factor}, got {height}x{width}")
        if height % m or width % m:
            log.info("size %dx%d is not a multiple of %d: the UNet upsamples to explicit sizes", height, width, m)

    @torch.no_grad()
    def generate(self, prompt, negative_prompt=None, *, steps: int = 50, guidance_scale: float = 7.5,
                 height: int | None = None, width: int | None = None, seed: int | None = None,
                 num_images: int = 1, sampler: str | None = None, eta: float = 0.0,
                 guidance_rescale: float = 0.0, latents: torch.Tensor | None = None,
                 generator: torch.Generator | None = None, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None, output_type: str = "pil", callback=None, progress: bool = True,
                 cuda_graphs: bool | None = None):
        """Text to image. Returns PIL images (or arrays / a tensor with ``output_type``).

        ``seed`` seeds a CPU generator so results do not depend on the device; pass
        ``generator`` or ``latents`` [B, 4, h, w] instead to control the draws. ``callback``
        receives a dict per step (see :func:`engine.sampling.sample`). ``cuda_graphs``:
        run the steps as captured CUDA graphs (:mod:`engine.runtime.graphs`; eager, with the
        reason logged once, where capture is impossible); default off.
        """
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        height, width = height or self.default_size, width or self.default_size
        self.check_size(height, width)
        g = self.guidance(prompt, negative_prompt, guidance_scale, height, width, num_images, guidance_rescale,
                          original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                          target_size=target_size)
        b = len(g)
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed if seed is not None else torch.seed() % 2**63)
        shape = (b, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        # Drawn in the model dtype (as diffusers, so seeds agree), then kept in float32 by the loop.
        x = latents.to(self.device).float()

        name = sampler or self.default_sampler
        opts = {"eta": eta} if name == "ddim" else {}
        smp = make_sampler(name, self.schedule, steps, device=self.device, **opts)
        x = x * smp.init_noise_sigma
        if cuda_graphs:
            from .runtime.loop import GuidedUNet, sample_graphed

            model = GuidedUNet.from_guidance(self.unet, g)
            x = sample_graphed(self.graphs, model, x, smp, generator=generator, callback=callback, progress=progress)
        else:
            x = sample(self.model_fn(g), x, smp, generator=generator, callback=callback, progress=progress)
        return to_output(self.decode(x), output_type)

    @property
    def graphs(self):
        """This pipeline's :class:`~engine.runtime.graphs.GraphRunner` (created on first use)."""
        if getattr(self, "_graphs", None) is None:
            from .runtime.graphs import GraphRunner

            self._graphs = GraphRunner()
        return self._graphs
