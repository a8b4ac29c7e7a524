"""Prompt encoding for SD (one CLIP encoder) and SDXL (two, penultimate layers + pooled).

A prompt longer than the encoder's window is an error, not a silent truncation:
an edit whose words are cut off would quietly edit the wrong thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Text conditioning for a batch of rows, and optionally an image prompt per row.

    ``image`` [B, T, Dctx]: IP-Adapter image tokens (:mod:`engine.models.ip_adapter`) the rows
    also attend to, at ``image_scale`` [B] (0: a row reads no image). Rows with and without an
    image may be concatenated: the latter get zero tokens at scale 0.
    """

    context: torch.Tensor  # [B, L, Dctx] encoder_hidden_states
    pooled: torch.Tensor | None = None  # [B, Dpool] (SDXL only)
    image: torch.Tensor | None = None  # [B, T, Dctx] image-prompt tokens
    image_scale: torch.Tensor | None = None  # [B] float32

    def __len__(self) -> int:
        return self.context.shape[0]

    def _map(self, fn, scale_fn=None) -> "Conditioning":
        """The same rows with ``fn`` applied to every tensor (``scale_fn`` to the 1-D scales)."""
        opt = lambda t, f: None if t is None else f(t)  # noqa: E731
        return Conditioning(fn(self.context), opt(self.pooled, fn), opt(self.image, fn),
                            opt(self.image_scale, scale_fn or fn))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        image = scale = None
        ref = next((p for p in parts if p.image is not None), None)
        if ref is not None:
            image = torch.cat([p.image if p.image is not None else
                               ref.image.new_zeros(len(p), *ref.image.shape[1:]) for p in parts])
            scale = torch.cat([p.image_scale if p.image is not None else
                               ref.image_scale.new_zeros(len(p)) for p in parts])
        return Conditioning(torch.cat([p.context for p in parts]), pooled, image, scale)

    def repeat(self, n: int) -> "Conditioning":
        """Each row n times in a row (prompt-major, as diffusers' num_images_per_prompt)."""
        return self._map(lambda t: t.repeat_interleave(n, 0))

    def tile(self, n: int) -> "Conditioning":
        """All rows n times over (row-major blocks: rows of step 0, then of step 1, ...)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self._map(lambda t: t.to(device, dtype), lambda t: t.to(device))

    def zeros_like(self) -> "Conditioning":
        """Zero text (SDXL's empty prompt); an image prompt stays as it is."""
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return Conditioning(torch.zeros_like(self.context), pooled, self.image, self.image_scale)

    def with_image(self, tokens: torch.Tensor | None, scale) -> "Conditioning":
        """These rows reading image tokens [1 or B, T, Dctx] at ``scale`` (float or [B]); None drops it."""
        if tokens is None:
            return Conditioning(self.context, self.pooled)
        b = len(self)
        tokens = tokens.to(self.context.device, self.context.dtype)
        tokens = tokens.expand(b, -1, -1) if tokens.shape[0] == 1 else tokens
        if tokens.shape[0] != b:
            raise ValueError(f"{tokens.shape[0]} image prompts for {b} rows")
        s = torch.as_tensor(scale, dtype=torch.float32, device=self.context.device).reshape(-1)
        s = s.repeat(b // s.numel()) if s.numel() in (1, b) else s  # [B], a tensor of its own (saved as is)
        if s.numel() != b:
            raise ValueError(f"{s.numel()} image scales for {b} rows")
        return Conditioning(self.context, self.pooled, tokens, s)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids [B, L] padded to the tokenizer's window; error when a prompt does not fit."""
    window = tokenizer.model_max_length
    for p in prompts:
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > window:
            raise ValueError(
                f"prompt is {n - 2} tokens but the text encoder takes at most {window - 2}: "
                f"shorten it ({p[:60]!r}{'...' if len(p) > 60 else ''})"
            )
    ids = tokenizer(prompts, padding="max_length", max_length=window, truncation=True, return_tensors="pt")
    return ids.input_ids


def as_list(prompt, n: int | None = None, what: str = "prompt") -> list[str]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
        raise TypeError(f"{what} must be a string or a list of strings, got {type(prompt).__name__}")
    prompt = list(prompt)
    if not prompt:
        raise ValueError(f"{what} is an empty list; give a string, or a list with one per image")
    if n is not None and len(prompt) == 1 and n > 1:
        prompt = prompt * n
    if n is not None and len(prompt) != n:
        raise ValueError(f"{what} has {len(prompt)} entries but there are {n} prompts")
    return prompt


@torch.no_grad()
def encode(text_encoders: list, tokenizers: list, prompts: list[str], device, dtype) -> Conditioning:
    """Encode prompts. One encoder: last hidden state (SD). Two: penultimate hidden
    states of both, concatenated, and the second encoder's projected pooled output (SDXL)."""
    if len(text_encoders) == 1:
        enc, tok = text_encoders[0], tokenizers[0]
        ids = tokenize(tok, prompts).to(enc.device)
        return Conditioning(enc(ids)[0].to(device, dtype))
    states, pooled = [], None
    for enc, tok in zip(text_encoders, tokenizers):
        ids = tokenize(tok, prompts).to(enc.device)
        out = enc(ids, output_hidden_states=True)
        if out[0].ndim == 2:  # the projection model's text_embeds
            pooled = out[0]
        states.append(out.hidden_states[-2])  # [B, L, Di]
    return Conditioning(torch.cat(states, dim=-1).to(device, dtype), pooled.to(device, dtype))
