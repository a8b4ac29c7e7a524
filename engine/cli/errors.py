"""How the CLI reports failures: anticipated ones as one line (exit 2), bugs with a report request."""

from __future__ import annotations

import sys
import traceback

REPORT = "this is a bug in overpaint: please report it with the command you ran and the traceback above"


class UserError(Exception):
    """A problem with what the user asked for; printed as one line without a traceback."""


def expected() -> tuple[type[BaseException], ...]:
    """Exceptions that are about the user's input or machine, not bugs."""
    from PIL import Image

    from engine.loading.files import LoadError

    return (UserError, ValueError, LoadError, OSError, Image.DecompressionBombError, MemoryError)


def one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.strerror}: {e.filename!r}"
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller image, fewer images or --dtype fp16 on a GPU"
    return " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message held


def report(e: BaseException, debug: bool) -> int:
    """Print ``e`` the way the CLI does; the exit code."""
    if isinstance(e, KeyboardInterrupt):
        print("overpaint: interrupted; nothing was written", file=sys.stderr)
        return 130
    if isinstance(e, expected()):
        if debug:
            traceback.print_exception(e)
        print(f"overpaint: error: {one_line(e)}", file=sys.stderr)
        return 2
    traceback.print_exception(e)
    print(f"overpaint: internal error: {REPORT}", file=sys.stderr)
    return 1
