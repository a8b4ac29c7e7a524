"""Teach the text encoder the scene before the UNet needs it: a supervised scene code.

The UNet reads a caption only through cross-attention on the text encoder's hidden
states. Trained from scratch by the diffusion loss alone, the encoder must discover that
"red" belongs to the object "on the left" from a gradient that is mostly noise; our first
models learned backgrounds (one word, no binding) long before colour at a place.

Here the end-of-text tokens (CLIP pads with the end token, and its causal attention lets
every one of them see the whole caption) are trained to *decode* the scene: per slot
(left / center / right) its colour, shape and size, or "empty", and the background. A
linear head on the last hidden state predicts those labels; cross-entropy trains encoder
and head together. Captions cost nothing to make, so this stage takes seconds, and the
UNet stage then starts from an encoder whose padding tokens already say what is where.
The head is discarded: the shipped encoder is a plain ``CLIPTextModel``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from engine.shapes import world

# Label groups decoded from the caption: (name, number of classes). Class 0 of a slot group is "empty".
SLOT_ATTRS = (("colour", len(world.COLOURS)), ("shape", len(world.SHAPES)), ("size", len(world.SIZES)))
_SLOT_GROUPS = tuple((f"{pos}.{attr}", n + 1) for pos in world.POSITIONS for attr, n in SLOT_ATTRS)


def groups(screens: bool = False) -> tuple[tuple[str, int], ...]:
    """The label groups; the background group counts the screens only for a world that has them
    (so a run without screens builds the same head, from the same seed, as before they existed)."""
    return _SLOT_GROUPS + (("background", len(world.ALL_BACKGROUNDS if screens else world.BACKGROUNDS)),)


GROUPS = groups()
N_LOGITS = sum(n for _, n in GROUPS)
HELD_OUT = 10**9  # the step index of the held-out captions (training never gets there)


def labels(scene: world.Scene) -> list[int]:
    """Class index per group of ``GROUPS`` for one scene."""
    by_pos = {o.position: o for o in scene.objects}
    out = []
    for pos in world.POSITIONS:
        o = by_pos.get(pos)
        out += [0] * len(SLOT_ATTRS) if o is None else [
            1 + list(world.COLOURS).index(o.colour), 1 + world.SHAPES.index(o.shape), 1 + world.SIZES.index(o.size)]
    return out + [list(world.ALL_BACKGROUNDS).index(scene.background)]  # classic backgrounds first


def token_labels(scene: world.Scene, length: int, objects: Sequence[int] | None = None,
                 background: bool = True, first: int = 1) -> torch.Tensor:
    """Per-token targets [length, G]: what the caption has said so far, -100 where not yet said.

    Token i is the start token (0), caption word i - 1, then the end token and its pads (every
    world word and comma is one token). A slot's labels are known from its object's position
    word on ("... circle on the left": "left" binds the phrase to a place), an empty slot's from
    the end token on, the background's from the word "background" on. So the position word, the
    token a query at that place most needs, carries its object, and the pads carry everything.
    A partial caption (``objects`` and ``background`` as in :func:`world.fragment`) says nothing
    about the objects and background it leaves out: their labels stay -100 on every token.
    ``first``: the token index of the first word (1 after CLIP's start token; 0 for T5, which has none).
    """
    objects = range(len(scene.objects)) if objects is None else sorted(objects)
    whole = background and len(objects) == len(scene.objects)  # only a whole caption says a slot is empty
    ws = world.words(world.fragment(scene, objects, background))
    end = len(ws) + first  # index of the end token
    if end >= length:
        raise ValueError(f"caption of {len(ws)} words does not fit {length} tokens")
    full = labels(scene)
    never = length  # a token index no token reaches
    known = torch.full((len(GROUPS),), end if whole else never)  # [G]: first token index at which each group is known
    pos_words = [i + first for i, w in enumerate(ws) if w in world.POSITIONS]  # objects are listed left to right
    k = len(SLOT_ATTRS)
    for i, at in zip(objects, pos_words):
        s = world.POSITIONS.index(scene.objects[i].position)
        known[k * s:k * (s + 1)] = at
    known[-1] = ws.index("background") + first if background else never
    idx = torch.arange(length).view(-1, 1)  # [L, 1]
    return torch.where(idx >= known.view(1, -1), torch.tensor(full).view(1, -1), torch.tensor(-100))  # [L, G]


def code_loss(hidden: torch.Tensor, head: torch.nn.Module, target: torch.Tensor,
              label_groups: Sequence[tuple[str, int]] = GROUPS) -> torch.Tensor:
    """Mean cross-entropy of the scene labels decoded from every token that has them.

    hidden [B, L, D] last hidden states; target [B, L, G] class indices, -100 where unknown.
    """
    logits = head(hidden.float())  # [B, L, sum of the groups' classes]
    total, count, lo = hidden.new_zeros((), dtype=torch.float32), 0, 0
    for g, (_, n) in enumerate(label_groups):
        t = target[..., g]  # [B, L]
        total = total + F.cross_entropy(logits[..., lo:lo + n].reshape(-1, n), t.reshape(-1), reduction="sum")
        count += int((t >= 0).sum())
        lo += n
    return total / max(count, 1)


def accuracy(hidden: torch.Tensor, ids: torch.Tensor, eos_id: int, head: torch.nn.Module,
             target: torch.Tensor, label_groups: Sequence[tuple[str, int]] = GROUPS) -> float:
    """Share of (caption, group) labels decoded right from the caption's end token."""
    end = (ids == eos_id).float().argmax(1)  # [B]: first end token
    logits = head(hidden[torch.arange(len(ids)), end].float())  # [B, sum of the groups' classes]
    right, lo = [], 0
    for g, (_, n) in enumerate(label_groups):
        right.append(logits[:, lo:lo + n].argmax(1) == target[:, g])
        lo += n
    return torch.stack(right).float().mean().item()


def caption_batch(seed: int, step: int, n: int, length: int, partial: float = 0.0,
                  first: int = 1, screens: float = 0.0) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``n`` captions, their scenes' labels [n, G] and per-token targets [n, length, G], fixed by
    (seed, step); a ``partial`` share of the captions are fragments (:func:`world.sample_fragment`),
    a ``screens`` share of the scenes on green or blue screens."""
    rng = np.random.default_rng([seed, 4, step])
    scenes = [world.sample_scene(rng, screens=screens) for _ in range(n)]
    parts = [world.sample_fragment(s, rng, partial) for s in scenes]
    caps = [world.fragment(s, o, b) for s, (o, b) in zip(scenes, parts)]
    return (caps, torch.tensor([labels(s) for s in scenes]),
            torch.stack([token_labels(s, length, o, b, first) for s, (o, b) in zip(scenes, parts)]))


def pretrain(text_encoder, tokens, eos_id: int, seed: int, steps: int, batch: int = 64, lr: float = 1e-3,
             device: str = "cpu", bar=None, log=None, partial: float = 0.0, length: int | None = None,
             first: int = 1, screens: float = 0.0) -> float:
    """Train ``text_encoder`` (in place) to decode the scene from its tokens, a ``partial`` share of
    them fragments; returns the held-out accuracy of the labels decoded from whole captions' end
    tokens. ``tokens`` maps captions to padded ids [B, L] (``length``: L, default the encoder's
    positions); ``first`` as in :func:`token_labels`; ``screens`` as in :func:`world.sample_scene`."""
    groups_ = groups(screens > 0)
    with torch.random.fork_rng(devices=[]):  # seed the head's init without touching the caller's RNG
        torch.manual_seed(seed)
        head = torch.nn.Linear(text_encoder.config.hidden_size, sum(n for _, n in groups_)).to(device)
    params = [*text_encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    length = length or text_encoder.config.max_position_embeddings
    text_encoder.train()
    for step in range(steps):
        caps, _, target = caption_batch(seed, step, batch, length, partial, first, screens)
        loss = code_loss(text_encoder(tokens(caps).to(device)).last_hidden_state, head, target.to(device), groups_)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if log is not None and ((step + 1) % 10 == 0 or step + 1 == steps):
            log(step + 1, loss.item())
    caps, target, _ = caption_batch(seed, HELD_OUT, 256, length, first=first, screens=screens)
    with torch.no_grad():
        ids = tokens(caps).to(device)
        return accuracy(text_encoder(ids).last_hidden_state, ids, eos_id, head, target.to(device), groups_)
