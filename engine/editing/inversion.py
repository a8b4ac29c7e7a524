"""The result of inverting an image: everything an edit needs, reusable and saveable.

An :class:`Inversion` is computed once (``pipe.invert``) and edited many times
(``pipe.edit``) without re-running the inversion. It saves to a single
safetensors file (tensors + JSON settings in the header), so it can be cached
on disk or shipped between processes; nothing in it is pickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..prompts import Conditioning

FORMAT = "overpaint.inversion/1"


@dataclass
class Inversion:
    """method: "ddim" | "ddpm" | "ledits++".

    x0: clean image latents [B, C, h, w] (VAE-encoded, scaled).
    latents: [S+1, B, C, h, w]; latents[i] is what denoising step i starts from
        (latents[0] the noisiest), latents[S] == x0 for exact methods.
    timesteps: [S] the denoising timesteps, noisiest first.
    noise: [S, B, C, h, w] per-step noise maps (edit-friendly DDPM / LEDITS++), else None.
    source: the source prompt's conditioning (rows [B]); uncond: the unconditional one.
    settings: prompt, steps, guidance_scale, skip, seed, sampler, height, width, ...
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

    def to(self, device) -> "Inversion":
        def mv(t):
            return None if t is None else t.to(device)

        return Inversion(self.method, mv(self.x0), mv(self.latents), mv(self.timesteps), self.source.to(device),
                         None if self.uncond is None else self.uncond.to(device), mv(self.noise), dict(self.settings),
                         {k: mv(v) for k, v in self.extras.items()})

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {"x0": self.x0, "latents": self.latents, "timesteps": self.timesteps, "source.context": self.source.context}
        if self.source.pooled is not None:
            out["source.pooled"] = self.source.pooled
        if self.uncond is not None:
            out["uncond.context"] = self.uncond.context
            if self.uncond.pooled is not None:
                out["uncond.pooled"] = self.uncond.pooled
        if self.noise is not None:
            out["noise"] = self.noise
        out.update({f"extras.{k}": v for k, v in self.extras.items()})
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file; bit-exact round trip with :meth:`load`."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"format": FORMAT, "method": self.method, "settings": json.dumps(self.settings)}
        save_file(self._tensors(), str(path), metadata=meta)
        return path

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
        uncond = None
        if "uncond.context" in t:
            uncond = Conditioning(t["uncond.context"], t.get("uncond.pooled"))
        return cls(
            method=meta["method"], x0=t["x0"], latents=t["latents"], timesteps=t["timesteps"],
            source=Conditioning(t["source.context"], t.get("source.pooled")), uncond=uncond, noise=t.get("noise"),
            settings=json.loads(meta.get("settings", "{}")),
            extras={k[len("extras."):]: v for k, v in t.items() if k.startswith("extras.")},
        )
