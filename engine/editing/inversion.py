"""The result of inverting an image: everything an edit needs, reusable and saveable.

An :class:`Inversion` is computed once (``pipe.invert``) and edited many times
(``pipe.edit``) without re-running the inversion. It saves to a single
safetensors file (tensors + JSON settings in the header), so it can be cached
on disk or shipped between processes; nothing in it is pickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..prompts import Conditioning

FORMAT = "overpaint.inversion/1"


def ledits_replay(sampler: str, total: int) -> dict:
    """The replay spec of a LEDITS++ inversion: diffusers' LEDITS++ scheduler settings ("leading"
    spacing, steps_offset 1, no clipping; DPM-Solver++ SDE of order 2, or DDIM with eta 1)."""
    overrides = dict(timestep_spacing="leading", steps_offset=1, clip_sample=False)
    if sampler == "dpmpp_2m_sde":
        return dict(sampler=sampler, steps=total, eta=0.0, overrides=dict(overrides, solver_order=2), skip=None)
    if sampler == "ddim":
        return dict(sampler=sampler, steps=total, eta=1.0, overrides=overrides, skip=None)
    raise ValueError(f"ledits++ supports the samplers ('dpmpp_2m_sde', 'ddim'), got {sampler!r}")


@dataclass
class Replay:
    """How an edit replays an inversion: ``sampler`` steps ``first + start`` .. end, from
    ``latents[start]``, the noisy steps driven by ``noise[k]`` at sampler step ``first + k``
    (None: a deterministic replay). latents: [S+1, B, ...] float32; noise: [S, B, ...]."""

    sampler: object
    first: int
    start: int
    latents: torch.Tensor
    noise: torch.Tensor | None

    @property
    def x(self) -> torch.Tensor:
        return self.latents[self.start]  # [B, C, h, w]

    @property
    def steps(self) -> int:
        """The steps an edit runs."""
        return self.latents.shape[0] - 1 - self.start


@dataclass
class Inversion:
    """method: "ddim" | "ddpm" | "ledits++" | "null-text" | ...

    x0: clean image latents [B, C, h, w] (VAE-encoded, scaled).
    latents: [S+1, B, C, h, w]; latents[i] is what denoising step i starts from
        (latents[0] the noisiest), latents[S] == x0 for exact methods.
    timesteps: [S] the denoising timesteps, noisiest first.
    noise: [S, B, C, h, w] per-step noise maps (edit-friendly DDPM / LEDITS++), else None.
    source: the source prompt's conditioning (rows [B]); uncond: the unconditional one.
    settings: prompt, steps, guidance_scale, skip, seed, sampler, height, width, ...;
        ``settings["replay"]`` says how to replay it (see :meth:`replay`).
    """

    method: str
    x0: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    source: Conditioning
    uncond: Conditioning | None = None
    noise: torch.Tensor | None = None
    settings: dict = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # method-specific tensors

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def __repr__(self) -> str:
        s = self.settings
        prompt = s.get("prompt", "")
        prompt = prompt if not isinstance(prompt, str) or len(prompt) <= 40 else prompt[:37] + "..."
        skip = f", skip={s['skip']}" if s.get("skip") else ""
        model = s.get("model", {})
        made = f", model={model.get('name')!r} ({model.get('id')})" if model else ""
        return (f"Inversion(method={self.method!r}, images={self.x0.shape[0]}, steps={self.steps}{skip}, "
                f"latents={list(self.x0.shape[1:])}, prompt={prompt!r}, "
                f"noise_maps={self.noise is not None}{made})")

    def check_model(self, identity: str, name: str = "") -> None:
        """Refuse to be edited by another model than the one that made it (when it says which)."""
        made = self.settings.get("model") or {}
        if identity and made.get("id") and made["id"] != identity:
            raise ValueError(f"this inversion was made with model {made.get('name')!r} (id {made['id']}), not with "
                             f"{name!r} (id {identity}): invert the image again with this model")

    def replay_spec(self) -> dict:
        """{"sampler", "steps", "eta", "overrides", "skip"}: the sampler whose last ``self.steps``
        steps regenerate the image (``steps`` in the schedule, ``overrides`` of its config), and
        ``skip``, the default fraction of those steps an edit may skip (None: not skippable).
        Files saved before the spec existed get it from their method."""
        if "replay" in self.settings:
            return self.settings["replay"]
        s = self.settings
        if self.method == "ddim":
            return dict(sampler="ddim", steps=self.steps, eta=0.0, overrides={}, skip=None)
        if self.method == "ddpm":
            return dict(sampler="ddim", steps=self.steps, eta=float(s.get("eta", 1.0)), overrides={},
                        skip=float(s.get("skip", 0.0)))
        if self.method == "ledits++":
            return ledits_replay(s["sampler"], s["total_steps"])
        raise ValueError(f"inversion method {self.method!r} does not say how to replay it")

    def replay(self, schedule, device, dtype, skip: float | None = None) -> "Replay":
        """The :class:`Replay` of this inversion on ``schedule``: the sampler, the first step an
        edit runs, and the stored latents and noise maps on ``device`` (noise in ``dtype``)."""
        from ..sampling import make_sampler

        spec = self.replay_spec()
        extra = {"eta": spec["eta"]} if spec["sampler"] == "ddim" else {}
        smp = make_sampler(spec["sampler"], schedule, spec["steps"], device=device, **extra, **spec["overrides"])
        first = len(smp) - self.steps
        if not torch.equal(smp.timesteps[first:].cpu().long(), self.timesteps.cpu().long()):
            raise ValueError(f"cannot rebuild the {self.method} steps of this inversion with this pipeline's schedule")
        if skip is not None and spec["skip"] is None and skip != 0:
            raise ValueError(f"skip applies to noise-map inversions (method='ddpm'); this {self.method!r} "
                             f"inversion replays all of its steps: drop skip")
        frac = spec["skip"] if skip is None else skip
        if frac is not None and not 0.0 <= frac < 1.0:
            raise ValueError(f"skip must be in [0, 1), got {frac}")
        start = int(self.steps * frac) if spec["skip"] is not None and frac else 0
        noise = None if self.noise is None else self.noise.to(device, dtype)
        return Replay(smp, first, start, self.latents.to(device, torch.float32), noise)

    def uncond_steps(self, start: int = 0, negative_prompt=None) -> list[Conditioning] | None:
        """The per-step unconditional embeddings of a null-text inversion, for steps ``start``..
        (indices into this inversion's steps), or None for other inversions."""
        ctx = self.extras.get("null.context")  # [S, B, L, D]
        if ctx is None:
            return None
        if negative_prompt is not None:
            raise ValueError("this null-text inversion's optimised unconditional embeddings take the place of a "
                             "negative prompt: drop negative_prompt (or edit another inversion)")
        pooled = self.extras.get("null.pooled")  # [S, B, P]
        return [Conditioning(ctx[k], None if pooled is None else pooled[k]) for k in range(start, ctx.shape[0])]

    def to(self, device) -> "Inversion":
        def mv(t):
            return None if t is None else t.to(device)

        return Inversion(self.method, mv(self.x0), mv(self.latents), mv(self.timesteps), self.source.to(device),
                         None if self.uncond is None else self.uncond.to(device), mv(self.noise), dict(self.settings),
                         {k: mv(v) for k, v in self.extras.items()})

    def image_prompt(self, scale: float | None = None):
        """The image prompt this inversion was conditioned on (Tight Inversion), at ``scale``
        (default: the inversion's own), or None when it was made without one."""
        from ..image_prompt import ImagePrompt

        if "image.cond" not in self.extras:
            return None
        s = self.settings.get("image_scale", 1.0) if scale is None else scale
        return ImagePrompt(self.extras["image.cond"], self.extras["image.uncond"], s)

    def record_image_prompt(self, prompt) -> None:
        """Keep the image prompt the inversion was conditioned on (its edits read it again)."""
        self.extras["image.cond"], self.extras["image.uncond"] = prompt.cond, prompt.uncond
        self.settings["image_scale"] = prompt.scale

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"x0": self.x0, "latents": self.latents, "timesteps": self.timesteps}
        for name, c in (("source", self.source), ("uncond", self.uncond)):
            if c is not None:
                out.update({f"{name}.{f}": t for f, t in _fields(c).items()})
        if self.noise is not None:
            out["noise"] = self.noise
        out.update({f"extras.{k}": v for k, v in self.extras.items()})
        return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in out.items()}

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (atomically: a failed write leaves no partial file); bit-exact
        round trip with :meth:`load`, which verifies the tensors against the stored checksum."""
        from safetensors.torch import save_file

        from ..images import save_atomic

        path = Path(path)
        tensors = self._tensors()
        meta = {"format": FORMAT, "method": self.method, "settings": json.dumps(self.settings),
                "sha256": _checksum(tensors)}
        return save_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path, device="cpu") -> "Inversion":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"inversion file {str(path)!r} does not exist")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read inversion {str(path)!r}: not a valid safetensors file ({e})") from e
        if meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not an overpaint inversion (format {meta.get('format')!r}, expected {FORMAT!r})")
        if "sha256" in meta and _checksum({k: v.cpu() for k, v in t.items()}) != meta["sha256"]:
            raise ValueError(f"inversion {str(path)!r} is corrupted: its tensors do not match the checksum written "
                             f"when it was saved; invert the image again")
        try:
            settings = json.loads(meta.get("settings", "{}"))
        except ValueError:
            raise ValueError(f"inversion {str(path)!r} is corrupted: its settings are not valid JSON") from None
        missing = [k for k in ("x0", "latents", "timesteps", "source.context") if k not in t]
        missing += [] if meta.get("method") else ["method"]
        if missing or not isinstance(settings, dict):
            raise ValueError(f"inversion {str(path)!r} is incomplete (no {', '.join(missing) or 'settings'}); "
                             f"invert the image again")
        uncond = _conditioning(t, "uncond") if "uncond.context" in t else None
        return cls(
            method=meta["method"], x0=t["x0"], latents=t["latents"], timesteps=t["timesteps"],
            source=_conditioning(t, "source"), uncond=uncond, noise=t.get("noise"),
            settings=settings,
            extras={k[len("extras."):]: v for k, v in t.items() if k.startswith("extras.")},
        )


CONDITIONING_FIELDS = ("context", "pooled", "image", "image_scale")


def _fields(c: Conditioning) -> dict[str, torch.Tensor]:
    return {f: getattr(c, f) for f in CONDITIONING_FIELDS if getattr(c, f) is not None}


def _conditioning(t: dict, name: str) -> Conditioning:
    return Conditioning(*(t.get(f"{name}.{f}") for f in CONDITIONING_FIELDS))


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        h.update(f"{k}|{v.dtype}|{list(v.shape)}|".encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
