"""The FLUX façade: FLUX.1-dev / -schnell (and the bundled Shapes DiT) on the same one loop.

A :class:`FluxPipeline` is a :class:`~engine.pipeline.Pipeline` whose model is our FLUX
transformer (:mod:`engine.models.flux`) behind a :class:`~engine.step.FluxDenoiser`; requests
become the same programs (generation, flow inversion, RF-Inversion) and batch with each other
step by step. What differs from the UNet pipelines is the conditioning (T5 sequence + CLIP
pooled), the flow-matching sampler and its resolution-dependent shift, and guidance:

* ``guidance_scale``: classifier-free guidance, as for every overpaint model (FluxPipeline's
  ``true_cfg_scale``): > 1 runs [negative, prompt] rows (negative prompt "" by default);
* ``embedded_guidance``: FLUX.1-dev's distilled guidance value (FluxPipeline's
  ``guidance_scale``, 3.5), embedded like the timestep; models without it refuse it.
"""

from __future__ import annotations

import logging

import torch

from .images import load_image
from .pipeline import Pipeline
from .prompts import Conditioning, as_list
from .sampling import flow_shift_mu, flux_base_sigmas, make_sampler
from .step import FluxDenoiser, Guidance, SamplerProgram, drawn_noise

__all__ = ["FluxPipeline"]

log = logging.getLogger("overpaint")
MAX_T5_TOKENS = 512  # FLUX.1-dev's window (schnell's is 256; a model's tokenizer may say less)


class FluxPipeline(Pipeline):
    """A loaded FLUX model: ``transformer``, ``vae``, CLIP and T5 encoders, the flow schedule."""

    default_method = "flow"

    def __init__(self, components):  # not super().__init__: that one is the UNet pipeline's
        self._setup(components)
        self.arch = "flux"
        self.transformer = components.transformer
        self.default_sampler = "flow_euler"
        self._encoders_device = self.device

    def __repr__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (f"FluxPipeline({self.name!r}, device={str(self.device)!r}, dtype={dtype}, size={self.default_size}, "
                f"guidance_embeds={self.transformer.config.guidance_embeds}, id={self.identity!r})")

    @property
    def model(self):
        return self.transformer

    @property
    def default_size(self) -> int:
        return int(self.vae.config.sample_size or 1024)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.latent_channels

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # latents are packed in 2 x 2 patches

    @property
    def size_step(self) -> int:
        return self.size_multiple

    @property
    def max_sequence_length(self) -> int:
        return min(MAX_T5_TOKENS, int(self.tokenizers[1].model_max_length))

    @property
    def denoiser(self) -> FluxDenoiser:
        if getattr(self, "_denoiser", None) is None:
            self._denoiser = FluxDenoiser(self.transformer, pulid=getattr(self, "pulid", None))
        return self._denoiser

    def load_controlnet(self, path, dtype=None):
        raise ValueError("ControlNets for FLUX are not supported yet; load one into an SD / SDXL pipeline")

    # ---- identity prompts (PuLID) -------------------------------------------------------
    ADAPTER_HINT = "PuLID: pipe.load_pulid(path, face_embedder=...)"

    def load_ip_adapter(self, *args, **kwargs):
        raise ValueError("IP-Adapters attach to SD / SDXL UNets; FLUX takes identity prompts through PuLID: "
                         "pipe.load_pulid(path, face_embedder=...)")

    def load_pulid(self, path, face_embedder=None):
        """Attach PuLID-Flux (``pulid_flux_v0.9.1.safetensors``: ``pulid_encoder.*``, ``pulid_ca.*``;
        :mod:`engine.models.pulid`). ``face_embedder(images [B, 3, H, W] in [0, 1]) -> (id_cond
        [B, 1280], hidden: 5 x [B, N, 1024])`` is the face front end the official code builds from
        InsightFace's antelopev2 (ArcFace embedding of the largest face) and EVA02-CLIP-L-14-336 (its
        L2-normalised class embedding; the hidden states entering blocks 4, 8, 12, 16, 20): pass your
        own; without one, give ``id_embedding=`` to the calls. Then ``generate(id_image=, id_weight=)``
        and ``invert(..., method="rf-inversion", image_condition=True)`` (Tight Inversion). Returns it."""
        from .loading.ip_adapter import adapter_file, read_adapter
        from .models.pulid import from_state_dict

        self.pulid = from_state_dict(self.transformer, read_adapter(adapter_file(path)))
        self.face_embedder = face_embedder
        self._denoiser = None  # rows now carry id tokens: a new Denoiser (and batching key)
        return self.pulid

    def unload_pulid(self) -> None:
        self.pulid = self.face_embedder = self._denoiser = None

    @torch.no_grad()
    def id_prompt(self, image=None, weight: float = 1.0, id_embedding=None):
        """The :class:`~engine.image_prompt.ImagePrompt` of a face: PuLID's id tokens and those of the
        null face (the official negative branch's), at id ``weight``. ``id_embedding``: (id_cond,
        hidden) computed elsewhere, instead of ``image`` through the face embedder."""
        from .image_prompt import ImagePrompt

        if getattr(self, "pulid", None) is None:
            raise ValueError("identity prompts need PuLID: pipe.load_pulid(path, face_embedder=...) first")
        if id_embedding is None:
            if self.face_embedder is None:
                raise ValueError("PuLID needs a face embedder to read a face from an image: load_pulid(path, "
                                 "face_embedder=engine.faces.PulidFaceEmbedder.from_files(antelopev2_folder, "
                                 "eva02_clip_l_336.safetensors)) or any fn(images) -> (id_cond [B, 1280], 5 hidden "
                                 "states); or pass id_embedding=(id_cond, hidden)")
            id_embedding = self.face_embedder(load_image(image))
        id_cond, hidden = id_embedding
        dev, dt = self.device, self.dtype
        tokens, null = self.pulid.encode(id_cond.to(dev, dt), [h.to(dev, dt) for h in hidden])
        return ImagePrompt(tokens, null, float(weight))

    def image_prompt(self, image, scale: float = 1.0, tight: bool = False):
        ip = self.id_prompt(image, scale)
        return ip.tight() if tight else ip

    # ---- text ---------------------------------------------------------------------------
    def offload_text_encoders(self, device="cpu") -> None:
        """Move CLIP and T5 to ``device`` (default the CPU) after encoding what you need: FLUX.1-dev's
        T5 (~9 GB in bf16) then leaves the GPU, and prompts are encoded on ``device`` from then on
        (slower, results the same up to the device's arithmetic)."""
        for enc in self.text_encoders:
            enc.to(device)
        self._encoders_device = torch.device(device)

    @torch.no_grad()
    def encode_prompt(self, prompt, negative_prompt=None, num_images: int = 1,
                      guidance: bool = True, max_sequence_length: int | None = None):
        """(cond, uncond): T5 sequences [B, L, D] as ``context``, CLIP pooled [B, P] as ``pooled``,
        as FluxPipeline encodes them (T5 padded to the window, CLIP to 77 and truncated)."""
        prompts = as_list(prompt)
        cond = self._encode(prompts, max_sequence_length)
        uncond = None
        if guidance:
            neg = as_list("" if negative_prompt is None else negative_prompt, len(prompts), "negative_prompt")
            uncond = self._encode(neg, max_sequence_length).repeat(num_images)
        return cond.repeat(num_images), uncond

    def _encode(self, prompts: list[str], max_sequence_length: int | None) -> Conditioning:
        clip, t5 = self.text_encoders
        tok, tok2 = self.tokenizers
        window = max_sequence_length or self.max_sequence_length
        for p in prompts:
            n = len(tok2(p, truncation=False).input_ids)
            if n > window:
                raise ValueError(f"prompt is {n - 1} T5 tokens but this model reads at most {window - 1}: shorten it "
                                 f"({p[:60]!r}{'...' if len(p) > 60 else ''})")
            if len(tok(p, truncation=False).input_ids) > tok.model_max_length and ("clip", p) not in self._warned:
                self._warned.add(("clip", p))
                log.warning("the prompt is longer than CLIP's %d tokens: its pooled embedding sees the beginning only "
                            "(T5 reads all of it)", tok.model_max_length)
        dev = self._encoders_device
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(dev)
        pooled = clip(ids, output_hidden_states=False).pooler_output  # [B, P]
        ids2 = tok2(prompts, padding="max_length", max_length=window, truncation=True,
                    return_tensors="pt").input_ids.to(dev)
        seq = t5(ids2, output_hidden_states=False)[0]  # [B, L, D]
        return Conditioning(seq.to(self.device, self.dtype), pooled.to(self.device, self.dtype))

    def time_ids(self, *args, **kwargs):
        return None

    def guidance(self, prompt, negative_prompt=None, guidance_scale: float = 1.0, height: int | None = None,
                 width: int | None = None, num_images: int = 1, guidance_rescale: float = 0.0,
                 max_sequence_length: int | None = None, **_) -> Guidance:
        """Encode prompts into a :class:`Guidance` (classifier-free rows only when scale > 1)."""
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images, guidance_scale > 1.0,
                                          max_sequence_length)
        return Guidance(cond, uncond, None, guidance_scale, guidance_rescale)

    # ---- sampling -----------------------------------------------------------------------
    def flow_sampler(self, steps: int, height: int, width: int):
        """FluxPipeline's schedule: sigmas linspace(1, 1/S, S), shifted (by mu from the image's
        token count when the scheduler uses dynamic shifting), then 0."""
        tokens = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        mu = flow_shift_mu(tokens, self.scheduler_config) if self.scheduler_config.use_dynamic_shifting else None
        return make_sampler("flow_euler", self.schedule, steps, mu=mu, sigmas=flux_base_sigmas(steps),
                            device=self.device)

    def embedded(self, embedded_guidance) -> dict:
        """The denoiser's keyword for the embedded guidance (FLUX.1-dev), checked."""
        if embedded_guidance is not None and not self.transformer.config.guidance_embeds:
            raise ValueError("this FLUX model has no guidance embedding: drop embedded_guidance and use "
                             "guidance_scale (classifier-free guidance) instead")
        return {} if embedded_guidance is None else {"embedded_guidance": float(embedded_guidance)}

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"height and width must be positive multiples of {m} for this FLUX model "
                             f"(VAE factor {self.vae_scale_factor} x 2x2 packing), got {height}x{width}")

    def generation_program(self, prompt, negative_prompt=None, *, steps: int = 28, guidance_scale: float = 1.0,
                           embedded_guidance: float | None = None, height: int | None = None,
                           width: int | None = None, seed: int | None = None, num_images: int = 1,
                           sampler: str | None = None, latents: torch.Tensor | None = None,
                           generator: torch.Generator | None = None, max_sequence_length: int | None = None,
                           guidance_rescale: float = 0.0, callback=None, id_image=None, id_embedding=None,
                           id_weight: float = 1.0, id_start_step: int = 0, **unsupported) -> SamplerProgram:
        """Text to image with flow-matching Euler (as FluxPipeline); its result is latents.
        ``id_start_step``: PuLID's ``start_step``, the first step whose rows read the identity (the
        reference's default 0 keeps the most identity; later steps leave the prompt more room)."""
        if unsupported:
            raise ValueError(f"FLUX generation does not take {', '.join(sorted(unsupported))}; it takes steps, "
                             f"guidance_scale, embedded_guidance, guidance_rescale, height, width, seed, num_images, "
                             f"latents, generator, max_sequence_length, callback, id_image, id_embedding, id_weight, "
                             f"id_start_step")
        if sampler not in (None, "flow_euler"):
            raise ValueError(f"FLUX models sample with 'flow_euler', got sampler={sampler!r}")
        if steps < 1 or num_images < 1:
            raise ValueError(f"steps and num_images must be at least 1, got {steps} and {num_images}")
        height, width = height or self.default_size, width or self.default_size
        self.check_size(height, width)
        kw = self.embedded(embedded_guidance)
        g = self.guidance(prompt, negative_prompt, guidance_scale, num_images=num_images,
                          guidance_rescale=guidance_rescale, max_sequence_length=max_sequence_length)
        early = None
        if not isinstance(id_start_step, int) or isinstance(id_start_step, bool) or not 0 <= id_start_step <= steps:
            raise ValueError(f"id_start_step must be an int step in [0, {steps}] (the first step that reads the "
                             f"identity), got {id_start_step!r}")
        if id_start_step and id_image is None and id_embedding is None:
            raise ValueError("id_start_step says when the identity joins; give id_image= or id_embedding= too")
        if id_image is not None or id_embedding is not None:  # PuLID: the face's id tokens on every row
            ip = self.id_prompt(id_image, id_weight, id_embedding)
            if len(g) % len(ip):
                raise ValueError(f"{len(ip)} identity prompts for {len(g)} outputs; give one, or one per output")
            if id_start_step > 0:  # the steps before it run the prompt alone
                early = (id_start_step, self.denoiser.condition_guidance(g, height, width, **kw))
            g = g.with_image(ip.repeat(len(g) // len(ip)))
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed if seed is not None else torch.seed() % 2**63)
        shape = (len(g), self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:  # drawn unpacked, as FluxPipeline (its packing is ours)
            latents = torch.randn(shape, generator=generator, device=generator.device, dtype=self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        smp = self.flow_sampler(steps, height, width)
        return SamplerProgram(self.denoiser, g, latents.to(self.device).float(), smp, height=height, width=width,
                              noise=drawn_noise(generator), callback=callback, early=early, **kw)

    def chroma_direction(self, key):
        raise ValueError("chroma-key generation (TKG-DM) is implemented for SD-family latents; not for FLUX yet")
