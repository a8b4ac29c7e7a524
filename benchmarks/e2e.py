"""End-to-end benchmark: ours against diffusers on full-size architectures with random weights.

    python benchmarks/e2e.py                                   # all workloads, CUDA, bf16
    python benchmarks/e2e.py --workloads W1 --profile trace.json
    python benchmarks/e2e.py --device cpu --tiny               # CI smoke test (seconds)
    overpaint bench [same options]

Workloads (``--workloads``, comma separated):
  W1  SDXL 1024², 50-step generation with classifier-free guidance
  W2  SDXL-Turbo 512²: 1-step generation; a 4-step edit (4 DDIM inversion steps + 4
      Prompt-to-Prompt steps, source and edit rows in one batch); the ReNoise Turbo edit (its
      official inversion: 4 Euler ancestral steps, 9 renoising iterations, noise correction;
      then a reconstruction and the edit as one 4-step batch; with --graphs also captured)
  W3  SD1.5 512² Prompt-to-Prompt: 50-step DDIM inversion + 50-step edit; and a plain
      50-step generation with the same batch (the ratio is P2P's overhead)
  W4  SDXL 1024² LEDITS++, one concept, 50 steps, vs LEditsPPPipelineStableDiffusionXL
  W5  FLUX.1-dev 1024², 28 steps (embedded guidance 3.5), vs FluxPipeline
  W6  FLUX.1-dev 1024² RF-Inversion edit: 28 controlled inversion steps + 28 edit steps (vs the
      same transformer calls as a plain diffusers loop; the target is W6 <= 2 x W5)
Implementations (``--impls``): ours, ours-graphs (CUDA graphs), ours-compile (``--compile``),
diffusers (eager, SDPA, same dtype), diffusers-compile (its UNet under torch.compile), and for
the edits diffusers-loop: the same UNet evaluations as a plain diffusers loop (diffusers has no
Prompt-to-Prompt pipeline; this is the floor any implementation of it pays).

Reports the median latency of ``--repeats`` runs after warm-up, peak memory, model evaluations
(UNet rows) per second, MFU against the bf16 matmul peak measured here, and the VAE's share;
writes ``benchmarks/results/e2e-<device>.json`` and an SVG plot beside it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common, flux_bench  # noqa: E402
from benchmarks.edit import ledits_variants  # noqa: E402

SRC, TGT = "a photo of a cat sitting on a sofa", "a photo of a dog sitting on a sofa"
# workload -> (arch, size, steps, tiny size); steps are shortened to --steps in tiny mode
WORKLOADS = {
    "W1": ("sdxl", 1024, 50),
    "W2": ("sdxl-turbo", 512, 4),
    "W3": ("sd15", 512, 50),
    "W4": ("sdxl", 1024, 50),
    "W5": ("flux-dev", 1024, 28),
    "W6": ("flux-dev", 1024, 28),
}
GEN_IMPLS = ("ours", "ours-graphs", "ours-compile", "diffusers", "diffusers-compile")


def gen_variants(m: common.Models, impls, prompt, size: int, steps: int, scale: float, compiled: dict):
    """Text-to-image with each implementation (``compiled`` caches compiled pipelines)."""
    kw = dict(steps=steps, guidance_scale=scale, height=size, width=size, seed=0, output_type="pt", progress=False)
    out = []
    for impl in impls:
        if impl in ("ours", "ours-compile"):
            out.append((impl, lambda: m.ours.generate(prompt, **kw)))
        elif impl == "ours-graphs":
            out.append((impl, lambda: m.ours.generate(prompt, cuda_graphs=True, **kw)))
        elif impl in ("diffusers", "diffusers-compile"):
            pipe = m.theirs if impl == "diffusers" else compiled.setdefault(("theirs", m.arch), _compiled_theirs(m))
            out.append((impl, lambda pipe=pipe: pipe(prompt, num_inference_steps=steps, guidance_scale=scale, height=size,
                                                     width=size, generator=torch.Generator().manual_seed(0),
                                                     output_type="pt").images))
    return out


def _compiled_theirs(m: common.Models):
    """diffusers' pipeline with its UNet compiled (a new pipeline object over the same modules)."""
    from engine.runtime.fuse import set_inductor_cache

    set_inductor_cache()
    unet = m.theirs.unet
    unet_c = torch.compile(unet)
    pipe = type(m.theirs)(**{**m.theirs.components, "unet": unet_c})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def p2p_variants(m: common.Models, impls, size: int, steps: int, scale: float):
    """DDIM inversion + Prompt-to-Prompt edit (rows [src, edit], x2 with guidance)."""
    image = common.source_image(size)

    def ours():
        inv = m.ours.invert(image, SRC, method="ddim", steps=steps, progress=False)
        return m.ours.edit(inv, "p2p", TGT, guidance_scale=scale, output_type="pt", progress=False)

    out = [(i, ours) for i in impls if i in ("ours", "ours-compile")]
    if any(i.startswith("diffusers") for i in impls):
        out.append(("diffusers-loop", lambda: diffusers_invert_edit(m.theirs, image, steps, scale)))
    return out


@torch.no_grad()
def diffusers_invert_edit(pipe, image, steps: int, scale: float):
    """DDIM inversion then a [src, edit]-row regeneration with diffusers' UNet and schedulers,
    without attention control: the UNet work of Prompt-to-Prompt as plain diffusers."""
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    unet, vae, dev, dtype = pipe.unet, pipe.vae, pipe.unet.device, pipe.unet.dtype
    xl = hasattr(pipe, "text_encoder_2")
    cfg = scale > 1.0
    h, w = image.shape[-2:]
    if xl:
        pe, ne, pp, npool = pipe.encode_prompt([SRC, TGT], device=dev, do_classifier_free_guidance=True)
        ids = torch.tensor([[h, w, 0, 0, h, w]], device=dev, dtype=dtype)
        added = lambda emb, n: {"text_embeds": emb, "time_ids": ids.repeat(n, 1)}  # noqa: E731
    else:
        pe, ne = pipe.encode_prompt([SRC, TGT], dev, 1, True)
        pp = npool = None
        added = lambda emb, n: None  # noqa: E731
    z = vae.encode((image * 2 - 1).to(dev, vae.dtype)).latent_dist.mode() * vae.config.scaling_factor
    lat = z.to(dtype)  # [1, 4, h, w]
    inv = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inv.set_timesteps(steps, device=dev)
    for t in inv.timesteps:  # inversion under the source prompt, no guidance
        eps = unet(lat, t, encoder_hidden_states=pe[:1], added_cond_kwargs=added(pp[:1] if xl else None, 1)).sample
        lat = inv.step(eps, t, lat).prev_sample
    fwd = DDIMScheduler.from_config(pipe.scheduler.config)
    fwd.set_timesteps(steps, device=dev)
    x = torch.cat([lat, lat])  # [2, 4, h, w]: source, edit
    ctx = torch.cat([ne, pe]) if cfg else pe
    pooled = (torch.cat([npool, pp]) if cfg else pp) if xl else None
    for t in fwd.timesteps:
        inp = torch.cat([x, x]) if cfg else x
        out = unet(inp, t, encoder_hidden_states=ctx, added_cond_kwargs=added(pooled, len(inp))).sample
        if cfg:
            u, c = out.chunk(2)
            out = u + scale * (c - u)
        x = fwd.step(out, t, x).prev_sample
    return vae.decode((x[1:] / vae.config.scaling_factor).to(vae.dtype)).sample


def renoise_variants(m: common.Models, impls, size: int, steps: int):
    """ReNoise's Turbo path (Euler ancestral inversion with noise correction), then the
    reconstruction and the edit as one batch of rows per step (diffusers has no ReNoise)."""
    image = common.source_image(size)

    def ours(graphs=None):
        inv = m.ours.invert(image, SRC, method="renoise", steps=steps, progress=False, cuda_graphs=graphs)
        reqs = [dict(inv=inv, method="renoise"), dict(inv=inv, method="renoise", target_prompt=TGT)]
        return m.ours.edit_many(reqs, output_type="pt", cuda_graphs=graphs)[1]

    out = [(i, ours) for i in impls if i in ("ours", "ours-compile")]
    return out + [("ours-graphs", lambda: ours(True))] if "ours-graphs" in impls else out


def variants(name: str, m: common.Models, impls, size: int, steps: int, compiled: dict):
    """[(workload label, impl, run-once function)] of workload ``name``."""
    if name == "W1":
        return [(f"W1-sdxl{size}-gen{steps}-cfg", i, f) for i, f in gen_variants(m, impls, SRC, size, steps, 5.0, compiled)]
    if name == "W2":
        gen = [(f"W2-turbo{size}-gen1", i, f) for i, f in gen_variants(m, impls, SRC, size, 1, 0.0, compiled)]
        edit = [(f"W2-turbo{size}-edit{steps}+{steps}", i, f) for i, f in p2p_variants(m, impls, size, steps, 1.0)]
        renoise = [(f"W2-turbo{size}-renoise{steps}+{steps}", i, f) for i, f in renoise_variants(m, impls, size, steps)]
        return gen + edit + renoise
    if name == "W3":
        gen_impls = [i for i in impls if i in ("ours", "ours-graphs", "diffusers")]
        gen = [(f"W3-sd15{size}-gen{steps}-batch2", i, f)
               for i, f in gen_variants(m, gen_impls, [SRC, TGT], size, steps, 7.5, compiled)]
        return [(f"W3-sd15{size}-p2p{steps}+{steps}", i, f) for i, f in p2p_variants(m, impls, size, steps, 7.5)] + gen
    if name == "W4":
        both = dict(ledits_variants(m, size, steps))
        both["ours-compile"] = both["ours"]
        return [(f"W4-sdxl{size}-ledits{steps}", i, both[i]) for i in impls if i in both]
    if name == "W5":
        return [(f"W5-flux{size}-gen{steps}", i, f) for i, f in flux_bench.gen_variants(m, impls, SRC, size, steps)]
    if name == "W6":
        return [(f"W6-flux{size}-rf{steps}+{steps}", i, f)
                for i, f in flux_bench.rf_variants(m, impls, SRC, TGT, size, steps)]
    raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")


# ---- FLOPs and MFU ----------------------------------------------------------------------------


def flops_per_row(m: common.Models, size: int) -> dict:
    """FLOPs of one UNet row (diffusers' UNet, batch 1: FLOPs are linear in the batch) and of
    one VAE decode / encode at ``size``². Text encoders are left out (<1% of a step)."""
    dev, dtype, f = m.ours.device, m.dtype, m.ours.vae_scale_factor
    h = size // f
    unet, vae = m.theirs.unet, m.theirs.vae
    ctx_dim = unet.config.cross_attention_dim
    x = torch.zeros(1, 4, h, h, device=dev, dtype=dtype)
    ctx = torch.zeros(1, 77, ctx_dim, device=dev, dtype=dtype)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(1, pooled, device=dev, dtype=dtype),
                 "time_ids": torch.zeros(1, 6, device=dev, dtype=dtype)}
    t = torch.tensor([500], device=dev)
    row = common.count_flops(lambda: unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added))
    z = torch.zeros(1, 4, h, h, device=dev, dtype=vae.dtype)
    img = torch.zeros(1, 3, size, size, device=dev, dtype=vae.dtype)
    return dict(unet_row=row, vae_decode=common.count_flops(lambda: vae.decode(z)),
                vae_encode=common.count_flops(lambda: vae.encode(img)))


def add_mfu(r: dict, fl: dict, peak_tflops: float) -> None:
    """Model FLOPs of the run: UNet rows and VAE decode / encode rows times their FLOPs."""
    if not r.get("unet_rows"):
        return
    total = (r["unet_rows"] * fl["unet_row"] + r["vae_decode_rows"] * fl["vae_decode"]
             + r["vae_encode_rows"] * fl["vae_encode"])
    r["model_tflop"] = total / 1e12
    r["mfu"] = total / r["median_s"] / (peak_tflops * 1e12)


# ---- main -------------------------------------------------------------------------------------


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="overpaint bench", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=tuple(common.DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny random models, 2 steps, 1 repeat (CI smoke test)")
    ap.add_argument("--workloads", default="W1,W2,W3,W4,W5,W6")
    ap.add_argument("--impls", default=None,
                    help="comma separated; default CUDA: ours,ours-graphs,diffusers,diffusers-compile; CPU: ours,diffusers")
    ap.add_argument("--compile", action="store_true", help="add ours-compile (torch.compile of our UNet)")
    ap.add_argument("--channels-last", action="store_true", help="our UNet in channels-last memory format")
    ap.add_argument("--steps", type=int, default=None, help="override every workload's step count (tiny: 2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per variant, default 10 (tiny: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed runs first, default 2 (tiny: 0)")
    ap.add_argument("--profile", default=None, metavar="TRACE.json",
                    help="write a torch.profiler Chrome trace of ours per workload and print the top kernels")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/e2e-<device>.json)")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def profile(fn, path: Path, device: str, top: int = 15) -> None:
    """One run under torch.profiler: a Chrome trace, and the top kernels by self time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=acts) as prof:
        fn()
        common.sync(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top))
    print(f"wrote trace {path}")


def main(argv=None) -> int:
    from engine.runtime import fuse

    args = parse(argv)
    dev = args.device
    cuda = dev.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("--device cuda asked but CUDA is not available; use --device cpu [--tiny]")
        return 2
    dtype = common.DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    impls = (args.impls.split(",") if args.impls else
             ["ours", "ours-graphs", "diffusers", "diffusers-compile"] if cuda else ["ours", "diffusers"])
    if args.compile and "ours-compile" not in impls:
        impls.append("ours-compile")
    impls = [i for i in impls if i != "ours-compile"] + [i for i in impls if i == "ours-compile"]  # compile last
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not names or set(names) - set(WORKLOADS):
        print(f"unknown workloads {sorted(set(names) - set(WORKLOADS))}; choose from {sorted(WORKLOADS)}")
        return 2
    repeats = args.repeats or (1 if args.tiny else 10)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 2)
    peak = common.matmul_peak(dev, args.tiny)
    print(f"measured matmul peak: {peak['tflops']:.1f} TFLOP/s ({peak['dtype']}, n={peak['n']})")
    results, models, compiled = [], {}, {}
    for k, name in enumerate(names):
        arch, size, steps = WORKLOADS[name]
        size, steps = (64 if args.tiny else size), (args.steps or (2 if args.tiny else steps))
        if arch not in models:
            models.clear()  # one architecture resident at a time
            compiled.clear()
            if cuda:
                torch.cuda.empty_cache()
            flux = arch.startswith("flux")
            models[arch] = (flux_bench.build if flux else common.build)(*(() if flux else (arch,)), dev, dtype,
                                                                         tiny=args.tiny)
            if args.channels_last and not flux:
                fuse.channels_last(models[arch].ours)
        m = models[arch]
        fl = (flux_bench.flops_per_row if arch.startswith("flux") else flops_per_row)(m, size)
        for label, impl, fn in variants(name, m, impls, size, steps, compiled):
            if impl == "ours-compile":
                fuse.compile_unet(m.ours)
            try:
                r = common.measure(fn, m, impl, dev, repeats, warmup, count=not impl.endswith("compile"))
            except Exception as e:  # e.g. a compile failure: record it and go on
                results.append(dict(workload=label, impl=impl, error=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            finally:
                if impl == "ours-compile":
                    fuse.uncompile(m.ours)
                if impl == "ours-graphs":  # free the graphs' memory pool before the next variant
                    m.ours.graphs.clear()
                    if cuda:
                        torch.cuda.empty_cache()
            if impl.endswith("compile"):  # the counters would break the graph: take the eager twin's
                twin = next((x for x in results if x["workload"] == label and x.get("unet_rows")
                             and x["impl"].split("-")[0] == impl.split("-")[0]), {})
                r.update({key: twin.get(key) for key in ("unet_calls", "unet_rows", "vae_encode_rows", "vae_decode_rows")})
                r["evals_per_s"] = r["unet_rows"] / r["median_s"] if r.get("unet_rows") else None
                r["compile_s"] = r["first_call_s"] - r["median_s"]
            add_mfu(r, fl, peak["tflops"])
            results.append(dict(workload=label, impl=impl, arch=arch, size=size, steps=steps, **r))
            print(f"  {label} {impl}: {r['median_s'] * 1e3:.1f} ms")
        if args.profile:
            ours = next(((lb, f) for lb, i, f in variants(name, m, ["ours"], size, steps, compiled)), None)
            if ours:
                path = Path(args.profile)
                if len(names) > 1:
                    path = path.with_name(f"{path.stem}-{name}{path.suffix}")
                profile(ours[1], path, dev)
    _ratios(results)
    common.print_table(results)
    settings = dict(dtype=str(dtype), workloads=names, impls=impls, repeats=repeats, warmup=warmup, tiny=args.tiny,
                    steps_override=args.steps, channels_last=args.channels_last, matmul_peak=peak,
                    timer="perf_counter around synchronised runs; median of the timed runs",
                    flops="torch.utils.flop_counter on diffusers' UNet (batch 1) and VAE, times rows evaluated")
    name = common.slug(common.device_name(dev))
    out = Path(args.out) if args.out else common.ROOT / "benchmarks" / "results" / f"e2e-{name}.json"
    print(f"wrote {common.write_json(out, common.meta(dev, settings), results)}")
    if not args.no_plot:
        print(f"wrote {common.write_svg(out.with_suffix('.svg'), results, f'e2e latency, {common.device_name(dev)}')}")
    return 0


def _ratios(results: list[dict]) -> None:
    """W3: P2P edit time over the plain generation with the same batch; speedups over diffusers."""
    by = {(r["workload"], r["impl"]): r for r in results if r.get("median_s")}
    for (label, impl), r in by.items():
        base = by.get((label, "diffusers")) or by.get((label, "diffusers-loop"))
        if base and impl.startswith("ours"):
            r["speedup_vs_diffusers"] = base["median_s"] / r["median_s"]
        if "-p2p" in label and impl == "ours":
            gen = next((g for (lb, i), g in by.items() if i == "ours" and lb.startswith(label.split("-p2p")[0])
                        and "-gen" in lb), None)
            if gen:
                r["ratio_vs_generation_same_batch"] = r["median_s"] / gen["median_s"]


if __name__ == "__main__":
    sys.exit(main())
