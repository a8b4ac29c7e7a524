"""The one-shot GPU run's plan and budget logic (``--dry-run``, what CI can check without a GPU)."""

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_session as G  # noqa: E402


def test_dry_run_passes(capsys):
    assert G.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "env" in out and "cuda-tests" in out and "e2e-flux" in out


def test_budget_runs_parts_in_priority_order_and_skips_what_does_not_fit(tmp_path):
    parts = G.plan(tmp_path)
    names = [p.name for p in parts]
    assert names[:3] == ["env", "kernels-check", "cuda-tests"]
    tight = G.schedule(parts, 200)  # at their caps only the first parts fit
    assert [n for n, _ in tight] == names[:len(tight)] and len(tight) < len(parts)
    assert all(cap <= 200 - G.RESERVE_S for _, cap in tight)
    quick = G.schedule(parts, 200, durations={p.name: 5 for p in parts})  # parts that end early leave room
    assert len(quick) > len(tight)
    assert [n for n, _ in G.schedule(parts, 10_000)] == names


def test_parts_run_time_out_and_are_summarised(tmp_path):
    ok = G.Part("ok", 30, 1, [sys.executable, "-c", "print('hello')"])
    slow = G.Part("slow", 1, 1, [sys.executable, "-c", "import time; time.sleep(30)"])
    bad = G.Part("bad", 30, 1, [sys.executable, "-c", "raise SystemExit(3)"])
    for p, t in ((ok, 30), (slow, 1), (bad, 30)):
        G.run_part(p, t, {}, tmp_path / f"{p.name}.log")
    assert (ok.status, ok.returncode, ok.tail.strip()) == ("ok", 0, "hello")
    assert slow.status == "timeout" and bad.status == "failed" and bad.returncode == 3
    G.write_summary(tmp_path, [ok, slow, bad], dict(date="x", git_commit="y", budget_s=60, used_s=2, env={}))
    data = json.loads((tmp_path / "session.json").read_text())
    assert [p["status"] for p in data["parts"]] == ["ok", "timeout", "failed"]
    assert "| bad | failed |" in (tmp_path / "summary.md").read_text()


def test_env_part_and_bad_options(tmp_path, capsys):
    assert G.main(["--env", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "env.json").read_text())
    assert info["torch"] and "cuda_available" in info
    with pytest.raises(SystemExit):
        G.main(["--dry-run", "--only", "nope"])
    assert "unknown parts" in capsys.readouterr().err


def test_a_part_at_its_cap_takes_its_workers_with_it(tmp_path):
    # The part's own subprocess (say, a compile worker) must not outlive the cap: it would hold the
    # GPU during the next part and keep the output pipe open (run_part would hang on it).
    pidfile = tmp_path / "worker.pid"
    code = ("import subprocess, sys, time; "
            "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pidfile)!r}, 'w').write(str(w.pid)); time.sleep(60)")
    p = G.Part("spawns", 2, 1, [sys.executable, "-c", code])
    t0 = time.perf_counter()
    G.run_part(p, 2, {}, tmp_path / "spawns.log")
    assert p.status == "timeout" and time.perf_counter() - t0 < 20
    stat = Path(f"/proc/{int(pidfile.read_text())}/stat")
    for _ in range(50):  # gone, or a zombie waiting for its reaper
        if not stat.exists() or stat.read_text().split(") ")[1].startswith("Z"):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the part's worker outlived the part's cap")
