"""Benchmark kernels.attention against every torch SDPA backend, in the engine's layout, on a CUDA GPU.

    python benchmarks/attention.py [--dtypes fp16,bf16] [--shapes sd15,sdxl,flux] [--rep 100]
                                   [--no-autotune] [--no-graphs] [--write-table [PATH]] [--out FILE]
                                   [--compile-workers N] [--compile-budget-s S]

For the SD1.5 / SDXL / FLUX attention shapes, with q/k/v as views of [B, N, H·D] projections
(what the executor passes), it first checks every variant against the float64 reference on a
slice of query rows -- output and stored maps, per-dtype tolerances; a variant that fails is
reported as FAILED and never timed -- then times:

  dispatch        ``kernels.attention`` with no instruction (the measured-best backend, or ours)
  ours            our kernel, plain
  inject-p2p      Prompt-to-Prompt's rows [src, edit] x [uncond, cond]: edit rows read the
                  source rows' queries and keys (the source's maps drive the edit)
  inject-masactrl MasaCtrl's mutual self-attention: edit rows read the source rows' keys and values
  inject-masactrl-mask  its mask-guided reads (self-attention shapes): foreground queries read
                  the source's foreground keys, background ones its background (key / query classes)
  store           cross-attention maps stored (head mean, fp32 buffer) with token weights;
                  FLUX: image queries x text keys of the joint attention
  store-2p        the same with the one-pass store turned off (where it applies): the
                  table keeps the faster path (``store_path``), which the launcher then takes
  ip              an IP-Adapter "plus" branch (16 image tokens, per-row scales)
  sdpa-<backend>  torch SDPA with only that backend (flash, efficient, cudnn)

Statistics are medians (``triton.testing.do_bench(return_mode="median")``), eager and replayed
from a CUDA graph (our kernel with its default / table block sizes, no autotuning inside capture).
Columns: ``vs best`` = fastest SDPA backend's time / this time (plain rows), ``vs plain`` = our
plain time / this time (instruction rows: the cost of the instruction). Results go to
benchmarks/results/attention-<device>.json with device, date, commit, versions and settings.
Every kernel is compiled first by ``--compile-workers`` processes in parallel (one per shape and
dtype, launching each variant once; default min(8, CPUs), at most ``--compile-budget-s``, 60 s):
Triton compiles one kernel at a time per process, about 90 of them here, and its on-disk cache is
shared, so the timed run loads binaries.
``--write-table`` also writes the launch table ``kernels/tables/<device>.json`` (the fastest
correct backend per plain shape, the autotuner's block sizes per variant) that
``kernels.dispatch`` and ``kernels.configs`` read. Needs CUDA: exits with a message otherwise.
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

# name, B, H, Nq, Nk, D, text (FLUX joint attention: its first `text` keys are the prompt's)
SHAPES = [
    ("sd15-self-64x64", 2, 8, 4096, 4096, 40, 0),
    ("sd15-cross-64x64", 2, 8, 4096, 77, 40, 0),
    ("sd15-self-32x32", 2, 8, 1024, 1024, 80, 0),
    ("sd15-cross-32x32", 2, 8, 1024, 77, 80, 0),
    ("sd15-self-16x16", 2, 8, 256, 256, 160, 0),
    ("sd15-cross-16x16", 2, 8, 256, 77, 160, 0),
    ("sdxl-self-h10-4096", 2, 10, 4096, 4096, 64, 0),
    ("sdxl-cross-h10-4096", 2, 10, 4096, 77, 64, 0),
    ("sdxl-self-h20-1024", 2, 20, 1024, 1024, 64, 0),
    ("sdxl-cross-h20-1024", 2, 20, 1024, 77, 64, 0),
    ("flux-joint-4608", 1, 24, 4608, 4608, 128, 512),
]
N_IP = 16  # IP-Adapter "plus" image tokens
CHECK_ROWS = 256  # query rows checked against float64 per variant
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
STORE_TOL = dict(atol=1e-3, rtol=1e-2)
SDPA_BACKENDS = ("flash", "efficient", "cudnn")
DEVICE = "cuda"  # the helpers below also run on CPU under TRITON_INTERPRET=1 (a smoke check of their logic)


def engine_qkv(B, H, n_q, n_k, D, dtype, g):
    """q, k, v as the executor makes them: [B, H, N, D] views of [B, N, H·D] projections."""
    proj = lambda n: torch.randn(B, n, H * D, device=DEVICE, dtype=dtype, generator=g)  # noqa: E731
    return tuple(proj(n).view(B, n, H, D).transpose(1, 2) for n in (n_q, n_k, n_k))


def variants(B, H, n_q, n_k, D, text, dtype, g):
    """name -> kwargs of kernels.attention; rows come in [src, edit] pairs for the injections."""
    from kernels import configs
    B2 = max(B, 4) if B % 2 else B  # pairs need an even batch
    out = {"ours": {}}
    src = torch.arange(B2, device=DEVICE) // 2 * 2  # row 2i+1 (edit) reads row 2i (source)
    out["inject-p2p"] = dict(q_from=src, k_from=src)
    out["inject-masactrl"] = dict(k_from=src, v_from=src)
    side = math.isqrt(n_q)
    if n_k == n_q and not text and side * side == n_q:  # mask-guided MasaCtrl: edit rows read by class
        yy, xx = torch.meshgrid(torch.arange(side, device=DEVICE), torch.arange(side, device=DEVICE), indexing="ij")
        fg = ((yy - side / 2).abs() < side * 0.3) & ((xx - side / 2).abs() < side * 0.3)  # a centred object
        key_class = torch.zeros(B2, n_k, dtype=torch.int8, device=DEVICE)
        query_class = torch.full((B2, n_q), -1, dtype=torch.int8, device=DEVICE)  # source rows read all
        key_class[1::2], query_class[1::2] = fg.flatten(), fg.flatten()
        out["inject-masactrl-mask"] = dict(k_from=src, v_from=src, key_class=key_class, query_class=query_class)
    if text:
        out["store"] = dict(store=torch.empty(B2, n_q - text, text, device=DEVICE), store_queries=(text, n_q),
                            store_keys=(0, text))
    elif n_k <= 512:
        out["store"] = dict(store=torch.empty(B2, n_q, n_k, device=DEVICE),
                            token_weights=torch.rand(B2, n_k, device=DEVICE, generator=g) * 2)
        if configs.one_tile(n_k, D)[0]:  # the one-pass store applies: also time the two-phase one
            out["store-2p"] = dict(out["store"], store=torch.empty(B2, n_q, n_k, device=DEVICE))
    if not text:
        proj = lambda: torch.randn(B2, N_IP, H * D, device=DEVICE, dtype=dtype, generator=g).view(  # noqa: E731
            B2, N_IP, H, D).transpose(1, 2)
        out["ip"] = dict(ip=(proj(), proj(), torch.rand(B2, device=DEVICE, generator=g)))
    return B2, out


def check_variant(q, k, v, kw, run):
    """Max errors of output (and stored map) against float64 on the first and the last CHECK_ROWS
    query rows (the last tiles hold the largest offsets); None if within tolerance."""
    import kernels
    store = kw.get("store")
    if store is not None:
        store.fill_(float("nan"))
    got = run()
    if q.is_cuda:
        torch.cuda.synchronize()  # a launch error surfaces here, inside the caller's try
    ref_kw = {n: t for n, t in kw.items() if n not in ("store", "store_queries", "store_keys")}
    q0, q1 = kw.get("store_queries") or (0, q.shape[2])
    k0, k1 = kw.get("store_keys") or (0, k.shape[2])
    r = min(CHECK_ROWS, q1 - q0)
    for start in sorted({q0, q1 - r}):  # rows [start, start + r) of the queries
        rows = slice(start, start + r)
        ref_store = None
        if store is not None:
            ref_store = torch.zeros(store.shape[0], r, k1 - k0, dtype=torch.float64, device=DEVICE)
        if "query_class" in kw:
            ref_kw["query_class"] = kw["query_class"][:, rows]
        ref = kernels.attention_reference(q[:, :, rows], k, v, **ref_kw,
                                          **({} if ref_store is None else dict(store=ref_store, store_keys=(k0, k1))))
        try:
            torch.testing.assert_close(got[:, :, rows].double(), ref, **TOL[q.dtype])
            if store is not None:
                torch.testing.assert_close(store[:, start - q0:start - q0 + r].double(), ref_store, **STORE_TOL)
        except AssertionError as e:
            return f"rows {start}..{start + r}: " + str(e).strip().splitlines()[0][:200]
    return None


def time_it(fn, rep, graphs):
    """(eager median ms, CUDA-graph median ms or None)."""
    from triton.testing import do_bench
    fn()
    torch.cuda.synchronize()
    eager = do_bench(fn, warmup=25, rep=rep, return_mode="median")
    graph_ms, graph_error = None, None
    if graphs:
        kmod = sys.modules["kernels.attention"]
        auto, kmod.AUTOTUNE = kmod.AUTOTUNE, False  # the autotuner cannot run inside capture
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph_ms = do_bench(graph.replay, warmup=25, rep=rep, return_mode="median")
        except Exception as e:  # e.g. a backend that cannot be captured: keep the eager figure
            graph_error = f"{type(e).__name__}: {str(e).strip()[:160]}"
        finally:
            kmod.AUTOTUNE = auto
    return eager, graph_ms, graph_error


def _store_path(path, fn):
    """Run ``fn`` with the store path forced ("one-pass" where it applies, or "two-phase")."""
    from kernels import configs
    saved, configs.STORE_PATH = configs.STORE_PATH, path
    try:
        return fn()
    finally:
        configs.STORE_PATH = saved


class StickyCudaError(RuntimeError):
    """A CUDA error that poisons the context (illegal address): nothing after it can be trusted."""


def shape_runs(B, H, n_q, n_k, D, text, dtype):
    """(B2, cases, q, k, v, runs) for one shape: runs[impl] = (callable, flops, kwargs)."""
    import kernels
    from kernels import dispatch
    kmod = sys.modules["kernels.attention"]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    B2, cases = variants(B, H, n_q, n_k, D, text, dtype, g)
    q, k, v = engine_qkv(B2, H, n_q, n_k, D, dtype, g)
    flops = 4.0 * B2 * H * n_q * n_k * D
    runs = {"dispatch": (lambda: kernels.attention(q, k, v), flops, {})}
    for vname, kw in cases.items():
        fl = flops + (4.0 * B2 * H * n_q * N_IP * D if "ip" in kw else 0)
        runs[vname] = ((lambda kw=kw: kmod.attention_triton(q, k, v, **kw)), fl, kw)
        if vname.startswith("store"):  # each store row runs its path whatever a table says
            path = "two-phase" if vname == "store-2p" else "one-pass"
            runs[vname] = (lambda kw=kw, p=path: _store_path(p, lambda: kmod.attention_triton(q, k, v, **kw)), fl, kw)
    for bname in SDPA_BACKENDS:
        runs[f"sdpa-{bname}"] = ((lambda b=bname: dispatch.sdpa(b, q, k, v)), flops, {})
    return B2, cases, q, k, v, runs


def compile_shape(name, B, H, n_q, n_k, D, text, dtype, graphs):
    """Launch every variant of one shape once (and once more with the graphs' block sizes), so
    Triton's on-disk cache holds their binaries: what the parallel warm-up workers run. Errors
    are left for the timed run to report."""
    kmod = sys.modules["kernels.attention"]
    runs = shape_runs(B, H, n_q, n_k, D, text, dtype)[-1]
    for fn, _, _ in runs.values():
        for auto in (kmod.AUTOTUNE, False) if graphs else (kmod.AUTOTUNE,):
            saved, kmod.AUTOTUNE = kmod.AUTOTUNE, auto
            try:
                fn()
            except Exception:  # noqa: BLE001 - the timed run reports it
                pass
            finally:
                kmod.AUTOTUNE = saved


def warm_jobs(shapes, dtypes, *, autotune, graphs):
    """One compile-only command per (dtype, shape): the workers of ``--compile-workers``."""
    flags = ([] if autotune else ["--no-autotune"]) + ([] if graphs else ["--no-graphs"])
    return [[sys.executable, str(Path(__file__).resolve()), "--compile-only", "--shapes", s[0], "--dtypes", d, *flags]
            for d in dtypes for s in shapes]


def warm(jobs, workers, budget_s=60.0):
    """Run the compile-only commands ``workers`` at a time (Triton compiles one kernel at a time per
    process; its disk cache is shared, so the timed run then loads binaries instead of compiling),
    for at most ``budget_s`` in all: what is not compiled by then compiles inline, as without
    workers. Returns (seconds, failed or unfinished commands)."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    deadline = time.perf_counter() + budget_s

    def one(cmd):
        left = deadline - time.perf_counter()
        if left <= 0:
            return False
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=left).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ok = list(pool.map(one, jobs))
    return time.perf_counter() - t0, [" ".join(c[-4:]) for c, good in zip(jobs, ok) if not good]


def bench_shape(name, B, H, n_q, n_k, D, text, dtype, rep, graphs):
    from kernels import dispatch
    kmod = sys.modules["kernels.attention"]
    B2, cases, q, k, v, runs = shape_runs(B, H, n_q, n_k, D, text, dtype)
    rows = []
    for impl, (fn, fl, kw) in runs.items():
        row = dict(shape=name, B=B2, H=H, Nq=n_q, Nk=n_k, D=D, dtype=str(dtype).split(".")[-1], impl=impl,
                   variant=impl if impl in cases else "plain")
        try:
            err = check_variant(q, k, v, kw, fn)
            if err is None:
                eager, graph_ms, graph_error = time_it(fn, rep, graphs)
        except Exception as e:
            msg = f"{type(e).__name__}: {str(e).strip()[:160]}"
            # an SDPA backend may not take the shape (cuDNN and D = 40): unavailable; ours must run
            row.update(status="unavailable" if impl.startswith("sdpa-") else "FAILED", error=msg)
            rows.append(row)
            if "illegal" in msg.lower() or "device-side" in msg.lower():
                raise StickyCudaError(msg) from e  # the context is gone: stop, keep what was measured
            continue
        if err is not None:
            row.update(status="FAILED", error=err)  # never timed
            rows.append(row)
            continue
        row.update(status="ok", median_ms=eager, graph_median_ms=graph_ms, tflops=fl / eager * 1e-9)
        if impl.startswith("store"):  # the path the timed launches took (where one pass applies, the forced one)
            row["store_path"] = "one-pass" if kmod.LAST_FLAGS["KT1"] else "two-phase"
        if graph_error:
            row["graph_error"] = graph_error
        if impl in cases and kmod.AUTOTUNE:
            best = getattr(kmod._attn_fwd_tuned, "best_config", None)
            if best is not None:
                row["config"] = dict(best.kwargs, num_warps=best.num_warps, num_stages=best.num_stages)
        if impl == "dispatch":
            row["backend"] = dispatch.backend(q, k)
        rows.append(row)
    ok = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    best_sdpa = min((r["median_ms"] for n, r in ok.items() if n.startswith("sdpa-")), default=None)
    for r in rows:
        if r.get("status") != "ok":
            continue
        if r["variant"] == "plain":
            r["vs_best_sdpa"] = best_sdpa / r["median_ms"] if best_sdpa else None
        elif "ours" in ok:
            r["vs_plain"] = ok["ours"]["median_ms"] / r["median_ms"]
    return rows


TABLE_VARIANT = {"ours": "plain", "inject-masactrl-mask": "masked"}


def build_table(rows, device, meta):
    """The launch table: per (dtype, D, shape) the fastest correct plain backend, and our block sizes."""
    entries = []
    shapes = {(r["dtype"], r["D"], r["Nq"], r["Nk"]) for r in rows}
    for dtype, D, n_q, n_k in sorted(shapes):
        here = [r for r in rows if (r["dtype"], r["D"], r["Nq"], r["Nk"]) == (dtype, D, n_q, n_k)
                and r.get("status") == "ok"]
        plain = [r for r in here if r["impl"] == "ours" or r["impl"].startswith("sdpa-")]
        if not plain:
            continue
        fastest = min(plain, key=lambda r: r["median_ms"])
        backend = "ours" if fastest["impl"] == "ours" else fastest["impl"][len("sdpa-"):]
        stores = [r for r in here if r["impl"].startswith("store")]
        for r in here:
            if r["impl"] == "dispatch" or r["impl"].startswith("sdpa-"):
                continue
            if r["impl"].startswith("store"):
                if r is not min(stores, key=lambda s: s["median_ms"]):
                    continue  # the faster store path (one-pass / two-phase) and its block sizes
            variant = TABLE_VARIANT.get(r["impl"], r["variant"].split("-")[0])  # as configs.variant names them
            if any(e["variant"] == variant and (e["dtype"], e["D"], e["n_q"], e["n_k"]) == (dtype, D, n_q, n_k)
                   for e in entries):
                continue  # inject-p2p and inject-masactrl share the "inject" entry (first wins)
            extra = {}
            if "store_path" in r:  # compared: both paths timed here, so the launcher may follow the winner
                extra = dict(store_path=r["store_path"], store_compared=len({s["store_path"] for s in stores}) == 2)
            entries.append(dict(dtype=dtype, D=D, n_q=n_q, n_k=n_k, variant=variant,
                                backend=backend if variant == "plain" else "ours", config=r.get("config"),
                                median_ms=r["median_ms"], **extra))
    return dict(device=device, measured=meta["date"], git_commit=meta["git_commit"], torch=meta["torch"],
                triton=meta["triton"], entries=entries)


def print_header():
    print(f"{'shape':<20} {'dtype':<8} {'impl':<16} {'median ms':>9} {'graph ms':>9} {'TFLOP/s':>8} "
          f"{'vs best':>8} {'vs plain':>8}", flush=True)


def print_rows(rows):
    for r in rows:
        head = f"{r['shape']:<20} {r['dtype']:<8} {r['impl']:<16}"
        if r.get("status") != "ok":
            print(f"{head} {r['status']:>9}  {r.get('error', '')[:70]}", flush=True)
            continue
        gm = f"{r['graph_median_ms']:.3f}" if r.get("graph_median_ms") else "-"
        vb = f"{r['vs_best_sdpa']:.2f}x" if r.get("vs_best_sdpa") else "-"
        vp = f"{r['vs_plain']:.2f}x" if r.get("vs_plain") else "-"
        print(f"{head} {r['median_ms']:>9.3f} {gm:>9} {r['tflops']:>8.1f} {vb:>8} {vp:>8}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--shapes", default="", help="substring filter on shape names, comma separated")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time in ms")
    ap.add_argument("--no-autotune", action="store_true", help="use the table's / heuristic block sizes")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--write-table", nargs="?", const="default", default=None,
                    help="write the launch table (default kernels/tables/<device>.json)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-<device>.json)")
    ap.add_argument("--compile-workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes that compile every kernel first, in parallel (0/1: compile inline)")
    ap.add_argument("--compile-budget-s", type=float, default=60.0, help="the most the parallel compile may take")
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)  # a warm-up worker
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to do.")
        return 2
    if args.no_autotune:
        os.environ["OVERPAINT_AUTOTUNE"] = "0"
    import triton

    import importlib

    from kernels import configs
    kmod = importlib.import_module("kernels.attention")  # the module (``kernels.attention`` is the function)
    kmod.AUTOTUNE = not args.no_autotune

    device = torch.cuda.get_device_name()
    filters = [f for f in args.shapes.split(",") if f]
    shapes = [s for s in SHAPES if not filters or any(f in s[0] for f in filters)]
    dtypes = args.dtypes.split(",")
    if args.compile_only:
        for dname in dtypes:
            for shape in shapes:
                compile_shape(*shape, DTYPES[dname], not args.no_graphs)
        return 0
    warm_s, warm_failed = None, []
    if args.compile_workers > 1:
        warm_s, warm_failed = warm(warm_jobs(shapes, dtypes, autotune=not args.no_autotune, graphs=not args.no_graphs),
                                   args.compile_workers, args.compile_budget_s)
        note = f"; workers that failed (the timed run reports why): {warm_failed}" if warm_failed else ""
        print(f"compiled in {args.compile_workers} processes: {warm_s:.0f} s{note}", flush=True)
    meta = dict(device=device, capability=".".join(map(str, torch.cuda.get_device_capability())),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=common.git_commit(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                settings=dict(dtypes=args.dtypes, rep_ms=args.rep, autotune=not args.no_autotune, n_ip=N_IP,
                              graphs=not args.no_graphs, check_rows=CHECK_ROWS,
                              timer="triton.testing.do_bench(return_mode='median')",
                              flops="the two matmuls (4 B H Nq Nk D), not the store's recomputed q k^T",
                              layout="engine: [B, H, N, D] views of [B, N, H*D]",
                              compile_workers=args.compile_workers, compile_s=warm_s))
    slug = common.slug(device)
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"attention-{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tpath = None
    if args.write_table:
        tpath = configs.TABLES / f"{configs.slug(device)}.json" if args.write_table == "default" \
            else Path(args.write_table)
        tpath.parent.mkdir(parents=True, exist_ok=True)
    rows, stopped = [], None

    def save():  # after every shape: a run cut short by its time cap keeps what it measured
        path.write_text(json.dumps(dict(meta=dict(meta, complete=stopped is None and done == total,
                                                  stopped=stopped), results=rows), indent=1))
        if tpath is not None:
            tpath.write_text(json.dumps(build_table(rows, device, meta), indent=1))

    total, done = len(shapes) * len(dtypes), 0
    print_header()
    for dname in dtypes:
        for shape in shapes:
            try:
                new = bench_shape(*shape, DTYPES[dname], args.rep, not args.no_graphs)
            except StickyCudaError as e:
                stopped = str(e)
                new = []
            rows += new
            done += 1
            print_rows(new)
            save()
            if stopped:
                print(f"stopped after a CUDA error: {stopped}", flush=True)
                break
        if stopped:
            break
    print(f"wrote {path}" + (f" and {tpath}" if tpath else ""), flush=True)
    failed = [r for r in rows if r.get("status") == "FAILED"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
