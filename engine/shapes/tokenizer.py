"""A CLIP-format tokenizer whose vocabulary is the Shapes world's word list.

Source of the vocabulary: built at training time, not downloaded. It holds
  * the 256 byte-level symbols CLIP's BPE uses and their end-of-word forms
    ``s</w>`` (any text still tokenizes, byte by byte, if a word is unknown),
  * every word of every caption template (``engine.shapes.world.vocabulary()``)
    as one token ``word</w>``, plus the intermediate pieces its merges produce
    (the ``tokenizers`` BPE needs every merge result to be in the vocabulary),
  * ``<|startoftext|>`` and ``<|endoftext|>`` last, so CLIP's pooling at the
    highest id (argmax) finds the end token; pad = unk = end token.
Merges are the fewest that make each world word a single token: they are found
by repeatedly tokenizing each word with the merges so far and merging its first
two pieces until every word is whole (a new, lowest-priority merge can only
shorten tokenizations, so this terminates).
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.shapes.world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of CLIP's byte-level BPE, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        known = [(r, i) for r, i in pairs if r is not None]
        if not known:
            break
        best = min(known)[0]
        merged, i = [], 0
        while i < len(parts):  # merge every occurrence of the best pair, left to right
            if i + 1 < len(parts) and ranks.get((parts[i], parts[i + 1])) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_merges(words: list[str]) -> list[tuple[str, str]]:
    """The fewest merges (see module docstring) that make every word one token."""
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    changed = True
    while changed:
        changed = False
        for w in words:
            parts = _bpe(w, ranks)
            if len(parts) > 1:
                pair = (parts[0], parts[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
    return merges


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab token -> id, merges) for the world's words; specials take the last two ids."""
    words = vocabulary()
    merges = build_merges(words)
    tokens = byte_symbols() + [s + "</w>" for s in byte_symbols()]
    tokens += [a + b for a, b in merges]  # merge results, whole words among them
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str | Path, max_length: int = MAX_LENGTH) -> dict[str, int]:
    """Write vocab.json, merges.txt and the tokenizer config into ``folder``; return the vocab."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2))
    return vocab


def special_ids(vocab: dict[str, int]) -> tuple[int, int]:
    """(bos id, eos id) for the text encoder config (eos doubles as pad)."""
    return vocab[BOS], vocab[EOS]
