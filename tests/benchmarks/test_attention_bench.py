"""benchmarks/attention.py on CPU: the launch table it writes from measured rows, and its refusal
without a GPU (the timings themselves need one: `python -m benchmarks.gpu_session`)."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import attention as bench  # noqa: E402
from kernels import configs, dispatch  # noqa: E402


def _row(impl, ms, variant="plain", status="ok", config=None, n_k=77, **extra):
    return dict(shape="sd15-cross-64x64", B=2, H=8, Nq=4096, Nk=n_k, D=40, dtype="float16", impl=impl,
                variant=variant, status=status, median_ms=ms, config=config, **extra)


def test_table_picks_the_fastest_correct_backend(tmp_path, monkeypatch):
    cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    rows = [_row("dispatch", 0.05), _row("ours", 0.05, config=dict(cfg, BLOCK_M=128)),
            _row("sdpa-flash", 0.04), _row("sdpa-cudnn", 0.01, status="FAILED"),  # wrong: never chosen
            _row("sdpa-efficient", None, status="unavailable"),
            _row("inject-p2p", 0.06, variant="inject-p2p"), _row("inject-masactrl", 0.07, variant="inject-masactrl"),
            *_stores(0.09, 0.08, cfg),
            _row("ours", 0.2, n_k=4096), _row("sdpa-flash", 0.3, n_k=4096)]
    meta = dict(date="2026-12-01T00:00:00+00:00", git_commit="abc", torch="2.11", triton="3.6")
    table = bench.build_table(rows, "NVIDIA Test GPU", meta)
    by = {(e["variant"], e["n_k"]): e for e in table["entries"]}
    assert by[("plain", 77)]["backend"] == "flash" and by[("plain", 77)]["config"]["BLOCK_M"] == 128
    assert by[("plain", 4096)]["backend"] == "ours"
    assert by[("inject", 77)]["median_ms"] == 0.06  # one inject entry (P2P's, the first)
    # the faster store path wins, with its block sizes
    assert by[("store", 77)]["config"] == cfg and by[("store", 77)]["backend"] == "ours"
    assert by[("store", 77)]["store_path"] == "two-phase" and by[("store", 77)]["store_compared"]
    assert len(table["entries"]) == 4
    # the file it writes is what dispatch and configs read
    (tmp_path / f"{configs.slug('NVIDIA Test GPU')}.json").write_text(json.dumps(table))
    monkeypatch.setattr(configs, "TABLES", tmp_path)
    dispatch.clear_cache()
    try:
        assert dispatch.choose("NVIDIA Test GPU", torch.float16, 40, 4096, 77) == "flash"
        assert dispatch.choose("NVIDIA Test GPU", torch.float16, 40, 4096, 4096) == "ours"
        assert configs.lookup("NVIDIA Test GPU", torch.float16, 40, 4096, 77, "store")["config"] == cfg
        # the launcher then takes the measured-faster two-phase store there, with the table's blocks
        monkeypatch.setattr(configs, "device_name", lambda device: "NVIDIA Test GPU")
        fake = SimpleNamespace(shape=(2, 8, 4096, 40), dtype=torch.float16, device="cuda:0", is_cuda=True,
                               element_size=lambda: 2)
        assert configs.one_tile(77, 40) == (64, 16) and configs.store_pieces(fake, 77) == (0, 0)
        flags = dict(HEAD_DIM=40, D1=32, D2=16, STORE=True, KT1=0, HAS_IP=False)
        assert configs.default_config(fake, 77, flags) == cfg
        one_pass = dict(flags, KT1=64)  # a one-pass launch never takes the two-phase path's blocks
        assert configs.default_config(fake, 77, one_pass) == configs.heuristic_for(4096, 77, one_pass)
        monkeypatch.setattr(configs, "STORE_PATH", "one-pass")  # forced: the table is not read
        assert configs.store_pieces(fake, 77) == (64, 16)
    finally:
        dispatch.clear_cache()


def _stores(one_pass_ms, two_phase_ms, cfg, two_phase_status="ok"):
    return [_row("store", one_pass_ms, variant="store", config=dict(cfg, num_stages=2), store_path="one-pass"),
            _row("store-2p", two_phase_ms, variant="store-2p", config=cfg, store_path="two-phase",
                 status=two_phase_status)]


@pytest.mark.parametrize("case", ["one-pass wins", "two-phase failed", "not compared nearby"])
def test_table_store_path(tmp_path, monkeypatch, case):
    # The launcher leaves the one-pass store only where the table timed both paths at a shape where
    # one pass applies and two phases won; otherwise the entry keeps the path that was measured.
    cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    meta = dict(date="2026-12-01T00:00:00+00:00", git_commit="abc", torch="2.11", triton="3.6")
    if case == "not compared nearby":  # only a 154-key entry (two phases only), nearest to a 77-key call
        rows = [_row("store", 0.05, variant="store", config=cfg, store_path="two-phase", n_k=154)]
    else:
        rows = _stores(0.07, 0.08, cfg, two_phase_status="FAILED" if case == "two-phase failed" else "ok")
    n_k = rows[0]["Nk"]
    table = bench.build_table(rows + [_row("ours", 0.04, n_k=n_k)], "NVIDIA Test GPU", meta)
    (entry,) = [e for e in table["entries"] if e["variant"] == "store"]
    assert entry["store_path"] == ("two-phase" if case == "not compared nearby" else "one-pass")
    assert entry["store_compared"] == (case == "one-pass wins")
    (tmp_path / f"{configs.slug('NVIDIA Test GPU')}.json").write_text(json.dumps(table))
    monkeypatch.setattr(configs, "TABLES", tmp_path)
    monkeypatch.setattr(configs, "device_name", lambda device: "NVIDIA Test GPU")
    dispatch.clear_cache()
    try:
        fake = SimpleNamespace(shape=(2, 8, 1024, 40), dtype=torch.float16, device="cuda:0", is_cuda=True,
                               element_size=lambda: 2)
        assert configs.store_pieces(fake, 77) == (64, 16)
    finally:
        dispatch.clear_cache()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_needs_cuda(capsys):
    assert bench.main(["--shapes", "sd15"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


SMOKE = """
import sys, json
sys.path.insert(0, {root!r})
import torch
from benchmarks import attention as bench
bench.DEVICE = "cpu"
bench.time_it = lambda fn, rep, graphs: (1.0, None, None)  # do_bench needs CUDA; the checks before it do not
rows = []
for shape in [("sd-cross", 2, 2, 40, 77, 40, 0), ("sd-self", 2, 2, 16, 16, 40, 0),
              ("flux-joint", 1, 2, 48, 48, 64, 12)]:
    rows += bench.bench_shape(*shape, torch.float16, 10, False)
print(json.dumps(rows))
"""


def test_variants_are_checked_before_timing_interpreter():
    # Every variant of the benchmark runs through its float64 check (the Triton kernel in the
    # interpreter, SDPA's CPU backends) exactly as on the GPU, so a logic error costs no GPU time.
    import os
    import subprocess
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", SMOKE.format(root=str(ROOT))], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    status = {(r["shape"], r["impl"]): r["status"] for r in rows}
    for shape in ("sd-cross", "flux-joint"):
        for impl in ("dispatch", "ours", "inject-p2p", "inject-masactrl", "store"):
            assert status[(shape, impl)] == "ok", (shape, impl, rows)
    assert status[("sd-cross", "ip")] == "ok" and status[("sd-cross", "store-2p")] == "ok"  # both store paths
    assert status[("sd-self", "inject-masactrl-mask")] == "ok"  # checked against the float64 class read
    # the path each store row's launches took (the kernel's flags), forced per row
    paths = {(r["shape"], r["impl"]): r.get("store_path") for r in rows if r["impl"].startswith("store")}
    assert paths == {("sd-cross", "store"): "one-pass", ("sd-cross", "store-2p"): "two-phase",
                     ("sd-self", "store"): "one-pass", ("sd-self", "store-2p"): "two-phase",
                     ("flux-joint", "store"): "one-pass"}  # 48 keys here (4608 in FLUX: two-phase)
    assert all(s in ("ok", "unavailable") for s in status.values()), rows  # nothing FAILED


def test_compile_workers_plan_and_run(monkeypatch):
    # One compile-only command per (dtype, shape), with the run's autotune / graph flags; the pool
    # reports the commands that failed or ran past their time; a compile-only pass launches every
    # variant (twice with graphs: autotuned and with the graphs' fixed blocks) and survives errors.
    shapes = bench.SHAPES[:2]
    jobs = bench.warm_jobs(shapes, ["fp16", "bf16"], autotune=False, graphs=True)
    assert len(jobs) == 4 and all("--compile-only" in j and "--no-autotune" in j for j in jobs)
    assert [j[j.index("--shapes") + 1] for j in jobs] == [shapes[0][0], shapes[1][0]] * 2
    py = sys.executable
    sleep = [py, "-c", "import time; time.sleep(30)"]
    secs, failed = bench.warm([[py, "-c", "pass"], [py, "-c", "raise SystemExit(1)"], sleep, sleep,
                               [py, "-c", "pass"]], 2, budget_s=3)
    assert len(failed) == 4 and secs < 25  # the last one found no worker before the budget ran out
    kmod = sys.modules["kernels.attention"]
    calls = []

    def run(name):
        calls.append((name, kmod.AUTOTUNE))
        if name == "bad":
            raise RuntimeError("a variant that fails")

    fake = {n: ((lambda n=n: run(n)), 0.0, {}) for n in ("ours", "bad", "store")}
    monkeypatch.setattr(bench, "shape_runs", lambda *a: (2, {}, None, None, None, fake))
    monkeypatch.setattr(kmod, "AUTOTUNE", True)
    bench.compile_shape("x", 2, 2, 64, 64, 40, 0, torch.float16, True)
    assert calls == [(n, a) for n in ("ours", "bad", "store") for a in (True, False)] and kmod.AUTOTUNE is True
