"""Scene-code pretraining: per-token labels line up with the tokens, and a few steps teach the encoder."""

import numpy as np
import pytest
import torch

from engine.shapes import scene_code as C
from engine.shapes import world
from engine.shapes.model import ModelSizes, build
from engine.shapes.train import TokenCache, snr_weight


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    return build(ModelSizes.smoke(), tmp_path_factory.mktemp("tok"))


def test_token_labels_follow_the_caption(models):
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = world.sample_scene(rng)
        cap = world.caption(scene)
        ids = models.tokenizer(cap).input_ids
        ws = world.words(cap)
        assert len(ids) == len(ws) + 2  # start + one token per word and comma + end
        t = C.token_labels(scene, 77)  # [77, G]
        full = torch.tensor(C.labels(scene))
        end = len(ws) + 1
        torch.testing.assert_close(t[end:], full.expand(77 - end, -1), rtol=0, atol=0)  # the pads know it all
        assert (t[0] == -100).all()  # the start token knows nothing
        for obj in scene.objects:  # a slot is known from its object's position word on, not before
            s = world.POSITIONS.index(obj.position)
            at = 1 + next(i for i, w in enumerate(ws) if w == obj.position)
            assert (t[at - 1, 3 * s:3 * s + 3] == -100).all()
            assert t[at, 3 * s:3 * s + 3].tolist() == full[3 * s:3 * s + 3].tolist()
        assert t[ws.index("background"), -1] == -100 and t[ws.index("background") + 1, -1] == full[-1]


def test_partial_captions_label_only_what_they_name():
    scene = world.Scene((world.Obj("circle", "red", "left", "small"), world.Obj("square", "blue", "right", "large")),
                        "gray", 0)
    full = torch.tensor(C.labels(scene))
    t = C.token_labels(scene, 77, objects=[1], background=False)  # "a large blue square on the right"
    at = 1 + world.words(world.fragment(scene, [1])).index("right")
    assert (t[:, :6] == -100).all() and (t[:, -1] == -100).all()  # left, center and background: not said
    assert (t[:at, 6:9] == -100).all() and (t[at:, 6:9] == full[6:9]).all()
    t = C.token_labels(scene, 77, objects=(), background=True)  # "on a gray background"
    assert (t[:, :-1] == -100).all()  # no slot is said to be empty
    assert (t[:4, -1] == -100).all() and (t[4:, -1] == full[-1]).all()


def test_caption_batch_mixes_in_fragments():
    caps, target, tok = C.caption_batch(0, 0, 64, 77, partial=0.5)
    frags = [c for c in caps if "background" not in c or c.startswith("on a")]
    assert 16 <= len(frags) <= 48
    assert C.caption_batch(0, 0, 64, 77)[0] != caps  # partial=0 keeps every caption whole
    assert all("background" in c for c in C.caption_batch(0, 0, 64, 77)[0])
    assert tok.shape == (64, 77, len(C.GROUPS))


def test_labels_name_each_slot():
    scene = world.Scene((world.Obj("circle", "red", "left", "small"),), "white", 0)
    lab = C.labels(scene)
    assert len(lab) == len(C.GROUPS)
    assert lab[:3] == [1 + list(world.COLOURS).index("red"), 1 + world.SHAPES.index("circle"), 1]
    assert lab[3:9] == [0] * 6  # center and right are empty
    assert lab[-1] == list(world.BACKGROUNDS).index("white")


def test_caption_too_long_for_the_window_is_refused():
    scene = world.sample_scene(np.random.default_rng(1), n_objects=3)
    with pytest.raises(ValueError, match="does not fit"):
        C.token_labels(scene, 10)


def test_pretraining_teaches_the_end_token_the_scene(models):
    enc = models.text_encoder
    tokens = TokenCache(models.tokenizer)
    caps, target, _ = C.caption_batch(0, C.HELD_OUT, 64, 77)
    head = torch.nn.Linear(enc.config.hidden_size, C.N_LOGITS)
    with torch.no_grad():
        ids = tokens(caps)
        before = C.accuracy(enc(ids).last_hidden_state, ids, models.tokenizer.eos_token_id, head, target)
    after = C.pretrain(enc, tokens, models.tokenizer.eos_token_id, seed=0, steps=100, batch=32, lr=3e-3)
    assert after > max(0.8, before + 0.4), (before, after)  # the majority class scores ~0.33


def test_min_snr_weights():
    abar = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    snr = abar / (1 - abar)
    torch.testing.assert_close(snr_weight(abar, "v_prediction", 5.0), snr.clamp(max=5) / (snr + 1), rtol=1e-12, atol=0)
    torch.testing.assert_close(snr_weight(abar, "epsilon", 5.0), snr.clamp(max=5) / snr, rtol=1e-12, atol=0)
    torch.testing.assert_close(snr_weight(abar, "v_prediction", 0.0), torch.ones_like(abar), rtol=0, atol=0)


def test_screens_widen_only_the_background_group(models):
    assert C.GROUPS[-1] == ("background", len(world.BACKGROUNDS)) == ("background", 4)
    assert C.groups(True)[:-1] == C.GROUPS[:-1] and C.groups(True)[-1] == ("background", len(world.ALL_BACKGROUNDS))
    scene = world.Scene((world.Obj("circle", "red", "left", "small"),), "green", 0)
    assert C.labels(scene)[-1] == list(world.ALL_BACKGROUNDS).index("green") == len(world.BACKGROUNDS)
    caps, target, per_token = C.caption_batch(0, 0, 16, 77, screens=1.0)
    assert all(c.endswith(("on a green background", "on a blue background")) for c in caps)
    assert (target[:, -1] >= len(world.BACKGROUNDS)).all()
    # pretraining with screens sizes its head for their classes: with GROUPS' head the screens'
    # labels would fall outside the background logits and cross-entropy would raise
    with pytest.raises(IndexError):
        C.code_loss(torch.zeros(16, 77, 128), torch.nn.Linear(128, C.N_LOGITS), per_token)
    C.pretrain(models.text_encoder, TokenCache(models.tokenizer), models.tokenizer.eos_token_id, seed=0,
               steps=2, batch=8, screens=0.5)  # completes: its head has the screens' classes
