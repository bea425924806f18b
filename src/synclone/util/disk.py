"""Disk space: what the running stage expects to write, and the one line a full disk ends in.

Each stage (generate, train, curate, evaluate) declares its output folder and an estimate of the bytes it
writes there in all (:func:`expect_output`; the generate dry run's measured estimate when there is one). When a
write fails with ``ENOSPC``, the command line's handler turns the error into one line that names the folder,
the space the stage needs, the space free, and what to do (:func:`disk_full_message`). Every artefact is
written under a temporary name and renamed (``util.files``), so the failed write leaves no partial file and
the finished work stays for the resumed run.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExpectedOutput:
    """What the running stage writes: its folder, the estimated bytes in all, and what it is (for messages)."""

    folder: Path
    nbytes: int
    what: str


_current: ExpectedOutput | None = None


def format_bytes(n: float) -> str:
    """``n`` bytes for a person: kB below 1 MB, MB below 1 GB, then GB (decimal units, like ``df -H``)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing parent); None when unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def expect_output(folder: str | Path, nbytes: float, what: str) -> ExpectedOutput:
    """Declare that the running stage writes about ``nbytes`` into ``folder``; warns when far less is free."""
    global _current
    _current = ExpectedOutput(Path(folder), int(max(0, nbytes)), what)
    free = free_bytes(folder)
    if free is not None and free < _current.nbytes:
        warnings.warn(f"{what} writes about {format_bytes(_current.nbytes)} into '{folder}' but only "
                      f"{format_bytes(free)} is free there; it may stop with a full disk (it resumes once space is "
                      "freed)", stacklevel=2)
    return _current


def expected_output() -> ExpectedOutput | None:
    """The running stage's declaration (:func:`expect_output`), or None."""
    return _current


_ENOSPC_TEXT = ("No space left on device", "os error 28", "StorageFull", "errno 28")


def disk_full_error(err: BaseException) -> OSError | None:
    """The full-disk ``OSError`` behind ``err``, or None. Libraries report ENOSPC in their own ways (torch's zip
    writer as a RuntimeError "enforce fail", safetensors as its own error with "os error 28"), so the causes
    and the message are searched too."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        text = str(e)
        if any(t.lower() in text.lower() for t in _ENOSPC_TEXT):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(e, "filename", None))
        e = e.__cause__ or e.__context__
    return None


def disk_full_message(err: OSError) -> str:
    """One line for a full disk: the file and folder, the space the stage needs (estimate) and the space free."""
    exp = _current
    filename = err.filename if isinstance(err.filename, str) else None
    folder = exp.folder if exp is not None else (Path(filename).parent if filename else None)
    where = f" writing '{filename}'" if filename else ""
    parts = [f"the disk is full ({err.strerror or os.strerror(28)}){where}"]
    if folder is not None:
        free = free_bytes(folder)
        need = f"{exp.what} writes about {format_bytes(exp.nbytes)} into '{folder}' in all (estimate)" \
            if exp is not None else f"in '{folder}'"
        parts.append(f"{need}; {format_bytes(free) if free is not None else 'an unknown amount'} is free there")
    return ("; ".join(parts) + "; free some space (or choose an output folder on another disk) and re-run the same "
            "command: finished work is kept, partial files were removed, and the run resumes")


__all__ = ["ExpectedOutput", "disk_full_error", "disk_full_message", "expect_output", "expected_output",
           "format_bytes", "free_bytes"]
