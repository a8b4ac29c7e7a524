"""PSNR / SSIM / masked PSNR sanity."""

import numpy as np

from engine.shapes import metrics as M
from engine.shapes import world as w


def test_identical_images():
    img = w.render(w.sample_scene(np.random.default_rng(0)))
    assert M.psnr(img, img) == M.PSNR_CAP
    assert abs(M.ssim(img, img) - 1.0) < 1e-9


def test_known_values_and_ordering():
    a = np.zeros((64, 64, 3), np.float64)
    b = a + 0.1  # MSE 0.01 -> 20 dB
    assert abs(M.psnr(a, b) - 20.0) < 1e-9
    img = w.render(w.sample_scene(np.random.default_rng(1)))
    rng = np.random.default_rng(0)
    small = np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    big = np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)
    assert M.psnr(img, small) > M.psnr(img, big)
    assert 1.0 > M.ssim(img, small) > M.ssim(img, big) > 0.0
    assert abs(M.ssim(img, small) - M.ssim(small, img)) < 1e-12


def test_masked_psnr_ignores_the_edit_region():
    s = w.sample_scene(np.random.default_rng(3))
    e = w.sample_edit(s, np.random.default_rng(4), "colour")
    src, tgt = w.render(s), w.render(w.apply(s, e))
    mask = w.footprint(s.objects[e.index])
    assert M.masked_psnr(src, tgt, mask) == M.PSNR_CAP
    assert M.psnr(src, tgt) < 40
    assert M.masked_psnr(src, tgt, np.ones((64, 64), bool)) == M.PSNR_CAP
