"""Classifier-free guidance with per-row scales."""

import torch

from engine.step import cfg_combine


def test_per_row_scales_equal_each_row_guided_alone():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 4, 8, 8, generator=g)  # [uncond x 3, cond x 3]
    scales = [3.5, 15.0, 7.5]
    got = cfg_combine(out, torch.tensor(scales))
    for r, s in enumerate(scales):
        want = cfg_combine(out[[r, r + 3]], s)
        torch.testing.assert_close(got[r:r + 1], want, atol=0, rtol=0)


def test_tensor_scale_equals_float_scale_with_rescale():
    out = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want = cfg_combine(out, 6.0, 0.3)
    torch.testing.assert_close(cfg_combine(out, torch.tensor([6.0, 6.0]), 0.3), want, atol=0, rtol=0)
    torch.testing.assert_close(cfg_combine(out, torch.tensor(6.0)), cfg_combine(out, 6.0), atol=0, rtol=0)
