"""Smoke tests of the end-to-end and editing benchmarks on CPU with tiny models: every
workload and the JSON / plot outputs work, so the GPU run only has to measure."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = ["--device", "cpu", "--tiny"]


def _load(path: Path) -> dict:
    data = json.loads(path.read_text())
    meta = data["meta"]
    assert meta["device"] and meta["date"] and meta["git_commit"] and meta["versions"]["torch"]
    assert meta["settings"]["tiny"] is True
    return data


def test_e2e_all_workloads(tmp_path, capsys):
    from benchmarks import e2e

    out = tmp_path / "e2e-cpu.json"
    assert e2e.main(TINY + ["--out", str(out), "--profile", str(tmp_path / "trace.json"),
                            "--workloads", "W1,W2,W3,W4,W5,W6"]) == 0
    data = _load(out)
    rows = {(r["workload"].split("-")[0], r["impl"]): r for r in data["results"]}
    assert not [r for r in data["results"] if r.get("error")]
    for w in ("W1", "W2", "W3", "W4", "W5", "W6"):
        assert (w, "ours") in rows and any(k[0] == w and k[1].startswith("diffusers") for k in rows)
    for r in data["results"]:
        assert r["median_s"] > 0 and len(r["times_s"]) == 1 and r["unet_rows"] > 0 and 0 < r["vae_share"] <= 1
        assert r["mfu"] > 0 and r["evals_per_s"] > 0
    w1 = rows[("W1", "ours")]
    assert w1["unet_calls"] == 2 and w1["unet_rows"] == 4  # 2 steps, uncond + cond rows
    p2p = next(r for r in data["results"] if r["workload"].startswith("W3") and "p2p" in r["workload"] and r["impl"] == "ours")
    assert p2p["ratio_vs_generation_same_batch"] > 0
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    w5, w6 = rows[("W5", "ours")], rows[("W6", "ours")]
    assert w5["unet_calls"] == 2 and w5["unet_rows"] == 2  # FLUX.1-dev: embedded guidance, one row per step
    assert w6["unet_calls"] == 4 and rows[("W6", "diffusers-loop")]["unet_calls"] == 4  # 2 inversion + 2 edit steps
    assert sorted(p.name for p in tmp_path.glob("trace-*.json")) == [f"trace-W{i}.json" for i in range(1, 7)]
    assert "Self CPU" in capsys.readouterr().out  # the top-kernel table


def test_edit_benchmark_and_cli_dispatch(tmp_path):
    from engine.cli import main

    out = tmp_path / "edit-cpu.json"
    assert main(["bench", "edit"] + TINY + ["--out", str(out)]) == 0
    data = _load(out)
    assert [r["impl"] for r in data["results"]] == ["ours", "diffusers"]
    assert data["meta"]["settings"]["steps"] == 2 and all(r["median_s"] > 0 for r in data["results"])

    out2 = tmp_path / "e2e.json"
    assert main(["bench"] + TINY + ["--workloads", "W2", "--impls", "ours,ours-graphs", "--channels-last",
                                    "--no-plot", "--out", str(out2)]) == 0
    impls = {r["impl"] for r in _load(out2)["results"]}
    assert impls == {"ours", "ours-graphs"} and not out2.with_suffix(".svg").exists()


def test_bad_workload(capsys):
    from benchmarks import e2e

    assert e2e.main(TINY + ["--workloads", "W9"]) == 2
    assert "unknown workloads ['W9']" in capsys.readouterr().out


def test_step_benchmark_smoke(tmp_path, capsys):
    """benchmarks/step.py on the bundled Shapes model with few steps: JSON, table, and the
    batched results equal the one-by-one ones."""
    from engine.cli import main

    assert main(["bench", "step", "--n", "1", "2", "--steps", "4", "--repeats", "1", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("step-*.json")).read_text())
    assert data["meta"]["device"] and data["meta"]["git_commit"] and data["meta"]["settings"]["steps"] == 4
    rows = data["results"]
    assert [r["n"] for r in rows] == [1, 2] and rows[1]["methods"] == ["p2p", "ledits++"]
    for r in rows:
        assert r["edits_per_s_batched"] > 0 and r["edits_per_s_single"] > 0 and 0 <= r["outside_model_share"] < 1
        assert r["max_abs_diff_vs_single"] <= 1e-4
    assert rows[1]["model_calls"] < 2 * rows[0]["model_calls"]  # two edits share the calls
    assert "ratio" in capsys.readouterr().out
