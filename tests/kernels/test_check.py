"""`python -m kernels.check --quick`: AOT-compiles the SDXL fp16 kernels for sm_80/sm_90 without a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_check_quick():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    res = subprocess.run([sys.executable, "-m", "kernels.check", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    out = res.stdout + res.stderr[-2000:]
    assert res.returncode == 0, out
    rows = [line for line in res.stdout.splitlines() if line.startswith(("fwd/", "map/"))]
    assert len(rows) == 6, out
    assert sum("sm_80" in r and "yes (mma)" in r for r in rows) == 3, out
    assert sum("sm_90" in r and "yes (wgmma)" in r for r in rows) == 3, out
    assert "0 problems" in res.stdout, out
