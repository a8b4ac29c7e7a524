"""The ``overpaint`` command line.

    overpaint tiny DIR [--arch sd15|sdxl]          write a tiny random-weight pipeline
    overpaint generate [--model PATH_OR_ID] --prompt TEXT -o out.png [--steps ...]   (default model: shapes)
    overpaint demo -o DIR                           edit a bundled example scene with the shapes model
    overpaint bench [e2e|edit] [--device cpu --tiny ...]  benchmark against diffusers
    overpaint edit IMAGE [--model PATH_OR_ID] --method p2p|ledits++|ddim|ddpm \
        --source-prompt TEXT --target-prompt TEXT -o out.png [--edit-prompt ... --edit-scale ... --reverse]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

MODEL_HELP = "a diffusers pipeline folder, a hub id in the local cache, or 'shapes' (bundled; the default)"
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


# Each edit method and the inversion it edits.
EDIT_METHODS = {"p2p": "ddim", "ledits++": "ledits++", "ddim": "ddim", "ddpm": "ddpm"}


def _edit_params(args) -> tuple[dict, dict]:
    """(inversion params, edit params) for the chosen method from the CLI flags."""
    inv = {"steps": args.steps, "seed": args.seed, "progress": not args.no_progress}
    if args.source_guidance is not None:
        inv["guidance_scale"] = args.source_guidance
    if args.skip is not None:
        if args.method not in ("ddpm", "ledits++"):
            raise UserError(f"--skip applies to the ddpm and ledits++ methods, not {args.method}")
        inv["skip"] = args.skip
    edit = {"progress": not args.no_progress}
    if args.method == "ledits++":
        if not args.edit_prompt:
            raise UserError("--method ledits++ needs at least one --edit-prompt (a concept to add, or to remove with --reverse)")
        n = len(args.edit_prompt)
        edit["editing_prompt"] = args.edit_prompt
        edit["edit_guidance_scale"] = _per_concept(args.edit_scale, n, "--edit-scale", 5.0)
        edit["reverse_editing_direction"] = _per_concept(args.reverse, n, "--reverse", False)
        return inv, edit
    if args.edit_prompt or args.edit_scale or args.reverse:
        raise UserError("--edit-prompt, --edit-scale and --reverse apply to --method ledits++ only")
    if args.target_prompt is None:
        raise UserError(f"--method {args.method} needs --target-prompt (the caption of the edited image)")
    if args.guidance is not None:
        edit["guidance_scale"] = args.guidance
    if args.method == "p2p":
        edit["cross_replace_steps"] = args.cross_replace
        edit["self_replace_steps"] = args.self_replace
        if args.edit_type:
            edit["edit_type"] = args.edit_type
    elif args.edit_type:
        raise UserError("--edit-type applies to --method p2p only")
    return inv, edit


def _per_concept(values, n: int, flag: str, default):
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"{flag} was given {len(values)} times for {n} --edit-prompt concepts; give it once or once per concept")
    return values


def cmd_edit(args) -> None:
    import engine
    from .editing import Inversion
    from .images import load_image

    image = Path(args.image)
    (out,) = _output_path(args.output, 1)
    if out.resolve() == image.resolve():
        raise UserError(f"output {out} is the input image; choose another path so the input is kept")
    inv_params, edit_params = _edit_params(args)
    load_image(image)  # fail on a missing or unreadable image before loading a model
    _check_device(args.device)
    pipe = engine.load(args.model, device=args.device, dtype=args.dtype)
    if args.inversion and Path(args.inversion).exists():
        inv = Inversion.load(args.inversion, device=args.device)
        print(f"loaded inversion {args.inversion}")
    else:
        inv = pipe.invert(image, args.source_prompt, method=EDIT_METHODS[args.method],
                          height=args.height, width=args.width, **inv_params)
        if args.inversion:
            inv.save(args.inversion)
            print(f"saved inversion to {args.inversion}")
    target = None if args.method == "ledits++" else args.target_prompt
    edited = pipe.edit(inv, args.method, target, **edit_params)[0]
    edited.save(out)
    print(f"wrote {out}")


def cmd_demo(args) -> None:
    from .shapes.demo import run

    res = run(args.output, model=args.model)
    print(f"{res['method']}: {res['source_prompt']!r} -> {res['target_prompt']!r} in {res['seconds']} s")
    for name, path in res["paths"].items():
        print(f"wrote {path}" + (f"  (reads: {res['seen'][name]})" if name in res["seen"] else ""))


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
    g.add_argument("--model", default="shapes", help=MODEL_HELP)
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

    e = sub.add_parser("edit", help="edit a real image with a sentence")
    e.add_argument("image", help="the image to edit (.png, .jpg, ...)")
    e.add_argument("--model", default="shapes", help=MODEL_HELP)
    e.add_argument("--method", choices=tuple(EDIT_METHODS), default="p2p")
    e.add_argument("--source-prompt", default="", help="a caption of the input image")
    e.add_argument("--target-prompt", default=None, help="the caption of the edited image (p2p, ddim, ddpm)")
    e.add_argument("--edit-prompt", action="append", default=[], help="ledits++: a concept to add (repeatable)")
    e.add_argument("--edit-scale", action="append", type=float, default=[], help="ledits++: guidance per concept")
    e.add_argument("--reverse", action="append", type=lambda s: s.lower() in ("1", "true", "yes"), default=[],
                   help="ledits++: remove the concept instead (true/false per concept)")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--steps", type=_positive(int), default=50)
    e.add_argument("--guidance", type=float, default=None, help="guidance of the edit (default: the method's)")
    e.add_argument("--source-guidance", type=float, default=None, help="guidance of the inversion")
    e.add_argument("--skip", type=float, default=None, help="ddpm/ledits++: fraction of noisy steps skipped")
    e.add_argument("--cross-replace", type=float, default=0.8, help="p2p: fraction of steps with cross-attention replaced")
    e.add_argument("--self-replace", type=float, default=0.4, help="p2p: fraction of steps with self-attention replaced")
    e.add_argument("--edit-type", choices=("replace", "refine"), default=None,
                   help="p2p: word swap (same token count) or refinement (default: inferred from the prompts)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--height", type=_positive(int), default=None, help="resize the image first")
    e.add_argument("--width", type=_positive(int), default=None, help="resize the image first")
    e.add_argument("--inversion", default=None, help="load the inversion from this file if it exists, else save it there")
    e.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    e.set_defaults(func=cmd_edit)

    d = sub.add_parser("demo", help="edit a bundled example scene (red circle -> blue circle)")
    d.add_argument("-o", "--output", required=True, help="folder for input/reconstruction/edited/side_by_side.png")
    d.add_argument("--model", default="shapes", help="default: the bundled shapes model")
    d.set_defaults(func=cmd_demo)

    # Listed for --help only: main() hands everything after "bench" to the benchmark's own parser.
    sub.add_parser("bench", help="benchmarks: overpaint bench [e2e|edit|step] [--device cpu --tiny ...] (e2e and edit: "
                                 "vs diffusers; step: edit_many batching vs one at a time)", add_help=False)
    return p


def cmd_bench(argv: list[str]) -> int:
    """``overpaint bench [e2e|edit|step] ARGS``: benchmarks/e2e.py (default), edit.py or step.py
    of a source checkout, with ARGS passed through."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "e2e.py").is_file():
        print("overpaint: error: bench needs a source checkout (benchmarks/ is not installed)", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = argv[0] if argv[:1] in (["e2e"], ["edit"], ["step"]) else "e2e"
    rest = argv[1:] if argv[:1] == [suite] else argv
    return importlib.import_module(f"benchmarks.{suite}").main(rest)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
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
