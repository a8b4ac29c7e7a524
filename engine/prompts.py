"""Prompt encoding for SD (one CLIP encoder) and SDXL (two, penultimate layers + pooled).

A prompt longer than the encoder's window is an error, not a silent truncation:
an edit whose words are cut off would quietly edit the wrong thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Text conditioning for a batch of rows."""

    context: torch.Tensor  # [B, L, Dctx] encoder_hidden_states
    pooled: torch.Tensor | None = None  # [B, Dpool] (SDXL only)

    def __len__(self) -> int:
        return self.context.shape[0]

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditioning(torch.cat([p.context for p in parts]), pooled)

    def repeat(self, n: int) -> "Conditioning":
        """Each row n times in a row (prompt-major, as diffusers' num_images_per_prompt)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, 0)
        return Conditioning(self.context.repeat_interleave(n, 0), pooled)

    def tile(self, n: int) -> "Conditioning":
        """All rows n times over (row-major blocks: rows of step 0, then of step 1, ...)."""
        pooled = None if self.pooled is None else self.pooled.repeat(n, 1)
        return Conditioning(self.context.repeat(n, 1, 1), pooled)

    def to(self, device=None, dtype=None) -> "Conditioning":
        pooled = None if self.pooled is None else self.pooled.to(device, dtype)
        return Conditioning(self.context.to(device, dtype), pooled)

    def zeros_like(self) -> "Conditioning":
        pooled = None if self.pooled is None else torch.zeros_like(self.pooled)
        return Conditioning(torch.zeros_like(self.context), pooled)


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
