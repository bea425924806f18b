"""Two "machines" on one host (`accelerate launch --num_machines 2 --machine_rank 0|1`, CPU, gloo) train like
one process: the multi-node launch documented in docs/cluster.md, with the rendezvous on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synclone import load_model
from synclone.data.fashion_mnist import load_fashion_mnist

ARGS = ["model.arch=synclone_cnn_tiny", "data.real_per_class=30", "optim.steps=40", "optim.warmup_steps=4",
        "data.val_max=200", "aug.hflip=false", "aug.crop_pad=0", "threads=1", "--quiet"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_match_one_process(tmp_path):
    bin_dir = Path(sys.executable).parent
    one = subprocess.run([str(bin_dir / "synclone"), "train", f"output={tmp_path / 'one'}", *ARGS], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    port = str(_free_port())
    procs = [subprocess.Popen([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
                               "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                               "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
                               "-m", "synclone.cli", "train", f"output={tmp_path / 'two'}", *ARGS],
                              env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["processes"] == 1 and m2["processes"] == 2
    # The same global batches and optimiser; BatchNorm statistics are per half batch, so close, not bitwise.
    assert abs(m1["history"][-1]["val_acc"] - m2["history"][-1]["val_acc"]) <= 0.05
    x = load_fashion_mnist("test").images[:1000].float() / 255
    with torch.no_grad():
        p1 = load_model(tmp_path / "one" / "model_last")(x).argmax(1)
        p2 = load_model(tmp_path / "two" / "model_last")(x).argmax(1)
    assert float((p1 == p2).float().mean()) >= 0.85
