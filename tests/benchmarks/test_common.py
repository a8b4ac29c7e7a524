"""benchmarks.common: what a result file records about the code that produced it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True,
                   capture_output=True)


def test_uncommitted_names_changed_code_and_models_but_not_results(tmp_path, monkeypatch):
    for rel in ("engine/a.py", "engine/b.py", "engine/shapes/model/w.safetensors", "benchmarks/results/r.json",
                "README.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("0")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "x")
    monkeypatch.setattr(common, "ROOT", tmp_path)
    assert common.uncommitted() == []
    (tmp_path / "engine/a.py").write_text("1")  # changed code
    (tmp_path / "engine/shapes/model/new.safetensors").write_text("w")  # weights not yet committed
    (tmp_path / "benchmarks/results/r.json").write_text("1")  # results are what is being written
    (tmp_path / "README.md").write_text("1")  # prose does not make figures
    (tmp_path / "engine/a dir").mkdir()
    (tmp_path / "engine/a dir/c.py").write_text("2")  # a name git would quote without -z
    _git(tmp_path, "mv", "engine/b.py", "engine/renamed.py")  # a rename lists the new path only
    want = ["engine/a dir/c.py", "engine/a.py", "engine/renamed.py", "engine/shapes/model/new.safetensors"]
    assert sorted(common.uncommitted()) == want
    assert sorted(common.meta("cpu", dict(n=1))["uncommitted"]) == want
