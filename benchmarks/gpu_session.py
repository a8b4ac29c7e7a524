"""The one-shot GPU run: everything the project needs a GPU for, in priority order, under one budget.

    python -m benchmarks.gpu_session --out DIR [--budget-s 480] [--wheels .whl]
    python -m benchmarks.gpu_session --dry-run            # the plan and the budget logic, on any machine (CI)

GPUs are lent rarely and briefly, on a fixed image (Python 3.12, torch 2.11, triton 3.6, no
diffusers, no network). This runs, in order, each part in its own subprocess under its own time
cap (never past what is left of ``--budget-s``), and writes into DIR: ``session.json`` (every
part: command, status, seconds, return code, output tail), ``summary.md`` and each part's own
files (benchmark JSON, a profiler trace of one W1 step, logs):

  env            GPU, driver, torch / triton / numpy / diffusers versions
  kernels-check  ahead-of-time compile of every kernel variant (registers, spills, shared memory)
  cuda-tests     the CUDA tests: kernels in fp16 / bf16, CUDA-graph capture of generations and
                 edits, no host syncs in edit steps, FLUX on the GPU (interpreter tests deselected:
                 triton 3.6 with numpy >= 2.4 cannot run them)
  attention      benchmarks/attention.py, fp16, default block sizes (no autotuning), short repetitions,
                 every kernel compiled first by 8 processes in parallel,
                 eager and CUDA-graph medians; its launch table (fastest correct backend per shape);
                 results are written after every shape, so a part cut short keeps what it measured
  e2e-sd         benchmarks/e2e.py W1-W4 vs diffusers (3 timed runs each)
  e2e-flux       benchmarks/e2e.py W5, W6 (FLUX.1-dev and RF-Inversion) vs diffusers
  step           benchmarks/step.py on SD1.5 (fp16): edit_many batching vs one at a time
  trace          a torch.profiler trace of one W1 step
  attention-tuned  the attention benchmark with autotuning, if time is left; its table adds the
                 autotuner's block sizes (commit it as kernels/tables/<device>.json)

diffusers is not on that image: carry it as wheels (README, "GPU runs"); ``--wheels DIR``
installs every wheel in DIR into a private folder first (default ``.whl`` when it exists).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SITE = Path("/tmp/overpaint-site")  # where carried wheels are installed
RESERVE_S = 15  # kept back for writing the summary


@dataclass
class Part:
    name: str
    cap_s: int  # the most this part may take
    min_s: int  # it is skipped when less than this is left
    argv: list  # the command, {out} replaced by the output folder
    needs: tuple = ()  # files it runs (checked by --dry-run)
    status: str = "pending"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    returncode: int | None = None
    tail: str = ""
    files: list = field(default_factory=list)


def plan(out: Path) -> list[Part]:
    py = sys.executable
    o = str(out)
    cuda_k = "(cuda or host_syncs) and not interp"
    return [
        Part("env", 20, 5, [py, "-m", "benchmarks.gpu_session", "--env", "--out", o]),
        Part("kernels-check", 60, 10, [py, "-m", "kernels.check", "-j", "8", "--json", f"{o}/kernels-check.json"],
             ("kernels/check.py",)),
        Part("cuda-tests", 150, 40, [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", cuda_k,
                                     "tests/kernels/test_attention.py", "tests/engine/runtime/test_graphs.py",
                                     "tests/engine/models/test_flux.py"],
             ("tests/kernels/test_attention.py", "tests/engine/runtime/test_graphs.py", "tests/engine/models/test_flux.py")),
        Part("attention", 150, 20, [py, "-u", "benchmarks/attention.py", "--no-autotune", "--rep", "20",
                                    "--dtypes", "fp16", "--compile-workers", "8",
                                    "--out", f"{o}/attention-untuned.json", "--write-table", f"{o}/table-untuned.json"],
             ("benchmarks/attention.py",)),
        Part("e2e-sd", 180, 60, [py, "benchmarks/e2e.py", "--workloads", "W1,W2,W3,W4", "--impls", "ours,ours-graphs,diffusers",
                                 "--repeats", "3", "--warmup", "1", "--out", f"{o}/e2e-sd.json"], ("benchmarks/e2e.py",)),
        Part("e2e-flux", 150, 60, [py, "benchmarks/e2e.py", "--workloads", "W5,W6", "--impls", "ours,ours-graphs,diffusers",
                                   "--repeats", "3", "--warmup", "1", "--out", f"{o}/e2e-flux.json"],
             ("benchmarks/e2e.py", "benchmarks/flux_bench.py")),
        Part("step", 60, 20, [py, "benchmarks/step.py", "--model", "sd15", "--device", "cuda", "--dtype", "fp16",
                              "--n", "1", "4", "16", "64", "--repeats", "1", "--out", o], ("benchmarks/step.py",)),
        Part("trace", 40, 15, [py, "benchmarks/e2e.py", "--workloads", "W1", "--steps", "1", "--repeats", "1",
                               "--warmup", "1", "--impls", "ours", "--profile", f"{o}/trace-w1.json", "--no-plot",
                               "--out", f"{o}/e2e-trace.json"], ("benchmarks/e2e.py",)),
        Part("attention-tuned", 120, 40, [py, "-u", "benchmarks/attention.py", "--rep", "50", "--no-graphs",
                                          "--dtypes", "fp16", "--compile-workers", "8", "--shapes",
                                          "sd15-cross-64x64,sd15-self-64x64,sdxl-self-h10-4096,sdxl-cross-h10-4096,flux",
                                          "--out", f"{o}/attention-tuned.json", "--write-table", f"{o}/table-tuned.json"],
             ("benchmarks/attention.py",)),
    ]


def schedule(parts: list[Part], budget_s: float, durations: dict | None = None) -> list[tuple[str, float]]:
    """(part, timeout) for each part that would run if part k took ``durations[k]`` seconds (its cap by
    default): what --dry-run prints, and the rule ``run`` follows."""
    left, out = budget_s - RESERVE_S, []
    for p in parts:
        if left < p.min_s:
            continue
        cap = min(p.cap_s, left)
        out.append((p.name, cap))
        left -= min(cap, (durations or {}).get(p.name, cap))
    return out


def environment() -> dict:
    import platform

    import numpy
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, numpy=numpy.__version__,
                cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                    memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def install_wheels(folder: Path) -> str | None:
    """Install every wheel in ``folder`` into SITE (no index, no dependencies); the PYTHONPATH to add."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(SITE), *map(str, wheels)]
    subprocess.run(cmd, check=True, timeout=120)
    return str(SITE)


def run_part(p: Part, timeout: float, env: dict, log: Path) -> None:
    """Run one part in its own process group: at its cap the whole group is killed, so workers it
    started (the attention benchmark's compile processes, pytest's subprocesses) cannot outlive it,
    hold the GPU during the next part, or keep the output pipe open."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(p.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=timeout)
        p.returncode, p.status = proc.returncode, "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        p.status = "timeout"
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        text, _ = proc.communicate()
    p.seconds = round(time.perf_counter() - t0, 1)
    log.write_text(text)
    p.tail = text[-3000:]


def write_summary(out: Path, parts: list[Part], meta: dict) -> None:
    (out / "session.json").write_text(json.dumps(dict(meta=meta, parts=[asdict(p) for p in parts]), indent=1))
    lines = [f"# GPU session {meta['date']} ({meta.get('env', {}).get('gpu', '?')}, commit {meta['git_commit']})", "",
             f"budget {meta['budget_s']} s, used {meta['used_s']} s", "", "| part | status | seconds | files |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {p.name} | {p.status} | {p.seconds} | {', '.join(p.files)} |" for p in parts]
    failed = [p for p in parts if p.status in ("failed", "timeout")]
    for p in failed:
        lines += ["", f"## {p.name}: {p.status}", "", "```", p.tail[-1500:], "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/gpu-session-<date>)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall seconds for everything (default 480)")
    ap.add_argument("--wheels", default=None, help="install the wheels in this folder first (default .whl if present)")
    ap.add_argument("--only", default=None, help="comma-separated part names to run (default all)")
    ap.add_argument("--dry-run", action="store_true", help="check the plan and the budget logic; run nothing")
    ap.add_argument("--env", action="store_true", help=argparse.SUPPRESS)  # the env part's own process
    a = ap.parse_args(argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"gpu-session-{stamp}"
    if a.env:
        out.mkdir(parents=True, exist_ok=True)
        info = environment()
        (out / "env.json").write_text(json.dumps(info, indent=1))
        print(json.dumps(info))
        return 0
    parts = plan(out)
    if a.only:
        names = {n.strip() for n in a.only.split(",")}
        unknown = names - {p.name for p in parts}
        if unknown:
            ap.error(f"unknown parts {sorted(unknown)}; choose from {[p.name for p in parts]}")
        parts = [p for p in parts if p.name in names]
    if a.budget_s <= RESERVE_S:
        ap.error(f"--budget-s must be more than {RESERVE_S}")
    if a.dry_run:
        missing = [f for p in parts for f in p.needs if not (ROOT / f).is_file()]
        for name, cap in schedule(parts, a.budget_s):
            print(f"  {name:<16} up to {cap:.0f} s")
        skipped = [p.name for p in parts if p.name not in dict(schedule(parts, a.budget_s))]
        print(f"plan: {len(parts)} parts in {a.budget_s:.0f} s; at their caps these would be skipped: {skipped or 'none'}")
        if missing:
            print(f"missing files: {missing}")
            return 1
        return 0
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    wheels = Path(a.wheels) if a.wheels else ROOT / ".whl"
    if wheels.is_dir():
        site = install_wheels(wheels)
        if site:
            env["PYTHONPATH"] = site + os.pathsep + env["PYTHONPATH"]
    t0 = time.perf_counter()
    for p in parts:
        left = a.budget_s - RESERVE_S - (time.perf_counter() - t0)
        if left < p.min_s:
            p.status = "skipped"
            continue
        print(f"[{time.perf_counter() - t0:6.0f} s] {p.name} (up to {min(p.cap_s, left):.0f} s)", flush=True)
        before = set(out.iterdir())
        run_part(p, min(p.cap_s, left), env, out / f"{p.name}.log")
        p.files = sorted(f.name for f in set(out.iterdir()) - before)
        print(f"         {p.status} in {p.seconds} s", flush=True)
    from benchmarks import common

    env_file = out / "env.json"
    meta = dict(date=stamp, git_commit=common.git_commit(), budget_s=a.budget_s,
                used_s=round(time.perf_counter() - t0, 1),
                env=json.loads(env_file.read_text()) if env_file.is_file() else {})
    write_summary(out, parts, meta)
    print((out / "summary.md").read_text())
    return 0 if all(p.status in ("ok", "skipped") for p in parts) else 1


if __name__ == "__main__":
    sys.exit(main())
