"""Scene analyser: exact on ground truth, robust to mild noise and blur."""

import numpy as np
import pytest

from engine.shapes import analyser as A
from engine.shapes import world as w

N = 300


def blur(img):
    """Separable [1, 2, 1]/4 blur (Gaussian, sigma ~0.7 px)."""
    a = img.astype(np.float32)
    p = np.pad(a, ((1, 1), (0, 0), (0, 0)), mode="edge")
    a = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    p = np.pad(a, ((0, 0), (1, 1), (0, 0)), mode="edge")
    return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]


def degrade(img, rng):
    """Small blur, then Gaussian noise sigma = 8/255; returned as float in [0, 1]."""
    return np.clip(blur(img) / 255.0 + rng.normal(0, 8 / 255, img.shape), 0, 1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(2024)
    scenes = [w.sample_scene(rng) for _ in range(N)]
    return scenes, [w.render(s) for s in scenes]


def test_clean_accuracy(data):
    scenes, imgs = data
    ok = sum(A.matches(i, s) for i, s in zip(imgs, scenes))
    print(f"analyser clean: {ok}/{N}")
    assert ok / N >= 0.98


def test_noisy_blurred_accuracy(data):
    scenes, imgs = data
    rng = np.random.default_rng(7)
    ok = sum(A.matches(degrade(i, rng), s) for i, s in zip(imgs, scenes))
    print(f"analyser noise+blur: {ok}/{N}")
    assert ok / N >= 0.98


def test_detections_and_masks(data):
    scenes, imgs = data
    for s, img in list(zip(scenes, imgs))[:40]:
        found = A.detect(img)
        assert A.detect_background(img) == s.background
        gt = {o.position: m for o, m in zip(s.objects, w.render_masks(s))}
        for d in found:
            iou = (d.mask & gt[d.position]).sum() / (d.mask | gt[d.position]).sum()
            assert iou > 0.85
        for o in s.objects:
            assert A.object_ok(img, o)


def test_input_formats_and_negatives(data):
    scenes, imgs = data
    s, img = scenes[0], imgs[0]
    assert A.matches(img.astype(np.float32) / 255, s)
    assert A.matches(np.ascontiguousarray(img.transpose(2, 0, 1)), s)
    wrong = w.apply(s, w.sample_edit(s, np.random.default_rng(1), "colour"))
    assert not A.matches(img, wrong)
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert A.detect(blank) == [] and A.detect_background(blank) == "gray"


def test_components_counts():
    m = np.zeros((8, 8), bool)
    m[0, 0] = m[1, 1] = True  # diagonal neighbours: one 8-connected component
    m[5:7, 5:7] = True
    lab = A.components(m)
    assert lab.max() == 2 and lab[0, 0] == lab[1, 1] != lab[5, 5]


def test_screens_are_read_as_backgrounds():
    rng = np.random.default_rng(5)
    scenes = [w.sample_scene(rng, screens=1.0) for _ in range(100)]
    imgs = [w.render(s) for s in scenes]
    assert all(A.detect_background(i) == s.background for i, s in zip(imgs, scenes))
    clean = sum(A.matches(i, s) for i, s in zip(imgs, scenes))
    noisy = sum(A.matches(degrade(i, rng), s) for i, s in zip(imgs, scenes))
    assert clean >= 98 and noisy >= 98, (clean, noisy)
