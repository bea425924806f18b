"""The executor setting without a Ray cluster: parsing, resource checks, and bad addresses failing fast.

Nothing here starts Ray (the cluster tests are in ``test_ray_executor.py``, marked slow).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synclone.config import load_config
from synclone.curate import CurateConfig
from synclone.errors import UserError
from synclone.evaluate import EvaluateConfig
from synclone.generate import GenerateConfig
from synclone.util.executor import ExecutorConfig, check_resources, user_error_from

SRC = str(Path(__file__).parents[1] / "src")


def test_every_stage_takes_the_executor_section_and_overrides():
    g = load_config(GenerateConfig, None, ["executor.kind=ray", "executor.workers=4", "executor.address=auto"])
    assert g.executor.is_ray and g.executor.workers == 4 and g.executor.address == "auto"
    c = load_config(CurateConfig, None, ["input=a", "output=b", "executor.kind=ray", "executor.gpus_per_worker=1"])
    assert c.executor.gpus_per_worker == 1.0
    e = load_config(EvaluateConfig, None, ["executor.kind=ray", "executor.cpus_per_worker=2"])
    assert e.executor.cpus_per_worker == 2.0
    assert GenerateConfig().executor.kind == "local"  # the default stays today's behaviour
    with pytest.raises(UserError, match="executor.kind"):
        load_config(GenerateConfig, None, ["executor.kind=slurm"])
    with pytest.raises(UserError, match="unknown config key 'executor.nodes'"):
        load_config(GenerateConfig, None, ["executor.nodes=2"])


def test_the_executor_does_not_change_the_dataset_fingerprint():
    """Where images are made never changes them: a dataset started locally resumes on Ray and back."""
    local = GenerateConfig(labels=["a", "b"])
    ray = GenerateConfig(labels=["a", "b"], executor={"kind": "ray", "workers": 8})
    assert local.fingerprint() == ray.fingerprint()
    # ...and the fingerprint of configs written before the executor existed is unchanged (golden value).
    assert local.fingerprint() == "a0fa01b0ef4a5aae"


def test_resources_are_checked_with_the_numbers():
    two_nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert check_resources(ExecutorConfig(kind="ray", workers=2), {"CPU": 2.0}, two_nodes) == 0.0
    with pytest.raises(UserError, match=r"workers=3 needs 3 CPU\(s\) and 0 GPU\(s\) but the Ray cluster has 2 CPU"
                                        r"\(s\) and 0 GPU\(s\): use executor.workers=2 or fewer"):
        check_resources(ExecutorConfig(kind="ray", workers=3), {"CPU": 2.0}, two_nodes)
    with pytest.raises(UserError, match=r"a worker needs 2 CPU\(s\).*largest node .* has 1 CPU"):
        check_resources(ExecutorConfig(kind="ray", cpus_per_worker=2), {"CPU": 2.0}, two_nodes)
    gpus = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
    assert check_resources(ExecutorConfig(kind="ray", workers=4), {"CPU": 16.0, "GPU": 4.0}, gpus) == 1.0
    with pytest.raises(UserError, match=r"workers=5 needs 5 CPU\(s\) and 5 GPU\(s\).*4 GPU\(s\).*workers=4"):
        check_resources(ExecutorConfig(kind="ray", workers=5), {"CPU": 16.0, "GPU": 4.0}, gpus)


def test_a_worker_user_error_is_found_inside_ray_wrappers():
    inner = UserError("Ray worker on node 10.0.0.7 cannot load the model 'm': gone")

    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("task failed")
            self.cause = cause

    try:
        try:
            raise Wrapper(inner)
        except Wrapper as w:
            raise RuntimeError("dataset execution failed") from w
    except RuntimeError as err:
        assert user_error_from(err) is inner
    text = RuntimeError("ray::MapWorker ...\nsynclone.errors.UserError: bad thing on node x\n  more")
    assert str(user_error_from(text)) == "bad thing on node x"
    assert user_error_from(RuntimeError("unrelated")) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_with_nothing_behind_it_fails_fast():
    from synclone.util.executor import preflight

    port = _free_port()
    for addr in (f"127.0.0.1:{port}", f"ray://localhost:{port}"):
        with pytest.raises(UserError, match=f"executor.address '{addr}': nothing answers at"):
            preflight(ExecutorConfig(kind="ray", address=addr))
    with pytest.raises(UserError, match="is not auto, ray://HOST:PORT or HOST:PORT"):
        preflight(ExecutorConfig(kind="ray", address="my-head-node"))
    preflight(ExecutorConfig(kind="local", address="my-head-node"))  # only checked when Ray is used


def test_an_address_with_nothing_behind_it_ends_in_one_line_exit_2(tmp_path):
    """The command line, end to end: one line on stderr, exit code 2, well within 30 s."""
    addr = f"ray://127.0.0.1:{_free_port()}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "synclone.cli", "generate", "generator.backend=classcond",
           "generator.model=builtin:fashion_mnist", "images_per_class=1", f"output={tmp_path / 'out'}",
           "executor.kind=ray", f"executor.address={addr}"]
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    took = time.time() - t0
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and f"executor.address '{addr}': nothing answers" in lines[0], res.stderr
    assert took < 30
