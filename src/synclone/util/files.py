"""Files written whole or not at all, and file hashes: the one implementation every stage uses.

A reader (a resumed run, a browser reloading a report, a second process) must never see half a file, so every
artefact is written under a temporary name beside its target and renamed over it (``os.replace`` is atomic on
POSIX and Windows). The temporary name carries the writer's process id, so two writers never share one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def temp_path(path: str | Path) -> Path:
    """The temporary name :func:`atomic_path` writes ``path`` under (hidden, with this process's id)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path to write instead of ``path``; it replaces ``path`` when the block ends without error.

    On an error the temporary file is removed and ``path`` keeps its old contents. ``fsync`` flushes the file
    to disk before the rename (for files a crash must not leave empty, such as a dataset's records).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str, fsync: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"), fsync)


def write_json_atomic(path: str | Path, data: Any, fsync: bool = True) -> None:
    """Write ``data`` as indented JSON (UTF-8, a final newline) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", fsync)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks (model weights can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
