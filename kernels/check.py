"""Ahead-of-time compile check of the attention kernel for sm_80 and sm_90 (no GPU needed).

    python -m kernels.check [--quick] [--all-configs] [-j N] [--json FILE]

Every variant the engine launches (plain, inject, store -- one-pass "(1p)" or two-phase
"(2p)" --, IP-Adapter, all at once, MasaCtrl's masked reads; fp16 and bf16; head dims 40/64/80/128/160 at the
SD1.5 / SDXL / FLUX shapes) is compiled with ``triton.compile`` for an A100 and an H100
target, with the ptxas that ships with the installed triton.  Arguments are built by the
launcher itself (``launch_args``) from tensors in the engine's layout (views of [B, N, H·D]
projections, the output written into [B, N, H·D]) and specialised the way the JIT does at
launch (a value of 1 becomes a constant; an integer or an address divisible by 16 gets the
divisibility hint; others, such as the head stride 40, get none), so what compiles here is
what runs there.

Reported per kernel: registers, spill bytes (from the ptxas log), shared memory, CTAs per
SM (registers, shared memory and threads), tensor-core instructions (``mma.sync`` on
sm_80, ``wgmma`` on sm_90) and the widest global load / store in bytes (16 = vectorised).
A problem (exit status 1): a compile failure, no tensor-core instruction, any spill
(unless the variant is listed in ``ALLOW_SPILLS``), or no 16-byte loads or stores.
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launcher's default; silences a 3.9 warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

KA = __import__("kernels.attention", fromlist=["_attn_fwd"])  # the module, not the function
from kernels import configs  # noqa: E402

ARCHS = (80, 90)
# D -> (model, B, H, Nq, Nk, text): the engine's shapes per head dim (text > 0: FLUX joint attention).
SHAPES = {40: ("SD1.5", 2, 8, 4096, 77, 0), 64: ("SDXL", 2, 10, 4096, 77, 0), 80: ("SD1.5", 2, 8, 1024, 77, 0),
          128: ("FLUX", 1, 24, 4608, 4608, 512), 160: ("SD1.5", 2, 8, 256, 77, 0)}
# store-2p: the two-phase store where the one-pass one is the default; masked: MasaCtrl's mask-guided reads
VARIANTS = ("plain", "inject", "store", "store-2p", "ip", "all", "masked")
# (variant, D) that may spill: every flag at once at D = 160 (inject + weights + store + IP-Adapter)
# spills 8 bytes (triton 3.9) / 16 bytes (3.6) on sm_80 in the best configuration found (64x16,
# 8 warps, 1 stage, of 12 tried); sm_90 is clean.
ALLOW_SPILLS = {("all", 160)}
TENSOR_CORE_OP = {80: "mma.sync.aligned", 90: "wgmma.mma_async"}
SM = {80: dict(regs=65536, smem=164 * 1024, threads=2048, ctas=32),
      90: dict(regs=65536, smem=228 * 1024, threads=2048, ctas=32)}


def engine_inputs(D, dtype, variant):
    """(q, k, v, kwargs) laid out as the executor makes them, for one variant at the shape of D."""
    _, B, H, n_q, n_k, text = SHAPES[D]
    t = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    proj = lambda n: torch.empty(B, n, H * D, dtype=t).view(B, n, H, D).transpose(1, 2)  # noqa: E731
    if variant == "masked":
        n_k = n_q  # self-attention
    q, k, v = proj(n_q), proj(n_k), proj(n_k)  # [B, H, N, D] views of [B, N, H·D]
    kw = {}
    if variant in ("inject", "all"):
        kw.update(q_from=torch.zeros(B, dtype=torch.int64), k_from=torch.zeros(B, dtype=torch.int64),
                  v_from=torch.zeros(B, dtype=torch.int64))
    if variant in ("store", "store-2p", "all"):
        if text:  # FLUX: image queries x text keys of the joint attention
            kw.update(store=torch.empty(B, n_q - text, text), store_queries=(text, n_q), store_keys=(0, text))
        else:
            kw.update(store=torch.empty(B, n_q, n_k), token_weights=torch.empty(B, n_k))
    if variant in ("ip", "all"):
        kw["ip"] = (proj(16), proj(16), torch.empty(B))  # the "plus" adapter's 16 tokens, per-row scales
    if variant == "masked":  # the edit row reads the source's keys / values, by foreground class
        kw.update(k_from=torch.zeros(B, dtype=torch.int64), v_from=torch.zeros(B, dtype=torch.int64),
                  key_class=torch.zeros(B, n_k, dtype=torch.int8), query_class=torch.zeros(B, n_q, dtype=torch.int8))
    return q, k, v, kw


def specialise(value):
    """(type, divisible by 16, constant) as Triton's JIT specialises a launch argument."""
    if isinstance(value, torch.Tensor):
        ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
              torch.int32: "*i32", torch.int8: "*i8"}[value.dtype]
        return ty, value.data_ptr() % 16 == 0, None
    if isinstance(value, bool):
        return "i1", False, None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False, 1
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0, None
    return "fp32", False, None


def jobs(quick=False, all_configs=False):
    """(label, dtype, D, variant, config) for every compile, times the two architectures."""
    out = []
    dims = (40,) if quick else (40, 64, 80, 128, 160)
    for D in dims:
        for dtype in (("fp16",) if quick else ("fp16", "bf16")):
            variants = VARIANTS if dtype == "fp16" and not quick else ("plain", "store", "all")
            for variant in variants:
                if variant == "store-2p" and not configs.one_tile(SHAPES[D][4], D)[0]:
                    continue  # the store is two-phase there anyway
                cfgs = [None]
                if all_configs and variant == "plain":
                    cfgs += [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
                             for c in configs.autotune_configs()]
                out += [(variant, dtype, D, cfg) for cfg in cfgs]
    return [(*j, arch) for j in out for arch in ARCHS]


def build(variant, dtype, D, cfg):
    """(signature, constexprs, attrs, config) of the launch the engine would make."""
    q, k, v, kw = engine_inputs(D, dtype, variant)
    saved = configs.STORE_PATH
    configs.STORE_PATH = "two-phase" if variant == "store-2p" else "auto"
    try:
        args, flags, _ = KA.launch_args(q, k, v, **kw)
    finally:
        configs.STORE_PATH = saved
    if cfg is None:
        cfg = configs.heuristic_for(q.shape[2], k.shape[2], flags)
    fn = KA._attn_fwd
    names = [n for n in fn.arg_names if n not in flags and n not in ("BLOCK_M", "BLOCK_N")]
    assert len(names) == len(args), (names, len(args))
    sig, consts, attrs = {}, dict(flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"]), {}
    values = dict(zip(names, args))
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        ty, div16, const = specialise(values[name])
        sig[name] = ty
        if ty == "constexpr":
            consts[name] = const
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs, cfg


def occupancy(arch, regs, smem, warps):
    """CTAs per SM allowed by registers (allocated per warp in 256s), shared memory and threads."""
    lim = SM[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = lim["regs"] // (per_warp * warps)
    by_smem = lim["smem"] // (smem + 1024) if smem else lim["ctas"]
    return min(by_regs, by_smem, lim["threads"] // (32 * warps), lim["ctas"])


def widest(ptx, op):
    """Largest access in bytes among `op` instructions (ld.global / st.global / cp.async)."""
    best = 0
    for line in ptx.splitlines():
        line = re.sub(r"^@!?%\w+\s+", "", line.strip())  # drop a predicate guard
        if not line.startswith(op):
            continue
        if op == "cp.async":
            m = re.search(r"\],\s*(0x[0-9a-fA-F]+|\d+)", line)  # cp-size after the source operand
            best = max(best, int(m.group(1), 0) if m else 0)
            continue
        vec = re.search(r"\.v(\d)", line)
        width = re.search(r"\.[bfsu](\d+)\b", line)
        if width:
            best = max(best, (int(vec.group(1)) if vec else 1) * int(width.group(1)) // 8)
    return best


def compile_one(job):
    variant, dtype, D, cfg, arch = job
    sig, consts, attrs, cfg = build(variant, dtype, D, cfg)
    d1, d2 = consts["D1"], consts["D2"]
    store = "(1p)" if consts["KT1"] else "(2p)" if consts["STORE"] else ""  # one-pass / two-phase store
    row = dict(kernel=f"fwd/{variant.split('-')[0]}{store}", dtype=dtype, D=f"{D}={d1}+{d2}" if d2 else str(D),
               blocks=f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}",
               arch=f"sm_{arch}", triton=triton.__version__)
    t0 = time.time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the `ptxas -v` report
            k = triton.compile(triton.compiler.ASTSource(fn=KA._attn_fwd, signature=sig, constexprs=consts, attrs=attrs),
                               target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    except Exception as e:  # report, never crash the table
        row.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}")
        return row
    text = log.getvalue()
    ptx = k.asm["ptx"]
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores", text)
    regs = int(regs.group(1)) if regs else -1
    smem = k.metadata.shared
    row.update(ok=True, regs=regs, spills=int(spills.group(1)) if spills else -1, smem=smem,
               ctas=occupancy(arch, regs, smem, cfg["num_warps"]), tc=TENSOR_CORE_OP[arch] in ptx,
               ld=max(widest(ptx, "ld.global"), widest(ptx, "cp.async")), st=widest(ptx, "st.global"),
               secs=time.time() - t0)
    row["problems"] = problems(row, variant, D)
    return row


def problems(row, variant, D):
    out = []
    if not row["tc"]:
        out.append("no tensor-core instruction")
    if row["spills"] != 0 and (variant, D) not in ALLOW_SPILLS:
        out.append(f"spills {row['spills']} bytes" if row["spills"] > 0 else "no ptxas report")
    if row["ld"] < 16:
        out.append(f"widest load {row['ld']} B")
    if row["st"] < 16:
        out.append(f"widest store {row['st']} B")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="only SD1.5's D=40 in fp16 (plain, store, all)")
    ap.add_argument("--all-configs", action="store_true", help="also compile every autotune config (plain)")
    ap.add_argument("-j", type=int, default=min(2, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # the ptxas log is only printed by a real compile
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="overpaint-check-"))
    todo = jobs(args.quick, args.all_configs)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=max(1, args.j)) as pool:
        rows = list(pool.map(compile_one, todo))
    print(f"triton {triton.__version__}; engine layout; CTAs = per SM; ld/st = widest global access in bytes")
    head = f"{'kernel':<14} {'dtype':<5} {'D':<10} {'blocks':<15} {'arch':<6} {'regs':>4} {'spills':>6} " \
           f"{'smem':>7} {'CTAs':>4} {'ld':>3} {'st':>3} {'tensor-cores':<15} {'secs':>5}"
    print(head)
    print("-" * len(head))
    bad = 0
    for r in rows:
        pre = f"{r['kernel']:<14} {r['dtype']:<5} {r['D']:<10} {r['blocks']:<15} {r['arch']:<6}"
        if not r["ok"]:
            bad += 1
            print(f"{pre} FAILED {r['error']}")
            continue
        op = TENSOR_CORE_OP[int(r["arch"][3:])].split(".")[0]
        tc = f"yes ({op})" if r["tc"] else f"NO ({op})"
        bad += bool(r["problems"])
        note = f"  PROBLEM: {'; '.join(r['problems'])}" if r["problems"] else ""
        print(f"{pre} {r['regs']:>4} {r['spills']:>6} {r['smem']:>7} {r['ctas']:>4} {r['ld']:>3} {r['st']:>3} "
              f"{tc:<15} {r['secs']:>5.1f}{note}")
    print(f"{len(rows)} kernels, {bad} problems, {time.time() - t0:.0f}s")
    if args.json:
        import datetime
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, git_commit=commit,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           device="none: ahead-of-time compile for sm_80 and sm_90", quick=args.quick,
                           allowed_spills=sorted(map(list, ALLOW_SPILLS)), rows=rows), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
