"""The ``overpaint`` command line.

    overpaint tiny DIR [--arch sd15|sdxl]          write a tiny random-weight pipeline
    overpaint generate --model PATH_OR_ID --prompt TEXT -o out.png [--steps ...]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class UserError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def _positive(kind):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {s!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        return v

    return parse


def _output_path(path: str, n: int) -> list[Path]:
    out = Path(path)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"output {path!r} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    if out.parent and not out.parent.exists():
        raise UserError(f"output folder {str(out.parent)!r} does not exist; create it first")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")


def cmd_tiny(args) -> None:
    from .tiny import make_tiny

    folder = Path(args.folder)
    if folder.exists() and any(folder.iterdir()):
        raise UserError(f"{folder} exists and is not empty; choose a new folder")
    make_tiny(folder, args.arch, args.seed)
    print(f"wrote a tiny random-weight {args.arch} pipeline to {folder}")


def cmd_generate(args) -> None:
    import engine

    outputs = _output_path(args.output, args.num_images)
    _check_device(args.device)
    pipe = engine.load(args.model, device=args.device, dtype=args.dtype)
    images = pipe.generate(
        args.prompt, args.negative_prompt, steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, seed=args.seed, num_images=args.num_images,
        sampler=args.sampler, progress=not args.no_progress,
    )
    for img, path in zip(images, outputs):
        img.save(path)
        print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="overpaint", description="Edit real images with diffusion models.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the engine decides")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="write a tiny random-weight pipeline in diffusers format")
    t.add_argument("folder")
    t.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_tiny)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("--model", required=True, help="a diffusers pipeline folder or a hub id in the local cache")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("-o", "--output", required=True, help="output image path (.png, .jpg, ...)")
    g.add_argument("--steps", type=_positive(int), default=30)
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (<= 1 disables it)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--height", type=_positive(int), default=None)
    g.add_argument("--width", type=_positive(int), default=None)
    g.add_argument("--num-images", type=_positive(int), default=1)
    g.add_argument("--sampler", choices=("ddim", "ddpm", "euler", "dpmpp_2m", "dpmpp_2m_sde"), default=None,
                   help="default: the checkpoint's scheduler")
    g.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    g.add_argument("--device", default="cpu")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.set_defaults(func=cmd_generate)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        args.func(args)
    except (UserError, ValueError, FileNotFoundError) as e:
        if args.verbose:
            raise
        print(f"overpaint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
