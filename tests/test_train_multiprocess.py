"""Two CPU processes under `accelerate launch` train like one process (each takes half of every batch)."""

from __future__ import annotations

import json
import os
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


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    bin_dir = Path(sys.executable).parent
    one = subprocess.run([str(bin_dir / "synclone"), "train", f"output={tmp_path / 'one'}", *ARGS], env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "synclone.cli", "train", f"output={tmp_path / 'two'}", *ARGS],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count(str(tmp_path / "two" / "model")) == 1  # only the main process reports
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m1["processes"] == 1 and m2["processes"] == 2
    # Same global batches and optimiser; only BatchNorm statistics differ (computed per half batch), so the
    # two runs agree closely but not bit for bit.
    assert abs(m1["history"][-1]["val_acc"] - m2["history"][-1]["val_acc"]) <= 0.05
    test = load_fashion_mnist("test")
    x = test.images[:1000].float() / 255
    with torch.no_grad():
        p1 = load_model(tmp_path / "one" / "model_last")(x).argmax(1)
        p2 = load_model(tmp_path / "two" / "model_last")(x).argmax(1)
    assert float((p1 == p2).float().mean()) >= 0.85
