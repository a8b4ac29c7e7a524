"""Launch configurations of the attention kernel, and the measured per-device table.

Three sources, in order:

1. the **measured table** for this GPU (``kernels/tables/<device>.json``, written by
   ``benchmarks/attention.py --write-table`` on that GPU and shipped with the package):
   per (dtype, head dim, variant, shape) the fastest block sizes and, for plain calls,
   the fastest backend (``kernels.dispatch``);
2. the **autotuner** (``triton.autotune`` over :func:`autotune_configs`, pruned by
   :func:`prune`) when no table entry exists and autotuning is on (not under CUDA graphs);
3. the **heuristics** of :func:`default_config` (CUDA graphs, the interpreter, ``kernels.check``).
"""
import functools
import json
import math
import os
from pathlib import Path

import triton

TABLES = Path(__file__).resolve().parent / "tables"
STORE_TILE = 32  # widest stored key tile of the two-phase store: its [BLOCK_M, 32] head sum stays in registers
# The one-pass store keeps [BLOCK_M, keys] fp32 head sums beside a whole head's attention in registers;
# `kernels.check`'s sweep (README) found it spill-free on sm_80 and sm_90 up to 80 keys (SD's
# 77-token prompt as 64 + 16) at head dims <= 64 (SD1.5's 40, SDXL's and SD2's 64) without
# IP-Adapter keys; wider calls (FLUX's joint attention, D = 80 / 160) take the two-phase store.
ONE_PASS_KEYS = 80
ONE_PASS_WIDTH = 64
# "auto": the rule below, unless this GPU's table measured the two-phase store faster at the shape;
# "one-pass" / "two-phase": forced (the benchmark times both; OVERPAINT_STORE_PATH for users).
STORE_PATH = os.environ.get("OVERPAINT_STORE_PATH", "auto")
STORE_PATHS = ("auto", "one-pass", "two-phase")


def one_tile(n_k: int, head_dim: int, ip: bool = False) -> tuple[int, int]:
    """The key pieces (KT1, KT2) of the one-pass store: all Nk keys in power-of-two pieces as the
    head dims (77 -> 64 + 16), or (0, 0) where only the two-phase store applies (ONE_PASS_KEYS)."""
    kt1, kt2 = split_head_dim(n_k)
    d1, d2 = split_head_dim(head_dim)
    if ip or kt1 + kt2 > ONE_PASS_KEYS or d1 + d2 > ONE_PASS_WIDTH:
        return 0, 0
    return kt1, kt2


def store_pieces(q, n_k: int, ip: bool = False) -> tuple[int, int]:
    """The store path a launch takes: :func:`one_tile`'s pieces, or (0, 0) for two phases when
    forced (STORE_PATH) or when this GPU's table compared both paths at a shape where one pass
    applies and found two phases faster."""
    if STORE_PATH not in STORE_PATHS:
        raise ValueError(f"OVERPAINT_STORE_PATH={STORE_PATH!r}: use one of {', '.join(STORE_PATHS)}")
    if STORE_PATH == "two-phase":
        return 0, 0
    pieces = one_tile(n_k, q.shape[-1], ip)
    if pieces[0] and q.is_cuda and STORE_PATH == "auto":
        D = q.shape[-1]
        entry = lookup(device_name(q.device), q.dtype, D, q.shape[2], n_k, "store")
        if entry is not None and entry.get("store_compared") and entry.get("store_path") == "two-phase" \
                and one_tile(entry["n_k"], D)[0]:
            return 0, 0
    return pieces


def split_head_dim(D: int) -> tuple[int, int]:
    """(D1, D2): power-of-two pieces for the tensor cores, D2 = 0 when D is a power of two.
    40 -> (32, 16) [8 of 16 used], 80 -> (64, 16), 96 -> (64, 32), 160 -> (128, 32)."""
    d1 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d1
    return d1, (0 if rest <= 0 else max(16, triton.next_power_of_2(rest)))


def padding_waste(D: int) -> float:
    """Share of the tensor-core work spent on padded head-dim columns."""
    d1, d2 = split_head_dim(D)
    return 1 - D / (d1 + d2)


def autotune_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in [(128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                                          (64, 32, 4, 2), (64, 128, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2),
                                          (128, 64, 4, 3), (64, 64, 4, 4)]]


def prune(configs, named_args, **kwargs):
    """Drop configurations that spill or waste work for this shape (``kernels.check`` shows why)."""
    width = kwargs["D1"] + kwargs["D2"]
    n_q, n_k = named_args["N_Q"], named_args["N_K"]
    store = kwargs.get("STORE", False)
    if store and kwargs.get("KT1", 0):  # one-pass store: BLOCK_N is unused; warps x 16 rows (no replication),
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]  # 1 stage spills (D=64)
    keep = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if width > 128 and (bm > 64 or c.num_warps < 8):  # [64, 160] fp32 accumulators need 8 warps
            continue
        if bm > 64 and (n_q <= 64 or store or (kwargs.get("HAS_CLS") and width >= 128)):
            # small Nq: more programs win; store keeps a [BM, BS] sum; classes at D >= 128 spill
            continue
        if bn > n_k and bn > 32:  # Nk = 77 gets 32- and 64-wide key tiles, never 128
            continue
        keep.append(c)
    return keep or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)]


def heuristic(n_q: int, n_k: int, width: int, *, store=False, ip=False, one_pass=False, classes=False,
              interpret=False, elem_bytes=2) -> dict:
    """Block sizes without a measurement (``width`` = D1 + D2). Every choice compiles without
    spills for sm_80 and sm_90 (``python -m kernels.check``; the sweep behind them is in the README)."""
    if interpret:  # big numpy tiles are what makes the interpreter bearable
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    if elem_bytes > 2:  # fp32 (not a fast path): halve the shared-memory footprint
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4 if width <= 128 else 8, num_stages=2)
    if store and one_pass:  # two stages: the next head's k/v arrive by cp.async, not through registers
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if store:  # the head loop keeps phase 2's [BM, 32] sum and the scratch reads beside the q tile
        if width <= 96:
            return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
        return dict(BLOCK_M=64, BLOCK_N=16 if ip and width > 128 else 32, num_warps=8, num_stages=1)
    if classes and width > 128:  # the class compare tiles beside [64, 160] accumulators: narrower key tiles
        return dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=2)
    if width > 128 or ((ip or classes) and width >= 128):  # 8 warps keep [64, 160] fp32 accumulators in registers
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
    # D = 40 carries two accumulators (32 + 16): narrower key tiles; so do split dims with classes (D = 80)
    bn = 32 if n_k < 64 or width == 48 or (classes and width & (width - 1)) else 64
    if n_q <= 64:
        return dict(BLOCK_M=64, BLOCK_N=bn, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=bn, num_warps=8, num_stages=3)


def variant(flags: dict) -> str:
    """The table's variant name for a call's constexpr flags."""
    if flags.get("STORE"):
        return "store"
    if flags.get("HAS_IP"):
        return "ip"
    if flags.get("HAS_CLS"):
        return "masked"
    if flags.get("HAS_QF") or flags.get("HAS_KF") or flags.get("HAS_VF") or flags.get("HAS_W"):
        return "inject"
    return "plain"


def default_config(q, n_k: int, flags: dict, interpret=False) -> dict:
    """The block sizes a non-autotuned launch uses: the measured table's, else :func:`heuristic`."""
    if not interpret and q.is_cuda:
        entry = lookup(device_name(q.device), q.dtype, flags["HEAD_DIM"], q.shape[2], n_k, variant(flags))
        path = ("one-pass" if flags.get("KT1") else "two-phase") if flags["STORE"] else None
        # a store entry's blocks only serve the path they were measured on (older tables: two-phase)
        if entry is not None and entry.get("config") and entry.get("store_path", path and "two-phase") == path:
            return dict(entry["config"])
    return heuristic_for(q.shape[2], n_k, flags, interpret=interpret, elem_bytes=q.element_size())


def heuristic_for(n_q: int, n_k: int, flags: dict, **kw) -> dict:
    """:func:`heuristic` for a launch's constexpr flags."""
    return heuristic(n_q, n_k, flags["D1"] + flags["D2"], store=flags["STORE"], ip=flags["HAS_IP"],
                     one_pass=flags.get("KT1", 0) > 0, classes=flags.get("HAS_CLS", False), **kw)


# ------------------------------------------------------------------ the measured table
def device_name(device) -> str:
    import torch
    return _device_name(torch.device(device).index or 0)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:  # asked on every non-autotuned launch: once per device
    import torch
    return torch.cuda.get_device_name(index)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def load_table(name: str):
    """The shipped table for a device name (``kernels/tables/<slug>.json``), or None."""
    path = TABLES / f"{slug(name)}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("device") != name:
        return None
    return data


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


@functools.lru_cache(maxsize=4096)
def _lookup(name: str, dtype: str, D: int, n_q: int, n_k: int, var: str):
    table = load_table(name)
    if table is None:
        return None
    rows = [e for e in table.get("entries", ()) if e["dtype"] == dtype and e["D"] == D and e["variant"] == var]
    if not rows:
        return None
    # nearest measured shape in log space (query and key lengths)
    return min(rows, key=lambda e: abs(math.log2(e["n_q"] / n_q)) + abs(math.log2(e["n_k"] / n_k)))


def lookup(name: str, dtype, D: int, n_q: int, n_k: int, var: str = "plain"):
    """The table entry nearest to this shape: {"backend": ..., "config": {...}, ...} or None."""
    return _lookup(name, dtype_name(dtype), int(D), int(n_q), int(n_k), var)


def clear_cache():
    load_table.cache_clear()
    _lookup.cache_clear()
