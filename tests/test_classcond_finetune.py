"""Fine-tuning the built-in generator on a few real shots (``synclone generator train`` with ``init`` + ``data``)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _tiny_pipelines import one_torch_thread  # noqa: F401
from synclone.cli import main
from synclone.data import load_fashion_mnist
from synclone.generate.classcond_train import GeneratorTrainConfig, train_generator
from synclone.models.hub import builtin_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Two inverted Fashion-MNIST images of each of three classes (a shifted domain), by class name."""
    root = tmp_path_factory.mktemp("shots")
    fm = load_fashion_mnist("test")
    for c in (0, 3, 7):
        folder = root / fm.label_space.slugs[c]
        folder.mkdir()
        for i in (fm.labels == c).nonzero().flatten()[:2].tolist():
            Image.fromarray(255 - fm.images[i, 0].numpy()).save(folder / f"{i}.png")
    return root


def _cfg(shots, out, steps):
    return GeneratorTrainConfig(init="builtin:fashion_mnist", data=str(shots), out_dir=str(out),
                                optim={"steps": steps, "batch_size": 4, "lr": 1e-4, "warmup_steps": 0,
                                       "checkpoint_every": 2})


@pytest.mark.slow  # three short runs of the 2.5M-parameter generator: ~25 s on a loaded 2-core machine
def test_finetuning_starts_from_the_builtin_and_resumes_exactly(shots, tmp_path):
    base = load_file(str(builtin_generator("fashion_mnist") / WEIGHTS))
    whole = load_file(str(train_generator(_cfg(shots, tmp_path / "whole", 4), progress=False) / WEIGHTS))
    train_generator(_cfg(shots, tmp_path / "resumed", 2), progress=False)  # stopped after step 2
    resumed = load_file(str(train_generator(_cfg(shots, tmp_path / "resumed", 4), progress=False) / WEIGHTS))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # Four small steps from the built-in weights: moved, but close to where they started.
    diff = sum(float((whole[k] - base[k]).norm() ** 2) for k in base) ** 0.5
    norm = sum(float(base[k].norm() ** 2) for k in base) ** 0.5
    assert 0 < diff < 0.05 * norm


def test_finetuning_refuses_classes_the_generator_lacks(tmp_path, capsys):
    (tmp_path / "shots" / "zebra").mkdir(parents=True)
    Image.new("L", (28, 28)).save(tmp_path / "shots" / "zebra" / "a.png")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"init: builtin:fashion_mnist\ndata: {tmp_path / 'shots'}\nout_dir: {tmp_path / 'o'}\n")
    capsys.readouterr()
    assert main(["generator", "train", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "zebra" in err and "\n" not in err, err
