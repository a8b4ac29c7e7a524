"""Conversions between image tensors in [0, 1] and what users hand in or get back.

Intake (:func:`load_image`) is right for every mode PIL reads: 8-, 16-bit and float images
scaled to [0, 1], alpha composited over a background (white by default, with a notice),
palette / CMYK / grayscale converted, the first frame of an animation, EXIF orientation
applied, and the pixel limit checked before anything is decoded. :func:`fit_size` picks the
size a model should process an image at (:func:`resize` does it).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch

OUTPUT_TYPES = ("pil", "np", "pt")
MAX_PIXELS = 4096 * 4096  # refuse decompression bombs before decoding
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}

log = logging.getLogger("overpaint")


def to_output(images: torch.Tensor, output_type: str = "pil"):
    """images [B, 3, H, W] in [0, 1] -> list of PIL images, an array [B, H, W, 3], or the tensor."""
    if output_type == "pt":
        return images
    arr = images.detach().float().permute(0, 2, 3, 1).cpu().numpy()  # [B, H, W, 3]
    if output_type == "np":
        return arr
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
    raise ValueError(f"unknown output_type {output_type!r}; use one of {OUTPUT_TYPES}")


def parse_background(background) -> tuple[float, float, float]:
    """"white" | "black" | "gray" | "#rrggbb" | (r, g, b) in 0..255 -> RGB in [0, 1]."""
    rgb = background
    if isinstance(background, str):
        s = background.strip().lower()
        if s in BACKGROUNDS:
            rgb = BACKGROUNDS[s]
        elif len(s) == 7 and s[0] == "#":
            try:
                rgb = tuple(int(s[i:i + 2], 16) for i in (1, 3, 5))
            except ValueError:
                rgb = None
        else:
            rgb = None
    ok = (isinstance(rgb, (tuple, list)) and len(rgb) == 3
          and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb))
    if not ok:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)}, '#rrggbb' or (r, g, b) in 0..255, "
                         f"got {background!r}")
    return tuple(c / 255.0 for c in rgb)


class ImageTooLarge(ValueError):
    """An image over the pixel limit (found from its header, before decoding)."""


def _open(source, max_pixels: int, name: str):
    """Open (not decode) an image file or bytes, refusing oversized ones before their pixels are read."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Path) and not source.is_file():
        raise FileNotFoundError(f"image {name} does not exist")
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ValueError(f"image {name} is empty")
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            im = Image.open(source)
    except Image.DecompressionBombError:  # PIL's own hard limit, far above ours
        raise ImageTooLarge(f"image {name} is over the {max_pixels} pixel limit; downscale it first") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {name}: {e}") from None
    if im.width * im.height > max_pixels:
        im.close()
        raise ImageTooLarge(f"image {name} is {im.width}x{im.height}, over the {max_pixels} pixel limit; "
                            f"downscale it first")
    return im


def _composite(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    """rgb [H, W, 3], alpha [H, W] in [0, 1] -> rgb over the background colour."""
    if alpha.min() < 1.0:
        bg = parse_background(background)
        log.warning("the image has transparent pixels: composited over %s (choose with background=)",
                    background if isinstance(background, str) else tuple(background))
        rgb = rgb * alpha[..., None] + np.asarray(bg, np.float32) * (1 - alpha[..., None])
    return rgb


def _pil_to_array(im, background) -> np.ndarray:
    """A PIL image of any mode -> float32 [H, W, 3] in [0, 1]."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im) if im.getexif() else im
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":  # 16-bit grayscale (PIL keeps it as integers)
        gray = np.asarray(im).astype(np.float32) / 65535.0
        if gray.max() > 1.0:
            log.warning("the image has values above 16 bits (mode %s): clipped", mode)
        return np.repeat(gray.clip(0, 1)[..., None], 3, axis=-1)
    if mode == "F":  # floats: [0, 1] if they fit, else the 0..255 range
        gray = np.asarray(im).astype(np.float32)
        if not np.isfinite(gray).all():
            raise ValueError("the image holds NaN or infinite values")
        if gray.max() > 1.0:
            gray = gray / 255.0
        return np.repeat(gray.clip(0, 1)[..., None], 3, axis=-1)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = np.asarray(im.convert("RGBA")).astype(np.float32) / 255.0  # [H, W, 4]
        return _composite(rgba[..., :3], rgba[..., 3], background)
    return np.asarray(im.convert("RGB")).astype(np.float32) / 255.0


def _array_to_float(a: np.ndarray, background) -> np.ndarray:
    """[H, W], [H, W, 1|3|4] of uint8, uint16, bool or float in [0, 1] -> float32 [H, W, 3]."""
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    if a.dtype == np.uint8:
        f = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        f = a.astype(np.float32) / 65535.0
    elif a.dtype == np.bool_:
        f = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)
        if not np.isfinite(f).all() or f.min() < 0 or f.max() > 1:
            raise ValueError("a float image array must hold finite values in [0, 1]")
    else:
        raise ValueError(f"image array dtype {a.dtype} is not supported; use uint8, uint16 or float in [0, 1]")
    if f.shape[-1] == 4:
        return _composite(f[..., :3], f[..., 3], background)
    return np.repeat(f, 3, axis=-1) if f.shape[-1] == 1 else f


def load_image(image, max_pixels: int = MAX_PIXELS, background="white") -> torch.Tensor:
    """A path, encoded bytes, PIL image, array [H, W(, 1|3|4)] (uint8, uint16, or float in [0, 1]) or float
    tensor [3, H, W] / [B, 3, H, W] in [0, 1] -> float32 tensor [B, 3, H, W] in [0, 1].

    Transparent pixels are composited over ``background`` ("white", "black", "#rrggbb" or
    (r, g, b)). Never modifies what it is given."""
    from PIL import Image

    if isinstance(image, (str, Path, bytes, bytearray)):
        name = "data" if isinstance(image, (bytes, bytearray)) else repr(str(image))
        with _open(image if isinstance(image, (bytes, bytearray)) else Path(image), max_pixels, name) as im:
            try:
                arr = _pil_to_array(im, background)
            except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data found while decoding
                raise ValueError(f"cannot read image {name}: {e}") from None
        image = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    elif isinstance(image, Image.Image):
        if image.width * image.height > max_pixels:
            raise ValueError(f"image is {image.width}x{image.height}, over the {max_pixels} pixel limit; downscale it first")
        image = torch.from_numpy(np.ascontiguousarray(_pil_to_array(image, background))).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(_array_to_float(image, background))).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a path, PIL image, array or tensor, got {type(image).__name__}")
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"image tensor must be [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    if not torch.is_floating_point(x) or not torch.isfinite(x).all():
        raise ValueError("an image tensor must hold finite floats in [0, 1]")
    lo, hi = (v.item() for v in torch.aminmax(x))
    if lo < -1e-3 or hi > 1 + 1e-3:  # [-1, 1] (diffusers' VAE range) or 0..255 would be read as garbage
        raise ValueError(f"an image tensor must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}]; "
                         f"map [-1, 1] with (x + 1) / 2 and 0..255 with x / 255")
    return x.float().clamp(0, 1)  # [B, 3, H, W], a copy


def fit_size(height: int, width: int, native: int, multiple: int, tolerance: float = 2.0) -> tuple[int, int] | None:
    """The size to process a height x width image at on a model made for native x native
    images whose sides must be multiples of ``multiple``: None when the image is within
    ``tolerance`` x of the native pixel count and already takes the model's sides, else the
    aspect-kept size with the native pixel count, sides rounded to ``multiple``."""
    ratio = height * width / native ** 2
    if 1 / tolerance <= ratio <= tolerance and height % multiple == 0 and width % multiple == 0:
        return None
    scale = math.sqrt(native ** 2 / (height * width)) if not 1 / tolerance <= ratio <= tolerance else 1.0
    h = max(multiple, round(height * scale / multiple) * multiple)
    w = max(multiple, round(width * scale / multiple) * multiple)
    return h, w


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, 3, height, width]: bicubic, antialiased when shrinking."""
    if tuple(images.shape[-2:]) == (height, width):
        return images
    shrink = height < images.shape[-2] or width < images.shape[-1]
    out = torch.nn.functional.interpolate(images.float(), size=(height, width), mode="bicubic",
                                          align_corners=False, antialias=shrink)
    return out.clamp(0, 1)


def save_atomic(path, write) -> Path:
    """Write a file through ``write(tmp_path)`` into a temporary file beside ``path``, then rename
    it over ``path``: a failed or interrupted write leaves nothing half-written, and a path that
    is a link to another file gets a new file instead of overwriting the linked one."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_image(image, path) -> Path:
    """Save a PIL image atomically (see :func:`save_atomic`); the format follows the suffix."""
    from PIL import Image

    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"cannot tell an image format from {str(path)!r}; end it in .png, .jpg or .webp")
    return save_atomic(path, lambda tmp: image.save(tmp, format=fmt))
