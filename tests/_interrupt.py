"""Run the synclone CLI in a child process and SIGKILL it (and its children) at a chosen moment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable


def cli_until(argv: list[str], ready: Callable[[], bool], env: dict, timeout: float = 600) -> None:
    """Start ``python -m synclone.cli ARGV`` and kill its process group as soon as ``ready()`` holds.

    Fails when the command ends first (nothing was interrupted) or ``ready`` never holds within ``timeout``.
    """
    proc = subprocess.Popen([sys.executable, "-m", "synclone.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"`synclone {argv[0]}` finished before it could be interrupted")
            if time.time() - t0 > timeout:
                raise AssertionError("timed out waiting to interrupt")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
