"""Interrupt a run with kill -9 and resume it; shard a run over two processes with accelerate launch.

Both must give exactly the dataset an uninterrupted single-process run gives: the same PNG bytes, the
same metadata.jsonl and dataset.json. Every run uses one torch thread per process (PyTorch's CPU
kernels may round differently with another thread count, which could flip a pixel by one level).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from _tiny_pipelines import file_hashes, gen_config, one_torch_thread, tiny_sd  # noqa: F401
from synclone.generate import generate
from synclone.generate.writer import METADATA, SKIPPED, ledger_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd() -> Path:
    return tiny_sd()

# Enough images that the killed run is still busy when the kill comes; fewer for the two-process run.
IMAGES_PER_CLASS = 40
IMAGES_PER_CLASS_SHARDED = 8


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _config(model: Path, out: Path, images_per_class: int = IMAGES_PER_CLASS):
    return gen_config(model, out, images_per_class=images_per_class, prompts={"strategy": "diverse"})


def _same_dataset(a: Path, b: Path, images: int) -> None:
    ha, hb = file_hashes(a), file_hashes(b)
    assert len(ha) == images
    assert ha == hb
    for name in (f"train/{METADATA}", SKIPPED, "dataset.json", "plan.jsonl"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert not list(b.glob("train/*/.*.tmp*"))  # no leftovers of interrupted writes


def _ledger_ids(out: Path) -> list[int]:
    ids = []
    for p in ledger_files(out):
        for line in p.read_text().splitlines():
            try:
                ids.append(json.loads(line)["id"])
            except json.JSONDecodeError:
                pass
    return ids


def test_kill_9_mid_run_then_rerun_gives_the_same_dataset(sd, tmp_path):
    reference = generate(_config(sd, tmp_path / "reference"))  # the uninterrupted run
    out = tmp_path / "killed"
    cfg = _config(sd, out)
    cfg_file = _write_config(cfg, tmp_path / "gen.yaml")
    cmd = [sys.executable, "-m", "synclone.generate", str(cfg_file)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(_ledger_ids(out)) >= 15:  # images are being written: kill it now, mid-batch
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    made = len(_ledger_ids(out))
    assert 15 <= made < 3 * IMAGES_PER_CLASS
    assert not (out / "train" / METADATA).exists()
    # Rerun the same command (in this process: the same code path without another interpreter start).
    generate(cfg)
    ids = _ledger_ids(out)
    assert sorted(ids) == list(range(3 * IMAGES_PER_CLASS))  # nothing lost, nothing made twice
    _same_dataset(reference, out, 3 * IMAGES_PER_CLASS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three interpreters start (launcher + 2 workers): ~35 s on the shared 2-core machine
def test_two_processes_make_the_same_dataset_as_one(sd, tmp_path):
    reference = generate(_config(sd, tmp_path / "reference", IMAGES_PER_CLASS_SHARDED))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate's launcher is not installed next to this interpreter"
    out = tmp_path / "two"
    cfg_file = _write_config(_config(sd, out, IMAGES_PER_CLASS_SHARDED), tmp_path / "gen.yaml")
    # On a machine without GPUs, `--multi_gpu` makes accelerate start torchrun with gloo (MULTI_CPU); its
    # `--cpu` flag alone starts a single process unless run under mpirun.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(_free_port()), "-m", "synclone.generate", str(cfg_file)]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in ledger_files(out)) == ["ledger-00000.jsonl", "ledger-00001.jsonl"]
    for rank, p in enumerate(ledger_files(out)):
        ids = [json.loads(line)["id"] for line in p.read_text().splitlines()]
        assert ids == list(range(rank, 3 * IMAGES_PER_CLASS_SHARDED, 2))  # each process made its share, in order
    _same_dataset(reference, out, 3 * IMAGES_PER_CLASS_SHARDED)
