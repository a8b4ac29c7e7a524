import pytest
import torch


@pytest.fixture(scope="package")
def image():
    """A smooth random 64x64 RGB image [1, 3, 64, 64] in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)
