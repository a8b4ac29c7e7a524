"""Benchmark LEDITS++ editing: ours against diffusers' ``LEditsPPPipelineStableDiffusionXL``.

    python benchmarks/edit.py [--device cuda] [--dtype bf16] [--steps 50] [--size 1024] [--repeats 10]
    python benchmarks/edit.py --device cpu --tiny          # smoke test (seconds)

SDXL at 1024², 50 inversion steps (skip 0.15, as diffusers' default) and one edit concept,
on the full-size SDXL architecture with random weights shared by both sides (see
`benchmarks/common.py`). Times inversion + edit together (median of ``--repeats`` after
warm-up) and reports peak memory; writes ``benchmarks/results/edit-<device>.json``.
`e2e.py` runs the same workload as W4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

CONCEPT = "a red hat"
SKIP = 0.15
EDIT_SCALE = 5.0


def ledits_variants(m: common.Models, size: int, steps: int) -> list[tuple[str, object]]:
    """(impl, run-once function) for ours and diffusers on one image of ``size``²."""
    from diffusers import DPMSolverMultistepScheduler, LEditsPPPipelineStableDiffusionXL, LEditsPPPipelineStableDiffusion

    image = common.source_image(size)
    ours = m.ours

    def run_ours():
        inv = ours.invert(image, "", method="ledits++", steps=steps, skip=SKIP, seed=0, progress=False)
        return ours.edit(inv, "ledits++", editing_prompt=[CONCEPT], edit_guidance_scale=EDIT_SCALE,
                         output_type="pt", progress=False)

    t = m.theirs
    sched = DPMSolverMultistepScheduler.from_config(t.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2)
    if m.arch == "sd15":
        ref = LEditsPPPipelineStableDiffusion(vae=t.vae, text_encoder=t.text_encoder, tokenizer=t.tokenizer, unet=t.unet,
                                              scheduler=sched, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    else:
        ref = LEditsPPPipelineStableDiffusionXL(vae=t.vae, text_encoder=t.text_encoder, text_encoder_2=t.text_encoder_2,
                                                tokenizer=t.tokenizer, tokenizer_2=t.tokenizer_2, unet=t.unet,
                                                scheduler=sched, add_watermarker=False)
    ref.set_progress_bar_config(disable=True)

    def run_diffusers():
        ref.invert(image=image, source_prompt="", num_inversion_steps=steps, skip=SKIP,
                   generator=torch.Generator().manual_seed(0))
        return ref(editing_prompt=[CONCEPT], edit_guidance_scale=EDIT_SCALE, output_type="pt").images

    return [("ours", run_ours), ("diffusers", run_diffusers)]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny random models, 2 steps, 1 repeat (CI smoke test)")
    ap.add_argument("--steps", type=int, default=None, help="default 50 (tiny: 2)")
    ap.add_argument("--size", type=int, default=None, help="image side, default 1024 (tiny: 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs, default 10 (tiny: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first, default 2 (tiny: 0)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/edit-<device>.json)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    dtype = common.DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    steps = args.steps or (2 if args.tiny else 50)
    size = args.size or (64 if args.tiny else 1024)
    repeats = args.repeats or (1 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    m = common.build("sdxl", args.device, dtype, tiny=args.tiny)
    results = []
    for impl, fn in ledits_variants(m, size, steps):
        r = common.measure(fn, m, impl, args.device, repeats, warmup)
        results.append(dict(workload=f"sdxl-{size}-ledits{steps}", impl=impl, **r))
    common.print_table(results)
    settings = dict(dtype=str(dtype), steps=steps, size=size, skip=SKIP, concepts=1, edit_guidance_scale=EDIT_SCALE,
                    repeats=repeats, warmup=warmup, tiny=args.tiny, timer="perf_counter around synchronised runs",
                    unet_params=m.info["unet_params"])
    name = common.slug(common.device_name(args.device))
    out = Path(args.out) if args.out else common.ROOT / "benchmarks" / "results" / f"edit-{name}.json"
    print(f"wrote {common.write_json(out, common.meta(args.device, settings), results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
