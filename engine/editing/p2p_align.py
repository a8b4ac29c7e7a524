"""Token bookkeeping for Prompt-to-Prompt (Hertz et al. 2022): word positions and
the token alignment of a refined prompt to its source.

P2P's refinement edit ("a cat" -> "a fluffy cat") lets every target token that also
occurs in the source borrow the source token's cross-attention map, and new tokens
keep their own. The pairing is a global alignment of the two token sequences
(P2P's ``seq_aligner``: match +1, mismatch -1, gap 0, i.e. a longest common
subsequence); we compute it with our own dynamic programme and map padding
positions past the prompts' ends onto each other in order.
"""

from __future__ import annotations

import re

import torch


def token_ids(tokenizer, prompt: str) -> list[int]:
    """Ids of ``prompt`` with BOS and EOS, unpadded."""
    return list(tokenizer(prompt, truncation=False).input_ids)


def _words(prompt: str) -> list[str]:
    return prompt.split()


def _norm(word: str) -> str:
    return re.sub(r"[^\w]", "", word.lower())  # "Cat," matches "cat"


def word_token_indices(tokenizer, prompt: str, word: str | int) -> list[int]:
    """Token positions (BOS = 0) of ``word`` in ``prompt``: every occurrence of the word
    (or of the space-separated phrase), or the word at position ``word`` if an int.

    Each space-separated word is tokenized on its own; CLIP's BPE never merges across
    whitespace, so the counts add up to the prompt's (checked).
    """
    words = _words(prompt)
    counts = [len(tokenizer(w, add_special_tokens=False, truncation=False).input_ids) for w in words]
    if sum(counts) + 2 != len(token_ids(tokenizer, prompt)):
        raise ValueError(f"cannot place the words of {prompt!r} among its tokens (tokenizer merges across spaces)")
    starts = [1 + sum(counts[:i]) for i in range(len(words))]
    if isinstance(word, int):
        if not -len(words) <= word < len(words):
            raise ValueError(f"word position {word} is outside the {len(words)} words of {prompt!r}")
        places = [word % len(words)]
        n = 1
    else:
        phrase = [_norm(w) for w in word.split()]
        n = len(phrase)
        places = [i for i in range(len(words) - n + 1) if [_norm(w) for w in words[i:i + n]] == phrase]
    return [t for p in places for i in range(p, p + n) for t in range(starts[i], starts[i] + counts[i])]


def token_mask(tokenizer, prompt: str, words, max_len: int, what: str) -> torch.Tensor:
    """[max_len] float, 1 at the tokens of ``words`` (a word, phrase, index or list of them)."""
    words = [words] if isinstance(words, (str, int)) else list(words)
    mask = torch.zeros(max_len)
    for w in words:
        idx = word_token_indices(tokenizer, prompt, w)
        if not idx:
            raise ValueError(f"{what}: word {w!r} is not in the prompt {prompt!r}")
        mask[idx] = 1.0
    return mask


def align(source: list[int], target: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Global alignment of two token sequences (with BOS/EOS, unpadded).

    Returns ``mapper`` [max_len] int64 and ``aligned`` [max_len] float: target token j
    takes source token mapper[j]'s attention where aligned[j] = 1 (equal tokens paired
    by the alignment) and keeps its own where 0 (new tokens). Padding position p >= len(target)
    pairs with source padding len(source) + (p - len(target)) (clamped to the window).
    """
    n, m = len(source), len(target)
    if max(n, m) > max_len:
        raise ValueError(f"prompts of {n} and {m} tokens do not fit the {max_len}-token window")
    # score[i][j]: best alignment of source[:i] and target[:j]; match +1, mismatch -1, gap 0.
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diag, score[i - 1][j], score[i][j - 1])
    mapper = torch.zeros(max_len, dtype=torch.int64)
    aligned = torch.zeros(max_len)
    i, j = n, m
    while i > 0 and j > 0:  # trace back, preferring matches so equal tokens pair up
        if source[i - 1] == target[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            mapper[j - 1], aligned[j - 1] = i - 1, 1.0
            i, j = i - 1, j - 1
        elif score[i][j] == score[i][j - 1]:
            j -= 1  # target token j-1 is new
        else:
            i -= 1  # source token i-1 was dropped
    pad = torch.arange(m, max_len)
    mapper[m:] = (n + pad - m).clamp(max=max_len - 1)
    aligned[m:] = 1.0
    # New tokens point at themselves (clamped into the source's range); their weight is 0.
    new = aligned[:m] == 0
    mapper[:m][new] = torch.arange(m)[new].clamp(max=max_len - 1)
    return mapper, aligned
