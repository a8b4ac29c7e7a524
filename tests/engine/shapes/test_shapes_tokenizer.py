"""The world-vocabulary CLIP tokenizer."""

import numpy as np
from transformers import CLIPTokenizer

from engine.shapes import tokenizer as T
from engine.shapes import world as w


def test_every_caption_word_is_one_token(tmp_path):
    vocab = T.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert list(vocab)[-2:] == [T.BOS, T.EOS]  # specials last: CLIP pools at argmax(id)
    assert tok.bos_token_id == len(vocab) - 2 and tok.eos_token_id == tok.pad_token_id == len(vocab) - 1
    assert tok.model_max_length == 77
    rng = np.random.default_rng(0)
    for _ in range(50):
        cap = w.caption(w.sample_scene(rng))
        ids = tok(cap).input_ids
        toks = tok.convert_ids_to_tokens(ids)[1:-1]
        assert toks == [t + "</w>" for t in cap.replace(",", " ,").split()]
        assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == cap
        assert len(ids) <= 32


def test_unknown_text_falls_back_to_bytes(tmp_path):
    T.write_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    ids = tok("zebra!").input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "zebra!"


def test_merges_are_minimal():
    words = w.vocabulary()
    merges = T.build_merges(words)
    # each merge removes one piece from at least one word: never more than the letters to join
    assert len(merges) <= sum(len(x) - 1 for x in words)
    ranks = {m: i for i, m in enumerate(merges)}
    assert all(T._bpe(x, ranks) == [x + "</w>"] for x in words)
