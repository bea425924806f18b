"""One writer per output folder: an advisory lock file that names its holder.

Two runs writing one folder (two ``synclone generate`` with different seeds, a train started twice) would mix
their files and could leave a dataset that claims one config over the images of another. Every command that
writes an output folder therefore holds ``<folder>/.synclone.lock`` while it runs:

* the lock is an ``fcntl.flock`` on that file, so the kernel releases it when the holder dies, however it dies;
* the file holds the holder's pid, host, command and start time, so a refused run says who holds the folder;
* a second writer is refused at once (no waiting) with one line naming the holder: exit code 2;
* a lock file left by a process that no longer holds it (killed with ``kill -9``, a lost host) is taken over
  with a note on stderr;
* the processes of one ``accelerate launch`` / ``torchrun`` (``WORLD_SIZE`` > 1) are one writer: rank 0 holds the
  lock for the group and the other ranks, which only write under rank 0's coordination, do not take it;
* the lock is reentrant within a process (``synclone run`` holds the recipe folder while its stages run).

The lock file is removed when the holder releases it; a folder the lock itself created is removed again when the
run leaves it empty (a config refused before any work leaves no trace).
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from synclone.errors import UserError

LOCK_NAME = ".synclone.lock"
# A holder writes its name just after taking the lock; a writer refused in that gap waits this long for the name.
NAME_WAIT_S = 2.0
_held: dict[Path, int] = {}  # folder -> nesting depth in this process


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``."""
    return Path(folder) / LOCK_NAME


def _launch_group() -> tuple[str, bool]:
    """(group id, is a secondary rank) for a process of a multi-process launch; ("", False) otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        world = 1
    if world <= 1:
        return "", False
    group = os.environ.get("TORCHELASTIC_RUN_ID") or (
        f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}")
    return f"{socket.gethostname()}/{group}", os.environ.get("RANK", "0") not in ("", "0")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 1 << 16)
        holder = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _wait_for_holder(fd: int) -> dict:
    """The holder's record from the locked file ``fd``, waiting up to :data:`NAME_WAIT_S` for it to be written.

    Two runs started together race: the loser can find the lock taken an instant before the winner has written its
    name (seen on a fast machine), and would then refuse without saying who holds the folder.
    """
    deadline = time.monotonic() + NAME_WAIT_S
    while not (holder := _read_holder(fd)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return holder


def describe_holder(holder: dict) -> str:
    """``pid 123 on host h ('synclone generate ...', since 2026-...)`` from a lock file's contents."""
    if not holder:
        return "a process that has not written its name yet"
    command = str(holder.get("command", "?"))
    if len(command) > 120:
        command = command[:117] + "..."
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} ('{command}', "
            f"since {holder.get('started', '?')})")


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name or "python", *sys.argv[1:]]) if sys.argv else "python"


def _acquire(folder: Path, command: str) -> int:
    """Open, lock and fill the lock file of ``folder``; returns its descriptor or raises UserError."""
    path = lock_path(folder)
    host = socket.gethostname()
    group, _ = _launch_group()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot create the lock file in output folder '{folder}' ({err.strerror}); choose a "
                            "writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise UserError(f"cannot lock output folder '{folder}' ({err.strerror}); the file system may not "
                                "support locks: use a local folder") from None
            holder = _wait_for_holder(fd)
            os.close(fd)
            raise UserError(f"output folder '{folder}' is in use by another synclone run: {describe_holder(holder)}; "
                            "wait for it to finish, or choose another output folder") from None
        # The holder before us may have removed the file between our open and our lock: lock the file that is
        # there now, not an unlinked one.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        break
    old = _read_holder(fd)
    if old:  # the flock is free, so whoever wrote this no longer holds it (killed before it could clean up)
        pid = old.get("pid")
        state = ("no longer running" if old.get("host") == host and isinstance(pid, int) and not _pid_alive(pid)
                 else "no longer holding it")
        print(f"note: taking over the lock of output folder '{folder}' left by {describe_holder(old)}, {state}",
              file=sys.stderr, flush=True)
    info = {"pid": os.getpid(), "host": host, "command": command,
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "group": group}
    data = (json.dumps(info) + "\n").encode("utf-8")
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return fd


@contextmanager
def output_lock(folder: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold the advisory lock of output folder ``folder`` (created if missing) for the block.

    A second writer gets a :class:`UserError` naming the holder at once. ``command`` is recorded for that
    message (default: this process's command line). Yields the folder.
    """
    folder = Path(folder)
    key = folder.resolve()
    _, secondary = _launch_group()
    if secondary or key in _held:  # another rank of this launch holds it, or this process already does
        _held[key] = _held.get(key, 0) + 1
        try:
            yield folder
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    if folder.exists() and not folder.is_dir():
        raise UserError(f"output '{folder}' is a file, not a folder; choose a folder")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder '{folder}' ({err.strerror}); choose a writable folder") \
            from None
    try:
        fd = _acquire(folder, command or _command())
    except BaseException:
        if created:
            _remove_if_empty(folder)
        raise
    _held[key] = 1
    try:
        yield folder
    finally:
        del _held[key]
        try:
            lock_path(folder).unlink(missing_ok=True)  # while still locked: the next writer locks a fresh file
        finally:
            os.close(fd)
        if created:
            _remove_if_empty(folder)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
