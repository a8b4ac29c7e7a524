"""Everything the CLI checks about files before any compute starts, and how it writes them.

Outputs are checked up front (suffix, folder exists and is writable, not a folder, not the
input or a link to it) and written through a temporary file renamed into place
(:func:`engine.images.save_atomic`), so a failed run leaves nothing half-written and never
touches an input.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def writable_folder(folder: Path, what: str) -> None:
    """Refuse a missing, non-folder or unwritable folder (probed by creating a file in it)."""
    if not folder.exists():
        raise UserError(f"{what} folder {str(folder)!r} does not exist; create it first")
    if not folder.is_dir():
        raise UserError(f"{what} folder {str(folder)!r} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".overpaint-probe-"):
            pass
    except OSError as e:
        raise UserError(f"cannot write into {what} folder {str(folder)!r} ({e.strerror or e}); choose another place")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (hard links and symlinks included)."""
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str, inputs: list[Path], suffixes=IMAGE_SUFFIXES, what: str = "output",
                 overwrite: bool = False) -> Path:
    """A checked output path: right suffix, a writable folder, not a folder itself, not an input,
    and not an existing file unless ``overwrite``."""
    out = Path(path)
    if suffixes and out.suffix.lower() not in suffixes:
        raise UserError(f"{what} {path!r} must end in one of {', '.join(suffixes)}")
    if out.is_dir():
        raise UserError(f"{what} {path!r} is a folder; give a file name inside it")
    writable_folder(out.parent if str(out.parent) else Path("."), what)
    for i in inputs:
        if out.resolve() == i.resolve() or same_file(out, i):
            raise UserError(f"{what} {path!r} is the input {str(i)!r} (or a link to it); choose another path "
                            f"so the input is kept")
    if out.exists() and not overwrite:
        raise UserError(f"{what} {path!r} exists; choose another name, or pass --overwrite to replace it")
    return out


def output_paths(path: str, n: int, inputs: list[Path], overwrite: bool = False) -> list[Path]:
    """``n`` checked image outputs: ``path`` itself, or ``stem_0.png``, ``stem_1.png``, ..."""
    if n == 1:
        return [check_output(path, inputs, overwrite=overwrite)]
    out = check_output(path, inputs, overwrite=True)  # only its numbered siblings are written
    return [check_output(str(out.with_name(f"{out.stem}_{i}{out.suffix}")), inputs, overwrite=overwrite)
            for i in range(n)]


def check_output_folder(path: str, inputs: list[Path]) -> Path:
    """A folder for several outputs: created when missing (its parent must exist), never a file."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output {path!r} is a file; -o takes a folder here (it is created if missing)")
    if not folder.exists():
        writable_folder(folder.parent if str(folder.parent) else Path("."), "output")
        folder.mkdir()
    writable_folder(folder, "output")
    for i in inputs:
        if folder.resolve() == i.resolve():
            raise UserError(f"output {path!r} is an input; choose another folder")
    return folder
