"""benchmarks/serve.py end to end, short: clients over loopback and CI's 30-second soak with no
failed or lost request."""

import json


def test_serve_benchmark_and_soak(tmp_path):
    from benchmarks import serve

    assert serve.main(["--clients", "1", "2", "--duration", "3", "--soak", "30", "--requests", "3",
                       "--out", str(tmp_path)]) == 0  # nonzero when a request failed or was lost
    (path,) = tmp_path.glob("serve-*.json")
    res = json.loads(path.read_text())["results"][0]
    assert res["soak"]["edits"] > 0 and res["soak"]["failed"] == 0 and res["soak"]["lost"] == 0
    assert [r["clients"] for r in res["levels"]] == [1, 2] and res["in_process"]["edits_per_s"] > 0
    assert (tmp_path / path.name.replace(".json", ".svg")).exists()
