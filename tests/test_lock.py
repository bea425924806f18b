"""The output-folder lock: one writer per folder, the holder named, stale locks taken over, launches as one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from synclone.errors import UserError
from synclone.util.lock import LOCK_NAME, output_lock


def _hold_in_child(folder, ready):
    """A child process that takes the lock of ``folder``, writes ``ready`` and sleeps until killed."""
    code = textwrap.dedent(f"""
        import pathlib, time
        from synclone.util.lock import output_lock
        with output_lock({str(folder)!r}, "synclone generate holder.yaml seed=1"):
            pathlib.Path({str(ready)!r}).write_text("x")
            time.sleep(60)
    """)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ})


def _wait_for(path, proc):
    import time

    for _ in range(2400):  # imports take seconds on a loaded machine
        if path.exists():
            return
        assert proc.poll() is None, "the holder process died"
        time.sleep(0.05)
    raise AssertionError("the holder never took the lock")


def test_second_writer_refused_naming_holder(tmp_path):
    folder, ready = tmp_path / "out", tmp_path / "ready"
    proc = _hold_in_child(folder, ready)
    try:
        _wait_for(ready, proc)
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
        assert holder["command"] == "synclone generate holder.yaml seed=1"
        with pytest.raises(UserError) as err, output_lock(folder, "second"):
            pass
        msg = str(err.value)
        assert "\n" not in msg and f"pid {proc.pid}" in msg and "synclone generate holder.yaml seed=1" in msg
        assert str(folder) in msg
    finally:
        proc.kill()
        proc.wait()
    # The kernel released the dead holder's lock; its file is left (kill -9) and is taken over with a note.
    assert (folder / LOCK_NAME).is_file()
    with output_lock(folder, "third"):
        assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_NAME).exists()


def _lock_unnamed_in_child(folder, ready, name_after_s):
    """A child that locks ``folder``'s lock file, writes ``ready``, and writes its name only after ``name_after_s``
    seconds (never when None): the gap between a holder's flock and its record, widened."""
    code = textwrap.dedent(f"""
        import fcntl, json, os, pathlib, time
        fd = os.open({str(folder / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        pathlib.Path({str(ready)!r}).write_text("x")
        if {name_after_s!r} is not None:
            time.sleep({name_after_s!r})
            os.pwrite(fd, json.dumps({{"pid": os.getpid(), "host": "h", "command": "slow starter"}}).encode(), 0)
        time.sleep(60)
    """)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ})


def test_a_writer_refused_before_the_holder_wrote_its_name_still_names_it(tmp_path):
    """Two runs started together: the loser can meet the lock in the instant before the winner has written its
    name (seen in CI on a fast machine); it waits for the name instead of refusing anonymously."""
    folder, ready = tmp_path / "out", tmp_path / "ready"
    folder.mkdir()
    proc = _lock_unnamed_in_child(folder, ready, name_after_s=0.5)
    try:
        _wait_for(ready, proc)
        with pytest.raises(UserError) as err, output_lock(folder, "second"):
            pass
        assert f"pid {proc.pid}" in str(err.value) and "slow starter" in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_a_holder_that_never_names_itself_is_refused_after_the_wait(tmp_path, monkeypatch):
    from synclone.util import lock

    monkeypatch.setattr(lock, "NAME_WAIT_S", 0.2)
    folder, ready = tmp_path / "out", tmp_path / "ready"
    folder.mkdir()
    proc = _lock_unnamed_in_child(folder, ready, name_after_s=None)
    try:
        _wait_for(ready, proc)
        with pytest.raises(UserError, match="in use by another synclone run: a process that has not written its "
                                            "name yet"), output_lock(folder, "second"):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_dead_pid_taken_over_with_note(tmp_path, capfd):
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (folder / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "old run",
                                                 "started": "2026-01-01T00:00:00+00:00"}))
    (folder / "keep.txt").write_text("earlier")
    with output_lock(folder, "new run"):
        pass
    err = capfd.readouterr().err
    assert f"taking over the lock of output folder '{folder}' left by pid {pid}" in err and "no longer running" in err
    assert (folder / "keep.txt").read_text() == "earlier" and not (folder / LOCK_NAME).exists()


def test_reentrant_and_leaves_no_trace(tmp_path):
    folder = tmp_path / "new" / "out"
    with output_lock(folder, "outer"):
        with output_lock(folder, "inner"):  # synclone run holding the recipe folder while a stage runs
            assert (folder / LOCK_NAME).is_file()
        assert (folder / LOCK_NAME).is_file()
    assert not folder.exists()  # the lock created it and the run wrote nothing: no trace
    folder.mkdir(parents=True)
    with pytest.raises(RuntimeError), output_lock(folder, "x"):
        (folder / "a").write_text("1")
        raise RuntimeError
    assert sorted(p.name for p in folder.iterdir()) == ["a"]


def test_ranks_of_one_launch_are_one_writer(tmp_path, monkeypatch):
    folder = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    with output_lock(folder, "rank 0"):
        holder = json.loads((folder / LOCK_NAME).read_text())
        assert holder["group"].endswith(":29500")
        monkeypatch.setenv("RANK", "1")  # the other rank of the same launch does not take the lock
        with output_lock(folder, "rank 1"):
            pass
        monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE")


def test_output_that_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"), output_lock(f):
        pass


@pytest.mark.parametrize("kind, args", [
    ("knn", ["backbone.kind=synclone", "backbone.name=cnn"]),
    ("pretrain", []),
    ("linear-probe", ["backbone.kind=synclone", "backbone.name=cnn"]),
])
def test_every_training_kind_refuses_a_folder_in_use(tmp_path, capsys, kind, args):
    from synclone.cli import main

    folder, ready = tmp_path / "out", tmp_path / "ready"
    proc = _hold_in_child(folder, ready)
    try:
        _wait_for(ready, proc)
        code = main(["train", "--kind", kind, f"output={folder}", *args])
        err = capsys.readouterr().err
        assert code == 2 and f"pid {proc.pid}" in err and "synclone generate holder.yaml" in err, err
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing was written
    finally:
        proc.kill()
        proc.wait()
