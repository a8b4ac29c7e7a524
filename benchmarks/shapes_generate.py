"""Generation quality of the Shapes model (issue 5's target: >= 90% of prompts right).

    python benchmarks/shapes_generate.py --threads 2            # 100 prompts, evaluate's defaults
    python benchmarks/shapes_generate.py --guidance 8 --out /tmp/g8.json

Runs ``engine.shapes.evaluate`` (seeded prompts of one or two objects, scored by the scene
analyser: named colour, shape and position; per-attribute rates) and writes
``benchmarks/results/shapes_generate-<device>.json`` with device, date, commit and settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from engine.shapes import evaluate as E  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="shapes")
    for name, value in E.DEFAULTS.items():
        p.add_argument(f"--{name}", type=str if value is None else type(value), default=value)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/shapes_generate-<device>.json)")
    a = p.parse_args(argv)
    if not 0 <= a.screens <= 1:
        p.error(f"--screens is a share between 0 and 1, got {a.screens}")
    if a.threads:
        torch.set_num_threads(a.threads)
    import engine

    settings = {k: getattr(a, k) for k in E.DEFAULTS}
    result = E.evaluate(engine.load(a.model, device=a.device), **settings)
    meta = common.meta(a.device, dict(model=a.model, threads=torch.get_num_threads(), **settings))
    path = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / f"shapes_generate-{common.slug(meta['device'])}.json"
    common.write_json(path, meta, [result])
    print(f"named {result['named_rate']:.0%}  exact {result['exact_rate']:.0%}  "
          + "  ".join(f"{k} {v:.0%}" for k, v in result["attributes"].items()) + f"  ({result['generate_s']} s)")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
