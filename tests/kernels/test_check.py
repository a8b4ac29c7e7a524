"""`python -m kernels.check`: AOT compiles of the attention kernel for sm_80/sm_90 without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
triton = pytest.importorskip("triton")
check = pytest.importorskip("kernels.check")


def test_check_quick():
    # SD1.5's D = 40 in the engine's layout: its head stride (40) is not a multiple of 16, yet every
    # variant must use tensor cores, vector (16-byte) loads and stores, and never spill.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    res = subprocess.run([sys.executable, "-m", "kernels.check", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr[-2000:]
    assert res.returncode == 0, out
    rows = [line for line in res.stdout.splitlines() if line.startswith("fwd/")]
    assert len(rows) == 6, out
    assert sum("sm_80" in r and "yes (mma)" in r for r in rows) == 3, out
    assert sum("sm_90" in r and "yes (wgmma)" in r for r in rows) == 3, out
    assert all(" 16  16 " in r for r in rows), out  # widest load and store: 16 bytes
    assert "0 problems" in res.stdout, out


def test_engine_inputs_are_the_executors_views():
    q, k, v, kw = check.engine_inputs(40, "fp16", "all")
    assert q.stride() == (4096 * 320, 40, 320, 1)  # [B, H, N, D] view of [B, N, H*D]
    args, flags, out = check.KA.launch_args(q, k, v, **kw)
    assert flags["SU"] == 8 and (flags["D1"], flags["D2"]) == (32, 16)
    assert out.stride() == q.stride()  # written straight into [B, N, H*D]


def test_specialisation_matches_the_jit():
    # Our model of the launcher's specialisation must agree with triton's own.
    native = pytest.importorskip("triton.runtime.jit").__dict__.get("native_specialize_impl")
    if native is None:
        pytest.skip("this triton has no native_specialize_impl")
    from triton.backends.nvidia.compiler import CUDABackend
    base = torch.empty(64, dtype=torch.float16)
    for value in (base, base[1:], base[8:], 1, 40, 5, 320, 16, 0, 77, 24640):
        ty, div16, const = check.specialise(value)
        n_ty, key = native(CUDABackend, value, False, True, True)
        assert ty == n_ty, value
        assert div16 == (key == "D") or const is not None, value


def test_ptx_access_widths():
    ptx = "\n".join([
        "\t@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "\tld.global.b16 %rs1, [ %rd2 + 0 ];",
        "\t@%p2 cp.async.cg.shared.global [ %r5 + 0 ], [ %rd3 + 0 ], 0x10, %r6;",
        "\t@!%p3 st.global.v2.b32 [ %rd4 + 0 ], { %r7, %r8 };",
        "\tst.global.b32 [ %rd5 + 0 ], %r9;",
    ])
    assert check.widest(ptx, "ld.global") == 16
    assert check.widest(ptx, "cp.async") == 16
    assert check.widest(ptx, "st.global") == 8


def test_occupancy():
    assert check.occupancy(90, 128, 65536, 8) == 2  # 128 regs x 256 threads: half the register file
    assert check.occupancy(80, 255, 32768, 8) == 1
    assert check.occupancy(80, 64, 200 * 1024, 4) == 0  # more shared memory than an A100 SM has
