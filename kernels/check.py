"""Ahead-of-time compile check of the attention kernels for sm_80 and sm_90 (no GPU needed).

    python -m kernels.check [--quick] [--all-configs] [-j N]

Every kernel variant the engine launches (head dims padded to BLOCK_D, fp16/bf16, the
plain/inject/store/ip constexpr flags, block sizes from the launcher's configs for the
SD1.5/SDXL/FLUX shapes) is compiled with ``triton.compile`` for an A100 and an H100
target, using the ptxas that ships with triton.  The table reports registers and spill
bytes (from the ptxas log), shared memory, and whether tensor-core instructions were
emitted (``mma.sync`` on sm_80, ``wgmma`` on sm_90, from the PTX).  Exit status is 1 if
anything fails to compile or lacks tensor-core instructions.
"""
import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launcher's default; silences a 3.9 warning

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

KA = __import__("kernels.attention", fromlist=["_attn_fwd"])  # the module, not the function

ARCHS = (80, 90)
# (model, D, Nq, Nk): the shapes that pick the launcher's block sizes per head dim.
SHAPES = {40: ("SD1.5", 4096, 77), 64: ("SDXL", 4096, 77), 80: ("SD1.5", 1024, 77),
          128: ("FLUX", 4608, 4608), 160: ("SD1.5", 256, 77)}
FLAGS = ("HAS_QF", "HAS_KF", "HAS_VF", "HAS_W", "HAS_IP", "IP_PER_ROW", "STORE_LSE")
VARIANTS = {
    "plain": (),
    "inject": ("HAS_QF", "HAS_KF", "HAS_VF"),
    "store": ("HAS_W", "STORE_LSE"),
    "ip": ("HAS_IP", "IP_PER_ROW"),
    "all": FLAGS,
}
TENSOR_CORE_OP = {80: "mma.sync.aligned", 90: "wgmma.mma_async"}


def _signature(fn, dtype, constexprs):
    """Argument types as the JIT launcher would specialise them for contiguous-row views."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "O", "KI", "VI"):
            sig[name] = f"*{dtype}"
        elif name in ("QF", "KF", "VF"):
            sig[name] = "*i64"
        elif name in ("W", "IPS", "LSE", "S"):
            sig[name] = "*fp32"
        elif name in ("sm_scale", "ip_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        # torch allocations are 16-byte aligned; row strides of [B, N, H*D] views are multiples of 16.
        if sig[name].startswith("*") or (name.startswith("s_") and sig[name] == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _head_dim_constexprs(fn, D):
    c = {"HEAD_DIM": D, "BLOCK_D": max(16, triton.next_power_of_2(D))}
    for name in fn.arg_names:  # unit strides of the head dim: the launcher specialises them to 1
        if name.startswith("s_") and name.endswith("d"):
            c[name] = 1
    return c


def jobs(quick=False, all_configs=False):
    """(label, kernel name, dtype, D, constexprs, num_warps, num_stages) for every compile."""
    out = []
    dims = (64,) if quick else (40, 64, 80, 128, 160)
    dtypes = ("fp16",) if quick else ("fp16", "bf16")
    for D in dims:
        model, n_q, n_k = SHAPES[D]
        block_d = max(16, triton.next_power_of_2(D))
        cfgs = [KA.default_config(n_q, n_k, block_d)]
        if all_configs:  # every autotuner candidate that survives pruning for this shape
            cands = KA._prune_fwd(KA._fwd_configs(), {"N_Q": n_q, "N_K": n_k}, BLOCK_D=block_d)
            cfgs += [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cands]
        for dtype in dtypes:
            variants = ["plain", "all"]
            if D == 64 and dtype == "fp16" and not quick:
                variants += ["inject", "store", "ip"]
            for variant in variants:
                for cfg in cfgs if variant == "plain" else cfgs[:1]:
                    c = dict(_head_dim_constexprs(KA._attn_fwd, D), BLOCK_IP=16, DOT_PREC="tf32",
                             BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
                    c.update({f: f in VARIANTS[variant] for f in FLAGS})
                    out.append((f"fwd/{variant}", "_attn_fwd", dtype, D, c, cfg["num_warps"], cfg["num_stages"]))
            mcfg = KA.map_config(n_k, block_d)
            c = dict(_head_dim_constexprs(KA._attn_map, D), DOT_PREC="tf32", BLOCK_M=mcfg["BLOCK_M"],
                     BLOCK_N=mcfg["BLOCK_N"], HAS_QF=True, HAS_KF=True, HAS_W=True)
            out.append(("map/store", "_attn_map", dtype, D, c, mcfg["num_warps"], mcfg["num_stages"]))
    return [(*j, arch) for j in out for arch in ARCHS]


def compile_one(job):
    label, kname, dtype, D, constexprs, warps, stages, arch = job
    fn = getattr(KA, kname)
    sig, attrs = _signature(fn, dtype, constexprs)
    row = dict(kernel=label, dtype=dtype, D=f"{D}->{constexprs['BLOCK_D']}",
               blocks=f"{constexprs['BLOCK_M']}x{constexprs['BLOCK_N']} w{warps} s{stages}", arch=f"sm_{arch}")
    t0 = time.time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the `ptxas -v` report
            k = triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # report, never crash the table
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
        return row
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    row.update(ok=True, regs=int(regs.group(1)) if regs else -1, spills=int(spills.group(1)) if spills else -1,
               smem=k.metadata.shared, tc=TENSOR_CORE_OP[arch] in k.asm["ptx"], secs=time.time() - t0)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only SDXL D=64 fp16 (plain, all, map)")
    ap.add_argument("--all-configs", action="store_true", help="also compile every autotune config")
    ap.add_argument("-j", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    args = ap.parse_args(argv)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # the ptxas log is only printed by a real compile
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="overpaint-check-"))
    todo = jobs(args.quick, args.all_configs)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.j)) as pool:
        rows = list(pool.map(compile_one, todo))
    head = f"{'kernel':<12} {'dtype':<5} {'D':<8} {'blocks':<15} {'arch':<6} {'regs':>4} {'spills':>6} " \
           f"{'smem':>7} {'tensor-cores':<18} {'secs':>5}"
    print(head)
    print("-" * len(head))
    bad = 0
    for r in rows:
        pre = f"{r['kernel']:<12} {r['dtype']:<5} {r['D']:<8} {r['blocks']:<15} {r['arch']:<6}"
        if not r["ok"]:
            bad += 1
            print(f"{pre} FAILED {r['error']}")
            continue
        op = TENSOR_CORE_OP[int(r["arch"][3:])].split(".")[0]
        tc = f"yes ({op})" if r["tc"] else f"NO ({op} missing)"
        bad += not r["tc"]
        print(f"{pre} {r['regs']:>4} {r['spills']:>6} {r['smem']:>7} {tc:<18} {r['secs']:>5.1f}")
    print(f"{len(rows)} kernels, {bad} problems, {time.time() - t0:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
