"""Two CPU processes under `accelerate launch` pre-train like one: the same loss curve and the same weights.

The encoder is a small ViT and the projection head has no BatchNorm, so nothing depends on how the
global batch is split (LayerNorm is per image); embeddings are gathered from both processes, so
negatives, the loss and the MoCo queue are those of the whole batch. What is left is float summation
order: a tolerance of 1e-4 on the loss.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from synclone.models import load_model

ARGS = ["model.arch=vit_tiny_patch16_224", "model.arch_kwargs.img_size=28", "model.arch_kwargs.patch_size=7",
        "model.arch_kwargs.depth=2", "model.arch_kwargs.embed_dim=32", "model.arch_kwargs.num_heads=2",
        "data.real_per_class=20", "data.val_max=100", "optim.steps=6", "optim.batch_size=16",
        "optim.warmup_steps=2", "eval_every=1", "ssl.proj_norm=none", "ssl.queue_size=64", "ssl.proj_dim=16",
        "threads=1", "--quiet"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "moco_v2"])
def test_two_processes_give_the_loss_curve_of_one(tmp_path, method):
    bin_dir = Path(sys.executable).parent
    args = [f"method={method}", *ARGS]
    one = subprocess.run([str(bin_dir / "synclone"), "train", "--kind", "pretrain", f"output={tmp_path / 'one'}",
                          *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "synclone.cli", "train", "--kind", "pretrain", f"output={tmp_path / 'two'}", *args],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    m1, m2 = (json.loads((tmp_path / o / "metrics.json").read_text()) for o in ("one", "two"))
    assert m1["processes"] == 1 and m2["processes"] == 2
    l1, l2 = [h["loss"] for h in m1["history"]], [h["loss"] for h in m2["history"]]
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    # Weights are compared through the features they give: Adam turns the float noise in gradients that are zero
    # in exact arithmetic (attention key biases, to which softmax is invariant) into small but visible updates.
    x = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    f1, f2 = (load_model(tmp_path / o / "model", allow_backbone=True).features(x) for o in ("one", "two"))
    assert torch.allclose(f1, f2, rtol=1e-3, atol=1e-4)
