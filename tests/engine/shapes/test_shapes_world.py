"""Shapes world: determinism, captions, masks and exact edits."""

import numpy as np
import pytest

from engine.shapes import world as w


def scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [w.sample_scene(rng) for _ in range(n)]


def test_same_seed_same_pixels():
    a = [w.render(s) for s in scenes(20, seed=5)]
    b = [w.render(s) for s in scenes(20, seed=5)]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (64, 64, 3) and a[0].dtype == np.uint8
    assert not np.array_equal(a[0], a[1])


def test_texture_depends_on_seed_only():
    s = scenes(1)[0]
    other = w.Scene(s.objects, s.background, s.seed + 1)
    assert not np.array_equal(w.render(s), w.render(other))  # noise field differs
    assert np.abs(w.render(s).astype(int) - w.render(other)).max() < 30  # but only mildly


def test_scene_invariants():
    for s in scenes(300, seed=1):
        assert 1 <= len(s.objects) <= 3
        assert len({o.position for o in s.objects}) == len(s.objects)
        assert all(o.colour != s.background for o in s.objects)
        masks = w.render_masks(s)
        assert masks.shape == (len(s.objects), 64, 64) and masks.dtype == bool
        assert masks.sum(0).max() <= 1  # no overlap
        assert all(m.sum() > 50 for m in masks)


def test_caption_text():
    s = w.Scene((w.Obj("circle", "red", "left", "small"), w.Obj("square", "blue", "right", "large")), "white", 3)
    assert w.caption(s) == "a small red circle on the left and a large blue square on the right, on a white background"
    three = w.Scene(s.objects[:1] + (w.Obj("triangle", "green", "center", "large"),) + s.objects[1:], "gray", 0)
    assert w.caption(three) == ("a small red circle on the left, a large green triangle in the center and "
                                "a large blue square on the right, on a gray background")
    vocab = set(w.vocabulary())
    for sc in scenes(100):
        assert set(w.caption(sc).replace(",", "").split()) <= vocab


def test_fragments_name_part_of_the_scene():
    s = w.Scene((w.Obj("circle", "red", "left", "small"), w.Obj("triangle", "green", "center", "large"),
                 w.Obj("square", "blue", "right", "large")), "white", 3)
    assert w.fragment(s, range(3), background=True) == w.caption(s)
    assert w.fragment(s, [2]) == "a large blue square on the right"
    assert w.fragment(s, [2, 0]) == "a small red circle on the left and a large blue square on the right"
    assert w.fragment(s, (), background=True) == "on a white background"
    with pytest.raises(ValueError, match="at least one object or the background"):
        w.fragment(s, ())


def test_sampled_fragments_never_mix_objects_and_background():
    rng = np.random.default_rng(0)
    three = w.sample_scene(rng, n_objects=3)
    seen = set()
    for _ in range(400):
        objs, bg = w.sample_fragment(three, rng)
        assert (objs == ()) == bg  # either some objects, or the background alone
        seen.add((objs, bg))
    assert len(seen) == 2 ** 3  # every choice is drawn


def test_fragment_share_and_whole_captions():
    scene = w.sample_scene(np.random.default_rng(1), n_objects=2)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    assert w.sample_fragment(scene, rng, partial=0.0) == ((0, 1), True)
    assert rng.bit_generator.state == state  # a share of 0 draws nothing (the VAE stage's data stays put)
    picks = [w.sample_fragment(scene, rng, partial=0.25) for _ in range(400)]
    assert 60 <= sum(p != ((0, 1), True) for p in picks) <= 140


@pytest.mark.parametrize("kind", w.EDIT_KINDS)
def test_edits_exact(kind):
    rng = np.random.default_rng(hash(kind) % 2**32)
    done = 0
    for s in scenes(60, seed=2):
        if kind not in w.possible_kinds(s):
            continue
        e = w.sample_edit(s, rng, kind)
        t = w.apply(s, e)
        assert t.seed == s.seed and w.edit_prompt(s, e) == w.caption(t)
        src, tgt = w.render(s), w.render(t)
        if kind == "background":
            assert t.background == e.value != s.background
            assert all(o.colour != t.background for o in t.objects)
            inside = np.zeros((64, 64), bool)
            for o in s.objects:
                inside |= w.coverage(o) == 1.0
            assert np.array_equal(src[inside], tgt[inside])
            assert not np.array_equal(src[~inside], tgt[~inside])
        else:
            touched = np.zeros((64, 64), bool)
            for o in set(s.objects) ^ set(t.objects):
                touched |= w.footprint(o)
            assert np.array_equal(src[~touched], tgt[~touched])
            assert not np.array_equal(src, tgt)
        if kind == "add":
            assert len(t.objects) == len(s.objects) + 1 and t.objects[-1] == e.value
        elif kind == "remove":
            assert len(t.objects) == len(s.objects) - 1
        elif kind != "background":
            field = "colour" if kind == "colour" else kind
            assert getattr(t.objects[e.index], field) == e.value != getattr(s.objects[e.index], field)
        swaps = w.word_swap(w.caption(s), w.caption(t))
        if kind in ("colour", "shape", "size", "background"):
            assert len(swaps) == 1 and swaps[0][2] == e.value
        elif kind == "position":
            assert 1 <= len(swaps) <= 2 and swaps[-1][2] == e.value
        else:
            assert swaps == []
        done += 1
    assert done >= 15


def test_invalid_edits_raise():
    s = w.Scene((w.Obj("circle", "red", "left", "small"), w.Obj("square", "blue", "right", "large")), "white", 0)
    with pytest.raises(ValueError):
        w.apply(s, w.Edit("position", 0, "right"))
    with pytest.raises(ValueError):
        w.apply(s, w.Edit("background", -1, "blue"))
    with pytest.raises(ValueError):
        w.apply(s, w.Edit("colour", 0, "white"))
    with pytest.raises(ValueError):
        w.sample_edit(w.Scene(s.objects[:1], "white", 0), np.random.default_rng(0), "remove")


def test_screens_off_draws_the_classic_stream():
    # pinned from the world before screens existed (seed 11): same scenes, same randomness left
    rng = np.random.default_rng(11)
    got = [w.sample_scene(rng, screens=0.0) for _ in range(2)]
    assert got == [w.Scene((w.Obj("triangle", "yellow", "right", "large"),), "white", 1529378280),
                   w.Scene((w.Obj("diamond", "yellow", "left", "large"),), "gray", 151227035)]
    assert int(rng.integers(1000)) == 542


def test_screens_share_and_invariants():
    rng = np.random.default_rng(3)
    every = [w.sample_scene(rng, screens=1.0) for _ in range(200)]
    assert {s.background for s in every} == set(w.SCREENS)
    assert all(o.colour != s.background for s in every for o in s.objects)
    some = [w.sample_scene(rng, screens=1 / 3) for _ in range(3000)]
    share = np.mean([s.background in w.SCREENS for s in some])
    assert abs(share - 1 / 3) < 0.03, share
    assert {s.background for s in some} == set(w.ALL_BACKGROUNDS)
    with pytest.raises(ValueError, match="screens is a share between 0 and 1, got 1.5"):
        w.sample_scene(rng, screens=1.5)
    img = w.render(every[0])  # the screen's colour fills what the objects leave
    far = ~w.render_masks(every[0]).any(0)
    assert np.abs(np.median(img[far], 0) - np.asarray(w.SCREENS[every[0].background])).max() < 8
    assert "on a green background" in [w.caption(s).split(", ")[-1] for s in every]


def test_background_edits_name_a_background():
    s = scenes(1)[0]
    with pytest.raises(ValueError, match="unknown background 'teal'"):
        w.apply(s, w.Edit("background", -1, "teal"))
    free = [b for b in w.SCREENS if all(o.colour != b for o in s.objects)]
    screen = w.apply(s, w.Edit("background", -1, free[0]))
    assert screen.background == free[0]
    rng = np.random.default_rng(0)  # edits of a screen scene go back to the classic backgrounds
    assert {w.sample_edit(screen, rng, "background").value for _ in range(50)} <= set(w.BACKGROUNDS)
