"""Benchmark kernels.attention against torch SDPA (flash, cuDNN) and xformers on a CUDA GPU.

    python benchmarks/attention.py [--dtypes fp16,bf16] [--shapes sdxl] [--rep 100] [--no-autotune]

For the SD1.5 / SDXL / FLUX attention shapes it times our Triton kernel plain, with
row injection, with the attention-map store (cross-attention, Nk <= 256) and with an
IP-Adapter branch, and the baselines that exist for each.  FLOPs count the two matmuls
(4·B·H·Nq·Nk·D, plus 4·B·H·Nq·Nip·D for IP).  Results go to
benchmarks/results/attention-<device>.json together with device, date, git commit,
versions and settings; a short table is printed.  Needs CUDA: exits with a message otherwise.
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

# name, B, H, Nq, Nk, D  (B=2: classifier-free guidance batch)
SHAPES = [
    ("sd15-self-64x64", 2, 8, 4096, 4096, 40),
    ("sd15-cross-64x64", 2, 8, 4096, 77, 40),
    ("sd15-self-32x32", 2, 8, 1024, 1024, 80),
    ("sd15-cross-32x32", 2, 8, 1024, 77, 80),
    ("sd15-self-16x16", 2, 8, 256, 256, 160),
    ("sdxl-self-h10-4096", 2, 10, 4096, 4096, 64),
    ("sdxl-self-h10-1024", 2, 10, 1024, 1024, 64),
    ("sdxl-self-h20-4096", 2, 20, 4096, 4096, 64),
    ("sdxl-self-h20-1024", 2, 20, 1024, 1024, 64),
    ("sdxl-cross-h10-4096", 2, 10, 4096, 77, 64),
    ("sdxl-cross-h20-1024", 2, 20, 1024, 77, 64),
    ("flux-joint-4608", 1, 24, 4608, 4608, 128),
]
N_IP = 4  # IP-Adapter image tokens (16 for the "plus" variant)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _baselines():
    from torch.nn.attention import SDPBackend
    out = {"sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION)}
    try:
        import xformers.ops as xops

        def xformers(q, k, v):  # xformers wants [B, N, H, D]
            return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                   v.transpose(1, 2)).transpose(1, 2)
        out["xformers"] = xformers
    except ImportError:
        pass
    return out


def _eager_store(q, k, v, store):
    """Unfused torch with the map store: what you'd do without our kernel."""
    p = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
    store.copy_(p.float().mean(1))
    return p @ v


def bench_shape(name, B, H, n_q, n_k, D, dtype, rep, attention):
    from triton.testing import do_bench
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device=dev, dtype=dtype, generator=g) for n in (n_q, n_k, n_k))
    flops = 4.0 * B * H * n_q * n_k * D
    cross = n_k <= 256
    src = torch.zeros(B, dtype=torch.long, device=dev)  # every row reads row 0 (P2P/PnP/MasaCtrl style)
    cases = {"ours-plain": (lambda: attention(q, k, v), flops)}
    cases["ours-inject-kv"] = (lambda: attention(q, k, v, k_from=src, v_from=src), flops)
    if cross:
        store = torch.empty(B, n_q, n_k, device=dev, dtype=torch.float16)
        w = torch.ones(B, n_k, device=dev)
        ki, vi = (torch.randn(B, H, N_IP, D, device=dev, dtype=dtype, generator=g) for _ in range(2))
        ip_flops = flops + 4.0 * B * H * n_q * N_IP * D
        cases["ours-store"] = (lambda: attention(q, k, v, store=store), flops)
        cases["ours-store+weights"] = (lambda: attention(q, k, v, token_weights=w, store=store), flops)
        cases["ours-ip"] = (lambda: attention(q, k, v, ip=(ki, vi, 0.6)), ip_flops)
        cases["eager-store"] = (lambda: _eager_store(q, k, v, store), flops)
    for bname, fn in _baselines().items():
        cases[bname] = ((lambda fn=fn: fn(q, k, v)), flops)

    # Correctness guard: a fast wrong kernel is worthless.
    ref = F.scaled_dot_product_attention(q, k, v)
    max_err = (attention(q, k, v).float() - ref.float()).abs().max().item()

    rows = []
    for impl, (fn, fl) in cases.items():
        try:
            fn()  # compile / autotune outside the timed region
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=25, rep=rep)
            rows.append(dict(shape=name, B=B, H=H, Nq=n_q, Nk=n_k, D=D, dtype=str(dtype).split(".")[-1],
                             impl=impl, ms=ms, tflops=fl / ms * 1e-9))
        except Exception as e:  # e.g. cuDNN rejects D=40; record why
            rows.append(dict(shape=name, B=B, H=H, Nq=n_q, Nk=n_k, D=D, dtype=str(dtype).split(".")[-1],
                             impl=impl, ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:160]}"))
    flash = next((r["ms"] for r in rows if r["impl"] == "sdpa-flash" and r["ms"]), None)
    for r in rows:
        r["speedup_vs_flash"] = flash / r["ms"] if flash and r["ms"] else None
        r["max_abs_err_vs_sdpa"] = max_err
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--shapes", default="", help="substring filter on shape names, comma separated")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    ap.add_argument("--no-autotune", action="store_true", help="use the launcher's default block sizes")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-<device>.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
        return 2
    if args.no_autotune:
        os.environ["OVERPAINT_AUTOTUNE"] = "0"
    import triton
    import kernels
    kmod = sys.modules["kernels.attention"]
    kmod.AUTOTUNE = not args.no_autotune

    device = torch.cuda.get_device_name()
    filters = [f for f in args.shapes.split(",") if f]
    shapes = [s for s in SHAPES if not filters or any(f in s[0] for f in filters)]
    rows = []
    for dname in args.dtypes.split(","):
        for shape in shapes:
            rows += bench_shape(*shape, DTYPES[dname], args.rep, kernels.attention)
    print(f"{'shape':<21} {'dtype':<8} {'impl':<19} {'ms':>8} {'TFLOP/s':>8} {'vs flash':>8}")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['shape']:<21} {r['dtype']:<8} {r['impl']:<19} {'n/a':>8}  {r['error'][:60]}")
            continue
        sp = f"{r['speedup_vs_flash']:.2f}x" if r["speedup_vs_flash"] else "-"
        print(f"{r['shape']:<21} {r['dtype']:<8} {r['impl']:<19} {r['ms']:>8.3f} {r['tflops']:>8.1f} {sp:>8}")
    meta = dict(device=device, capability=".".join(map(str, torch.cuda.get_device_capability())),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=common.git_commit(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                settings=dict(dtypes=args.dtypes, rep_ms=args.rep, autotune=not args.no_autotune, n_ip=N_IP,
                              timer="triton.testing.do_bench (median)", layout="contiguous [B, H, N, D]"))
    slug = common.slug(device)
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"attention-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
