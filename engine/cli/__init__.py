"""The ``overpaint`` command line.

    overpaint edit IMAGE --source-prompt TEXT --target-prompt TEXT -o out.png [--method p2p|ledits++|ddim|ddpm]
    overpaint generate --prompt TEXT -o out.png [--steps ...]      (default model: the bundled shapes)
    overpaint demo -o DIR                  edit a bundled example scene with the shapes model
    overpaint vocab [--model shapes]       the words a model declares
    overpaint serve [--port 8000 ...]      serve edits over HTTP (engine.serving)
    overpaint tiny DIR [--arch sd15|sdxl]  write a tiny random-weight pipeline
    overpaint bench [e2e|edit|step] ...    benchmarks (a source checkout)

Every anticipated failure is one line on stderr and exit code 2 (``--debug`` adds the
traceback); files are checked before any compute and written atomically, and inputs are
never written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .commands import cmd_demo, cmd_edit, cmd_generate, cmd_serve, cmd_tiny, cmd_vocab
from .errors import UserError, report
from .options import EDIT_METHODS, build_parser

__all__ = ["main", "build_parser", "UserError", "EDIT_METHODS"]

COMMANDS = {"tiny": cmd_tiny, "generate": cmd_generate, "edit": cmd_edit, "demo": cmd_demo, "vocab": cmd_vocab,
            "serve": cmd_serve}


def cmd_bench(argv: list[str]) -> int:
    """``overpaint bench [e2e|edit|step] ARGS``: benchmarks/e2e.py (default), edit.py or step.py
    of a source checkout, with ARGS passed through."""
    import importlib

    root = Path(__file__).resolve().parents[2]
    if not (root / "benchmarks" / "e2e.py").is_file():
        print("overpaint: error: bench needs a source checkout (benchmarks/ is not installed)", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = argv[0] if argv[:1] in (["e2e"], ["edit"], ["step"]) else "e2e"
    rest = argv[1:] if argv[:1] == [suite] else argv
    return importlib.import_module(f"benchmarks.{suite}").main(rest)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 -- every failure is reported, bugs as bugs
        return report(e, args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
