"""The façade users hold: text encoding, VAE, and generation / inversion / editing as
programs on the one loop.

Everything below it is imported downward: the step layer (:mod:`engine.step`: guidance,
the Denoiser, programs, the loop), the methods (:mod:`engine.editing`), the runtime
(CUDA graphs). Every request -- a generation, an inversion, an edit of any method --
becomes a program whose rows join one model call per step with those of every other
request run with it (:meth:`Pipeline.edit_many`, :meth:`Pipeline.invert_many`).
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
from tqdm.auto import tqdm

from . import params as checks
from .editing import Inversion, edit_program, inversion_program
from .methods import IMAGE_EDITS, IMAGE_INVERSIONS, check_family
from .images import OUTPUT_TYPES, fit_size, load_image, to_output
from .matte import chroma_matte, key_rgb
from .loading.card import ModelCard
from .prompts import Conditioning, as_list, encode
from .sampling import NoiseSchedule, SchedulerConfig, make_sampler, sampler_name_for
from .sampling.chroma import SD_CHANNELS, SD_SCALING_FACTORS, TARGET_SHIFT, key_direction, tkg_noise
from .sampling.schedule import UnsupportedConfigError
from .runtime.graphs import GraphRunner
from .step import Guidance, Loop, SamplerProgram, UNetDenoiser, drawn_noise

__all__ = ["Pipeline", "Guidance"]

log = logging.getLogger("overpaint")


class Pipeline:
    """A loaded model: ``unet``, ``vae``, text encoders, tokenizers and the noise schedule."""

    def __init__(self, components):
        c = components
        self._setup(c)
        self.arch = c.arch  # "sd" or "sdxl"
        self.unet = c.unet
        try:
            self.default_sampler = sampler_name_for(self.scheduler_config)
        except UnsupportedConfigError:
            # e.g. SD1.5 ships PNDM, which we do not implement: DDIM is the usual stand-in.
            self.default_sampler = "ddim"
            log.info("no sampler for scheduler %s; using ddim", self.scheduler_config.class_name)

    def _setup(self, c) -> None:
        """What every model family's pipeline keeps of its components: VAE, text encoders and
        tokenizers, the schedule, the model card and the model's name and identity."""
        self.components = c
        self.vae = c.vae
        self.text_encoders = [e for e in (c.text_encoder, c.text_encoder_2) if e is not None]
        self.tokenizers = [t for t in (c.tokenizer, c.tokenizer_2) if t is not None]
        self.scheduler_config = SchedulerConfig.from_dict(c.scheduler_config)
        self.schedule = NoiseSchedule(self.scheduler_config)
        self.model_index = c.model_index
        self.vae_dtype = c.vae_dtype
        # The folder's overpaint.json: per-method defaults that invert/edit start from (what the
        # caller passes wins; set ``pipe.card = ModelCard()`` to drop them) and the vocabulary.
        self.card = getattr(c, "card", None) or ModelCard()
        self.name, self.identity = getattr(c, "name", "") or str(c.root), getattr(c, "identity", "")
        self._warned: set = set()
        self._chroma_directions = weakref.WeakKeyDictionary()  # TKG-DM: VAE -> key colour -> direction
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def __repr__(self) -> str:
        return (f"Pipeline({self.name!r}, arch={self.arch!r}, device={str(self.device)!r}, "
                f"dtype={str(self.dtype).removeprefix('torch.')}, size={self.default_size}, id={self.identity!r})")

    @property
    def model(self):
        """The network evaluated every step (the UNet; FLUX pipelines' transformer)."""
        return self.unet

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def default_size(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def size_step(self) -> int:
        """Image sides must be multiples of this (the VAE's factor)."""
        return self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides that are multiples of this go through the UNet without padding or rounding."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def fit_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The size an image of height x width should be processed at on this model (aspect kept,
        the native pixel count, sides rounded), or None when its own size is fine."""
        return fit_size(height, width, self.default_size, self.size_multiple)

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
        """SDXL micro-conditioning rows [n, 6] (the Denoiser's; None for SD)."""
        return self.denoiser.time_ids(n, height, width, original_size, crops_coords_top_left, target_size)

    @property
    def denoiser(self) -> UNetDenoiser:
        """The model call on rows (eager); ``denoiser.with_runner(self.graphs)`` for CUDA graphs."""
        if getattr(self, "_denoiser", None) is None:
            proj = self.text_encoders[-1].config.projection_dim if self.arch == "sdxl" else None
            self._denoiser = UNetDenoiser(self.unet, proj, controlnet=getattr(self, "controlnet", None),
                                          ip_adapter=getattr(self, "ip_adapter", None))
        return self._denoiser

    # ---- image prompts (IP-Adapter) ------------------------------------------------------
    def load_ip_adapter(self, path=None, image_encoder=None, *, weight_name: str | None = None,
                        subfolder: str | None = None, scale=1.0):
        """Attach an IP-Adapter (Ye et al. 2023): ``path`` its .safetensors file in the published
        layout (or a folder / cached hub id with ``weight_name`` [and ``subfolder``]; None: the one
        the model ships with, its card's ``ip_adapter``, as the bundled Shapes model has);
        ``image_encoder`` the CLIPVisionModelWithProjection folder (default: an ``image_encoder``
        folder beside the file, as h94/IP-Adapter lays them out). ``scale``: per-layer scales
        (see :meth:`set_ip_adapter_scale`). Afterwards ``generate`` takes ``ip_adapter_image``
        and inversions ``image_condition=True`` (Tight Inversion). Returns the adapter."""
        from .image_prompt import ImageEncoder
        from .loading.ip_adapter import adapter_file, encoder_folder, load_image_encoder, read_adapter
        from .models.ip_adapter import from_state_dict

        if self.denoiser.family != "unet":
            raise ValueError("IP-Adapters attach to SD / SDXL UNets; this is a FLUX pipeline")
        if path is None:
            if not self.card.ip_adapter:
                raise ValueError("this model ships no IP-Adapter: pass the adapter's .safetensors file")
            path = self.components.root / self.card.ip_adapter
        file = adapter_file(path, weight_name, subfolder)
        adapter = from_state_dict(self.unet, read_adapter(file))
        model, pre = load_image_encoder(encoder_folder(file, image_encoder), self.device, self.dtype)
        cfg = model.config
        want = cfg.hidden_size if adapter.kind == "plus" else cfg.projection_dim
        got = adapter.image_proj.proj_in.in_features if adapter.kind == "plus" else adapter.image_proj.proj.in_features
        if want != got:
            raise ValueError(f"the image encoder gives {want}-wide features but this {adapter.kind} IP-Adapter takes "
                             f"{got}: pass the encoder it was trained with (ViT-H for *_vit-h files, else ViT-bigG)")
        adapter.set_scale(scale)
        self.ip_adapter, self.image_encoder = adapter, ImageEncoder(model, pre)
        self._denoiser = None  # rows now carry image tokens: a new Denoiser (and batching key)
        return adapter

    def set_ip_adapter_scale(self, scale) -> None:
        """Per-layer IP-Adapter scales: a float, {layer-name prefix: scale} (others 0), or diffusers'
        ``{"down": {"block_2": [0.0, 1.0]}, "up": ...}``."""
        self._adapter().set_scale(scale)

    def unload_ip_adapter(self) -> None:
        self.ip_adapter = self.image_encoder = self._denoiser = None

    def _adapter(self):
        if getattr(self, "ip_adapter", None) is None:
            raise ValueError("no IP-Adapter loaded: pipe.load_ip_adapter(path, image_encoder=...) first")
        return self.ip_adapter

    def image_prompt(self, image, scale: float = 1.0, tight: bool = False):
        """An :class:`~engine.image_prompt.ImagePrompt` of ``image`` (path, PIL, array or tensor).
        ``tight``: the unconditional rows read the image too (Tight Inversion conditions the model
        on the image, and guidance then acts on the text alone); else they read the null image,
        as diffusers' IP-Adapter pipelines do."""
        from .image_prompt import image_prompt

        ip = image_prompt(self._adapter(), self.image_encoder, load_image(image), scale)
        return ip.tight() if tight else ip

    def load_controlnet(self, path, dtype: torch.dtype | None = None):
        """Attach a diffusers-format ControlNet (a local folder or a cached hub id with
        ``config.json`` and ``diffusion_pytorch_model.safetensors``); afterwards ``generate``
        takes ``control_image`` and ``controlnet_conditioning_scale``. Returns the model."""
        from .loading.files import resolve
        from .loading.modules import load_controlnet

        net = load_controlnet(resolve(path, marker="config.json"), self.device, dtype or self.dtype)
        if net.config.unet.cross_attention_dim != self.unet.config.cross_attention_dim:  # an attached one stays
            raise ValueError(f"the ControlNet at {path} was made for another model family (its cross-attention "
                             f"width differs from this UNet's); use one trained for this model")
        self.controlnet = net
        self._denoiser = None  # rows now carry control images: a new Denoiser (and a new batching key)
        return self.controlnet

    # ---- the batched step ---------------------------------------------------------------
    def guidance(self, prompt, negative_prompt=None, guidance_scale: float = 7.5, height: int | None = None,
                 width: int | None = None, num_images: int = 1, guidance_rescale: float = 0.0, **size_kw) -> Guidance:
        """Encode prompts into a :class:`Guidance` (unconditional rows only when scale > 1)."""
        height, width = height or self.default_size, width or self.default_size
        use_cfg = guidance_scale > 1.0
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images, use_cfg)
        time_ids = self.time_ids(len(cond), height, width, **size_kw)
        return Guidance(cond, uncond, time_ids, guidance_scale, guidance_rescale)

    # ---- VAE ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> images [B, 3, H, W] in [0, 1] (float32)."""
        cfg = self.vae.config
        z = latents.to(self.vae_dtype)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        shift = getattr(cfg, "shift_factor", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = z * std / cfg.scaling_factor + mean
        elif shift is not None:  # FLUX's VAE: scaled and shifted
            z = z / cfg.scaling_factor + shift
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
            fh, fw = max(f, round(h / f) * f), max(f, round(w / f) * f)
            raise ValueError(f"image is {w}x{h}; this model needs sides that are multiples of {f}: "
                             f"resize or crop it (e.g. height={fh}, width={fw}; the CLI's --height {fh} --width {fw})")
        if fit_size(h, w, self.default_size, f) is not None:
            n = self.default_size
            log.warning("the image is %dx%d but this model works at about %dx%d; far from it results are usually "
                        "noise: resize it (height=, width=) to about %d pixels", w, h, n, n, n * n)
        cfg = self.vae.config
        z = self.vae.encode((x * 2 - 1).to(self.device, self.vae_dtype)).latent_dist.mode()  # [B, C, h, w]
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        shift = getattr(cfg, "shift_factor", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = (z - mean) * cfg.scaling_factor / std
        elif shift is not None:
            z = (z - shift) * cfg.scaling_factor
        else:
            z = z * cfg.scaling_factor
        return z.to(self.dtype)

    # ---- editing ------------------------------------------------------------------------
    def invert(self, image, prompt: str = "", method: str = "ddim", *, progress: bool = True,
               cuda_graphs: bool | None = None, **params):
        """Invert a real image into the model's noise space; returns an :class:`Inversion`
        that can be edited many times (``edit``) and saved (``inv.save(path)``). Parameters left
        out come from the model's recipes (``pipe.card.invert[method]``), then the method's."""
        return self.invert_many([dict(image=image, prompt=prompt, method=method, **params)], progress=progress,
                                cuda_graphs=cuda_graphs)[0]

    def edit(self, inv, method: str | None = None, target_prompt: str | None = None, *,
             output_type: str = "pil", progress: bool = True, cuda_graphs: bool | None = None, **params):
        """Regenerate an inverted image under an edit. ``method``: "p2p", "ledits++",
        "ddim" or "ddpm" (default: the inversion's own method). Parameters the caller leaves out
        come from the model's recipes (``pipe.card.edit[method]``), then the method's defaults."""
        return self.edit_many([dict(inv=inv, method=method, target_prompt=target_prompt, **params)],
                              output_type=output_type, progress=progress, cuda_graphs=cuda_graphs)[0]

    def reconstruct(self, inv, *, output_type: str = "pil", **params):
        """Regenerate the source image from an inversion (no edit)."""
        return self.edit(inv, inv.method, None, output_type=output_type, **params)

    @torch.no_grad()
    def invert_many(self, requests: list[dict], *, progress: bool = False, cuda_graphs: bool | None = None,
                    batch_invariant: bool = False, bucket_rows: int | None = None) -> list:
        """Invert several images together: each request is a dict of :meth:`invert`'s keyword
        arguments (``image``, ``prompt``, ``method``, ...). Every request's rows share one model
        call per step. Returns the :class:`Inversion` s in order."""
        progs = [self.program("invert", r) for r in _requests(requests)]
        results = self._run(progs, progress, cuda_graphs, batch_invariant, bucket_rows, "invert")
        return [self.finish("invert", inv, image_prompt=p.image_prompt) for p, inv in zip(progs, results)]

    @torch.no_grad()
    def edit_many(self, requests: list[dict], *, output_type: str = "pil", progress: bool = False,
                  cuda_graphs: bool | None = None, batch_invariant: bool = False, bucket_rows: int | None = None) -> list:
        """Run several edits (and generations) together, sharing one model call per step.

        Each request is a dict of :meth:`edit`'s keyword arguments (``inv``, ``method``,
        ``target_prompt`` and the method's parameters), or, without ``inv``, of
        :meth:`generate`'s (``prompt``, ``steps``, ``seed``, ...). Results come back in order,
        each as :meth:`edit` / :meth:`generate` would return it (``output_type`` per call, or
        per request). ``batch_invariant``: every call has a fixed number of rows
        (``bucket_rows``, default :data:`engine.step.BUCKET_ROWS`) and deterministic kernels,
        so each result is bit-identical to the request run alone the same way.
        """
        reqs = [dict(r) for r in _requests(requests)]
        types = [r.pop("output_type", output_type) for r in reqs]
        for t in types:  # before any work, not after every step has run
            if t not in OUTPUT_TYPES:
                raise ValueError(f"unknown output_type {t!r}; use one of {', '.join(OUTPUT_TYPES)}")
        kinds = ["edit" if "inv" in r else "generate" for r in reqs]
        progs = [self.program(k, r) for k, r in zip(kinds, reqs)]
        latents = self._run(progs, progress, cuda_graphs, batch_invariant, bucket_rows,
                            "edit" if "edit" in kinds else "generate")  # the progress bar's label
        return [self.finish(k, x, t, p.matte) for k, x, t, p in tqdm(list(zip(kinds, latents, types, progs)), desc="decode",
                                                          disable=not progress, leave=False)]

    # ---- requests as programs (what edit_many / invert_many and the server run) ----------
    KINDS = ("invert", "edit", "generate")
    default_method = "ddim"  # the inversion method when a request names none

    def program(self, kind: str, request: dict):
        """The program of one request: ``kind`` "invert" (:meth:`invert`'s keyword arguments),
        "edit" (:meth:`edit`'s, with ``inv``) or "generate" (:meth:`generate`'s). Checks the
        request (raising ``ValueError`` / ``TypeError``) and encodes its prompts and image; its
        result goes through :meth:`finish`."""
        r = dict(request)
        if kind == "invert":
            return self._inversion(r)
        if kind == "edit":
            if "inv" not in r:
                raise ValueError("an edit request needs 'inv' (an Inversion)")
            return self._edit(r)
        if kind == "generate":
            return self._generation(r)
        raise ValueError(f"unknown request kind {kind!r}; use one of {self.KINDS}")

    @torch.no_grad()
    def finish(self, kind: str, result, output_type: str = "pil", matte=None, image_prompt=None):
        """A finished program's result as the user gets it: an :class:`Inversion` stamped with
        the model that made it (an edit with another one is refused) and the image prompt it was
        conditioned on (the program's ``image_prompt``), or decoded images -- RGBA with ``matte``
        (a chroma key, the program's ``matte``) keyed out."""
        if kind == "invert":
            result.settings["model"] = {"name": self.name, "id": self.identity}
            if image_prompt is not None:
                result.record_image_prompt(image_prompt)
            return result
        images = self.decode(result)  # [B, 3, H, W]
        return to_output(images if matte is None else chroma_matte(images, matte), output_type)

    def _inversion(self, r: dict):
        r.pop("progress", None)
        if "image" not in r:
            raise ValueError("an invert request needs 'image'")
        method = r.pop("method", self.default_method)
        check_family(method, self.denoiser.family, "inversion")
        build = inversion_program(method)
        r = self._request({**self._defaults(self.card.invert.get(method, {}), r), **r})
        ip = self._tight(method, r.pop("image_condition", None), r.pop("image_scale", None), r["image"])
        if ip is not None:
            r["image_prompt"] = ip
        _check_keywords(build, r, f"the {method!r} inversion")
        prog = build(self, r.pop("image"), r.pop("prompt", ""), **r)
        prog.image_prompt = ip  # what ``finish`` records in the Inversion
        return prog

    TIGHT_SCALE = 1.0  # Tight Inversion's default image scale
    ADAPTER_HINT = "an IP-Adapter: pipe.load_ip_adapter(path, image_encoder=...)"

    def _tight(self, method: str, condition, scale, image):
        """The image prompt of a Tight Inversion request, or None."""
        if condition is False and scale is not None:
            raise ValueError("image_scale conditions the inversion on the image: drop it, or set image_condition=True")
        if not condition and scale is None:
            return None
        if method not in IMAGE_INVERSIONS:
            raise ValueError(f"image_condition applies to the inversions {', '.join(sorted(IMAGE_INVERSIONS))}; "
                             f"{method!r} takes no image condition")
        if self.denoiser.image_adapter is None:
            raise ValueError(f"image_condition needs {self.ADAPTER_HINT} first")
        return self.image_prompt(image, self.TIGHT_SCALE if scale is None else scale, tight=True)

    @staticmethod
    def _as_inversion(inv):
        """An Inversion, or the path of a saved one (loaded)."""
        if isinstance(inv, (str, os.PathLike)):
            return Inversion.load(inv)
        if not isinstance(inv, Inversion):
            raise TypeError(f"edit takes an Inversion (from pipe.invert) or the path of a saved one, "
                            f"not {type(inv).__name__}")
        return inv

    def _edit(self, r: dict):
        r.pop("progress", None)
        inv = self._as_inversion(r.pop("inv"))
        method = r.pop("method", None) or inv.method
        check_family(method, self.denoiser.family, "edit")
        build = edit_program(method)
        inv.check_model(self.identity, self.name)
        if inv.x0.device != torch.device(self.device):  # e.g. loaded from a file, or sent from another process
            inv = inv.to(self.device)
        if inv.x0.shape[1] != self.latent_channels:
            raise ValueError(f"this inversion has {inv.x0.shape[1]}-channel latents and this model takes "
                             f"{self.latent_channels}: invert the image again with this model")
        # Recipes are for edits: a reconstruction (no target, no concepts) replays the inversion as
        # it was made, with the method's own defaults.
        editing = r.get("target_prompt") is not None or bool(r.get("editing_prompt"))
        defaults = self._defaults(self.card.edit.get(method, {}), r) if editing else {}
        r = self._request({**defaults, **r})
        scale = r.pop("image_scale", None)
        ip = inv.image_prompt(scale)
        if scale is not None and ip is None:
            raise ValueError("image_scale applies to inversions made with image_condition=True; this one was not")
        if ip is not None:
            if method in IMAGE_EDITS:
                r["image_prompt"] = ip
            elif scale is not None:
                raise ValueError(f"the {method!r} edit takes no image condition; use one of {', '.join(sorted(IMAGE_EDITS))}")
            else:
                log.info("the %s edit does not read this inversion's image condition (methods that do: %s)",
                         method, ", ".join(sorted(IMAGE_EDITS)))
        _check_keywords(build, r, f"the {method!r} edit")
        return build(self, inv, r.pop("target_prompt", None), **r)

    # Other names some methods accept for the same thing (diffusers' names; a generator instead
    # of a seed): a model default yields to any of them.
    ALIASES = {"steps": ("num_inversion_steps",), "guidance_scale": ("source_guidance_scale",),
               "prompt": ("source_prompt",), "seed": ("generator",)}

    def _defaults(self, defaults: dict, request: dict) -> dict:
        return {k: v for k, v in defaults.items() if not any(a in request for a in self.ALIASES.get(k, ()))}

    def _request(self, r: dict) -> dict:
        """Checked numbers (:mod:`engine.params`) and a notice for words the model never learned."""
        r = checks.check(r, self.scheduler_config.num_train_timesteps)
        for key in ("prompt", "source_prompt", "target_prompt", "editing_prompt", "negative_prompt"):
            value = r.get(key)
            for text in [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []:
                unknown = self.card.unknown_words(text) if isinstance(text, str) else []
                if unknown and (text, key) not in self._warned:
                    self._warned.add((text, key))
                    log.warning("%s has words this model never learned: %s; it draws something arbitrary for them "
                                "(`overpaint vocab` lists the words it knows)", key, ", ".join(map(repr, unknown)))
        return r

    def _run(self, programs, progress, cuda_graphs, batch_invariant, bucket_rows, desc=None):
        runner = cuda_graphs if isinstance(cuda_graphs, GraphRunner) else self.graphs if cuda_graphs else None
        den = self.denoiser.with_runner(runner)
        kw = {} if bucket_rows is None else {"bucket_rows": bucket_rows}
        loop = Loop(den, batch_invariant=batch_invariant, progress=progress, desc=desc, **kw)
        for p in programs:
            loop.add(p)
        loop.run()
        self.last_loop = loop  # its counters: calls, rows_run, seconds, model_seconds
        return [p.result() for p in programs]

    # ---- generation ---------------------------------------------------------------------
    def check_size(self, height: int, width: int) -> None:
        m = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if height <= 0 or width <= 0 or height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be positive multiples of {self.vae_scale_factor}, got {height}x{width}")
        if height % m or width % m:
            log.info("size %dx%d is not a multiple of %d: the UNet upsamples to explicit sizes", height, width, m)

    @torch.no_grad()
    def generate(self, prompt, negative_prompt=None, *, output_type: str = "pil", progress: bool = True,
                 cuda_graphs: bool | None = None, **params):
        """Text to image. Returns PIL images (or arrays / a tensor with ``output_type``).

        Parameters: ``steps``, ``guidance_scale``, ``height``, ``width``, ``seed``,
        ``num_images``, ``sampler``, ``eta``, ``guidance_rescale``, ``latents``, ``generator``,
        SDXL's ``original_size``, ``crops_coords_top_left``, ``target_size``, and ``callback``
        (a dict per step: i, t, x, x0). ``seed`` seeds a CPU generator so results do not depend
        on the device; pass ``generator`` or ``latents`` [B, 4, h, w] instead to control the
        draws. ``cuda_graphs``: run the model calls as captured CUDA graphs
        (:mod:`engine.runtime.graphs`; eager, with the reason logged once, where capture is
        impossible); default off.

        ControlNet (after :meth:`load_controlnet`): ``control_image`` (path, PIL, array or
        tensor; resized to the output) and ``controlnet_conditioning_scale`` (1.0).
        IP-Adapter (after :meth:`load_ip_adapter`): ``ip_adapter_image`` (an image prompt) and
        ``ip_adapter_scale`` (1.0, times the adapter's per-layer scales).

        Chroma-key generation (TKG-DM, :mod:`engine.sampling.chroma`): ``chroma_key`` "green",
        "blue" or (r, g, b) shifts the initial noise so the objects come out on that colour;
        ``chroma_shift`` (0.11), ``chroma_std`` (0.5, or (x, y)) and ``chroma_center`` ((0, 0)
        in [-1, 1] coordinates) set the shift and the object region; ``chroma_direction``
        overrides the per-channel direction. ``alpha=True`` returns RGBA images whose key
        background is transparent (:func:`engine.matte.chroma_matte`).
        """
        return self.edit_many([dict(prompt=prompt, negative_prompt=negative_prompt, **params)],
                              output_type=output_type, progress=progress, cuda_graphs=cuda_graphs)[0]

    def chroma_direction(self, key) -> list[float]:
        """The latent direction of a chroma key: the paper's (channels 1 and 2 up) for broadcast
        green (by name or as its RGB) on SD-family VAEs, else measured on this pipeline's VAE
        (:func:`key_direction`; once per key colour and VAE)."""
        rgb = key_rgb(key)
        cfg = self.vae.config
        if rgb == key_rgb("green") and cfg.latent_channels == 4 and cfg.scaling_factor in SD_SCALING_FACTORS:
            return [1.0 if c in SD_CHANNELS else 0.0 for c in range(4)]
        measured = self._chroma_directions.setdefault(self.vae, {})  # a VAE assigned later measures its own
        if rgb not in measured:
            measured[rgb] = key_direction(self.encode_image, rgb, size=self.default_size)
        return list(measured[rgb])

    def _generation(self, r: dict) -> SamplerProgram:
        r.pop("progress", None)
        if "prompt" not in r:
            raise ValueError(f"a request needs 'inv' (an edit) or 'prompt' (a generation); got keys {sorted(r)}")
        r = {**self._defaults(self.card.generate, r), **r}  # the model's generation defaults, if it has any
        alpha = r.pop("alpha", False)
        if alpha and r.get("chroma_key") is None:
            raise ValueError("alpha=True keys out a chroma background: also give chroma_key='green' (or 'blue', (r, g, b))")
        prog = self.generation_program(**self._request(r))
        prog.matte = r["chroma_key"] if alpha else None  # what finish keys out
        return prog

    def generation_program(self, prompt, negative_prompt=None, *, steps: int = 50, guidance_scale: float = 7.5,
                           height: int | None = None, width: int | None = None, seed: int | None = None,
                           num_images: int = 1, sampler: str | None = None, eta: float = 0.0,
                           guidance_rescale: float = 0.0, latents: torch.Tensor | None = None,
                           generator: torch.Generator | None = None, original_size=None,
                           crops_coords_top_left=(0, 0), target_size=None, callback=None, chroma_key=None,
                           chroma_shift: float = TARGET_SHIFT, chroma_std=0.5, chroma_center=(0.0, 0.0),
                           chroma_direction=None, control_image=None,
                           controlnet_conditioning_scale: float = 1.0, ip_adapter_image=None,
                           ip_adapter_scale: float = 1.0) -> SamplerProgram:
        """Plain generation as a program (see :meth:`generate`); its result is latents."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {num_images}")
        height, width = height or self.default_size, width or self.default_size
        self.check_size(height, width)
        g = self.guidance(prompt, negative_prompt, guidance_scale, height, width, num_images, guidance_rescale,
                          original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                          target_size=target_size)
        if ip_adapter_image is not None:
            ip = self.image_prompt(ip_adapter_image, ip_adapter_scale)  # [1 or B images]
            n = len(g) // len(ip) if len(g) % len(ip) == 0 else None
            if n is None:
                raise ValueError(f"{len(ip)} ip_adapter_image images for {len(g)} outputs; give one, or one per output")
            g = g.with_image(ip.repeat(n))
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
        if chroma_key is not None or chroma_direction is not None:
            direction = chroma_direction if chroma_direction is not None else self.chroma_direction(chroma_key)
            x = tkg_noise(x, direction, target_shift=chroma_shift, std=chroma_std, center=chroma_center)
        name = sampler or self.default_sampler
        opts = {"eta": eta} if name == "ddim" else {}
        smp = make_sampler(name, self.schedule, steps, device=self.device, **opts)
        control = None
        if control_image is not None:
            image = load_image(control_image)  # [1 or B, 3, H, W] in [0, 1]
            if tuple(image.shape[-2:]) != (height, width):
                image = torch.nn.functional.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
            control = (image, float(controlnet_conditioning_scale))
        return SamplerProgram(self.denoiser, g, x * smp.init_noise_sigma, smp, height=height, width=width,
                              noise=drawn_noise(generator), callback=callback, control=control)

    @property
    def graphs(self):
        """This pipeline's :class:`~engine.runtime.graphs.GraphRunner` (created on first use)."""
        if getattr(self, "_graphs", None) is None:
            self._graphs = GraphRunner()
        return self._graphs


def _requests(requests) -> list[dict]:
    if isinstance(requests, dict) or not all(isinstance(r, dict) for r in requests):
        raise TypeError("requests must be a list of dicts of keyword arguments, one per request")
    return list(requests)


def _check_keywords(build, request: dict, what: str) -> None:
    """A one-line ValueError naming a parameter ``build`` does not take (not Python's TypeError)."""
    import inspect

    sig = inspect.signature(build)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    takes = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(k for k in request if k not in sig.parameters)
    if unknown:
        raise ValueError(f"{what} takes no {unknown[0]!r}; it takes {', '.join(takes)}")
