"""The one way tensors are read from a checkpoint file synclone did not just compute.

Model folders, training checkpoints (``last.pt``), imported timm weights and teachers all come through
:func:`load_tensors`: a ``.safetensors`` file is read as such (no code can run), anything else with
``torch.load(weights_only=True)``, which refuses pickled code. Every failure is one line naming the file and why
(pickled code or objects, truncated, corrupt, empty); torch's own advice to retry with ``weights_only=False`` is
never passed on, since following it would run whatever the file holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from synclone.errors import UserError


class UnreadableCheckpoint(UserError):
    """A checkpoint file that cannot be read as plain tensors; ``reason`` says why, the message names the file."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read checkpoint '{path}': {reason}")
        self.path, self.reason = str(path), reason


def _reason(err: BaseException) -> str:
    """A short reason from torch's error, without its advice to disable ``weights_only``."""
    text = str(err)
    if "Weights only load failed" in text or "weights_only" in text:
        found = re.search(r"(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)",
                          text)
        what = f" ({found.group(1)})" if found else ""
        return (f"it holds pickled code or objects{what}, which synclone never runs; export its tensors to "
                "safetensors")
    if isinstance(err, EOFError) or not text.strip():
        return "the file is empty or cut short"
    if "zip archive" in text or "central directory" in text:
        return "the file is truncated or corrupt (not a complete torch zip archive)"
    first = text.strip().splitlines()[0]
    return f"not a torch checkpoint ({type(err).__name__}: {first[:120]})"


def load_tensors(path: str | Path, safe_globals: list | None = None) -> Any:
    """The tensors (or plain containers of tensors) in ``path``; raises :class:`UnreadableCheckpoint`.

    ``safe_globals``: plain-data classes a released checkpoint may hold besides tensors (``argparse.Namespace``,
    numpy scalars) that ``weights_only`` may rebuild; they carry data, never code.
    """
    import contextlib

    import torch

    path = Path(path)
    if not path.is_file():
        raise UnreadableCheckpoint(path, "it does not exist or is not a regular file")
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint(path, "the file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise UnreadableCheckpoint(path, f"not a valid safetensors file ({str(err).splitlines()[0][:120]})") \
                from None
    allowed = torch.serialization.safe_globals(safe_globals) if safe_globals else contextlib.nullcontext()
    try:
        with allowed:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for foreign or broken files
        raise UnreadableCheckpoint(path, _reason(err)) from None


def check_checkpoint_file(path: str | Path) -> None:
    """Read ``path`` the safe way before a library that loads it itself (open_clip, timm) does.

    Those libraries load local files with their own ``torch.load`` call; reading the file first with
    :func:`load_tensors` turns a foreign pickle or a damaged file into one line naming it, before they see it.
    """
    load_tensors(path)
