"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> Path:
    """A tiny random SD1.5-shaped diffusers pipeline folder, built once per session."""
    from engine.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "sd15", arch="sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL-shaped diffusers pipeline folder, built once per session."""
    from engine.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "sdxl", arch="sdxl")


@pytest.fixture(scope="session")
def tiny_turbo_dir(tmp_path_factory) -> Path:
    """A tiny random SDXL-Turbo-shaped pipeline folder (SDXL with Euler ancestral, trailing spacing)."""
    from engine.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "turbo", arch="sdxl-turbo")


@pytest.fixture(scope="session")
def sd15_pipe(tiny_sd15_dir):
    """The tiny SD1.5 pipeline loaded through ``engine.load``; shared, so tests must not change it."""
    import engine

    return engine.load(tiny_sd15_dir)


@pytest.fixture(scope="session")
def sdxl_pipe(tiny_sdxl_dir):
    """The tiny SDXL pipeline loaded through ``engine.load``; shared, so tests must not change it."""
    import engine

    return engine.load(tiny_sdxl_dir)


@pytest.fixture(scope="session")
def image():
    """A smooth random 64x64 RGB image [1, 3, 64, 64] in [0, 1]."""
    import torch

    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(64, 64), mode="bilinear", align_corners=False)


@pytest.fixture(scope="session")
def png_header():
    """png_header(width, height): a PNG that claims that size but holds no pixels (a size check
    reads only the header, so decompression bombs cost nothing to make)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def make(width: int, height: int) -> bytes:
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")

    return make


@pytest.fixture(scope="session", params=["flux-dev", "flux-schnell"])
def tiny_flux_dir(request, tmp_path_factory) -> Path:
    """Tiny random FLUX.1-dev- and -schnell-shaped pipeline folders (the fixture runs once for each)."""
    from engine.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / request.param, arch=request.param)


@pytest.fixture(scope="session")
def flux_pipe(tiny_flux_dir):
    """The tiny FLUX pipeline loaded through ``engine.load``; shared, so tests must not change it."""
    import engine

    return engine.load(tiny_flux_dir)
