"""The field's augmentations (timm presets, Mixup / CutMix, label smoothing) and the DataLoader data path:
each preset is timm's transform, mixed targets are distributions, killed-and-resumed runs equal uninterrupted
ones with mixing and worker processes, every image is seen once per epoch across processes and workers,
unreadable images are skipped and counted, and too many workers are clamped."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from _imagenet_standin import write_standin
from synclone.data.sources import resolve_dataset
from synclone.errors import UserError
from synclone.train import TrainConfig, train
from synclone.train.augment import BatchMix, resolve
from synclone.train.batches import CyclingSampler
from synclone.train.config import AugConfig
from synclone.train.loader import StepBatches, TrainItems, clamp_workers, make_loader
from synclone.train.loop import CKPT
from synclone.util.seeds import mix_seed

# What each preset means, written out as timm arguments: a change to a preset must change this table.
GOLDEN = {
    "imagenet_resnet": ({}, {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": 0.4,
                             "interpolation": "bilinear"}),
    "ffcv_rn50": ({"progressive": False}, {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5,
                                          "color_jitter": None, "interpolation": "bilinear"}),
    "randaugment": ({"auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25},
                    {"scale": (0.08, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": 0.4,
                     "interpolation": "bilinear", "auto_augment": "rand-m9-mstd0.5", "re_prob": 0.25}),
    "augmix": ({"auto_augment": "augmix-m5-w3-d1", "rrc_scale": (0.25, 1.0)},
               {"scale": (0.25, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5, "color_jitter": 0.4,
                "interpolation": "bilinear", "auto_augment": "augmix-m5-w3-d1"}),
}


@pytest.fixture(scope="module")
def png_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("png")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return resolve_dataset(str(root), image_size=48)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_each_preset_is_timms_transform(name, png_set):
    extra, kwargs = GOLDEN[name]
    preset = name if name in ("imagenet_resnet", "ffcv_rn50") else "imagenet_resnet"
    aug = resolve(AugConfig(preset=preset, **extra))
    items = TrainItems([png_set], aug, seed=5, size=48, total_steps=100)
    x, y, key, err = items[(3, 7, 0, 2)]
    assert err is None and y == int(png_set.labels[2]) and x.shape == (3, 48, 48)
    # uint8 through the workers (the loop scales it); float in [0, 1] when random erasing needs timm's floats
    assert x.dtype == (torch.float32 if kwargs.get("re_prob") else torch.uint8)
    x = x.float().div(255) if x.dtype == torch.uint8 else x
    ref_tf = timm.data.create_transform(input_size=(3, 48, 48), is_training=True, mean=(0, 0, 0), std=(1, 1, 1),
                                        **kwargs)
    seed = mix_seed(5, 3, 7, 0x7F)  # the per-image seed: (run seed, step, slot in the global batch)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    with Image.open(png_set.paths[2]) as im:
        ref = ref_tf(im.convert("RGB"))
    assert torch.equal(x, ref)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # another step draws another crop; the same key the same one, whatever process asks
    assert not torch.equal(items[(4, 7, 0, 2)][0], items[(3, 7, 0, 2)][0])
    assert torch.equal(items[(3, 7, 0, 2)][0], items[(3, 7, 0, 2)][0])


def test_ffcv_preset_resizes_progressively():
    aug = resolve(AugConfig(preset="ffcv_rn50"))
    from synclone.train.augment import resolution_at

    sizes = [resolution_at(aug, 224, s, 88) for s in range(89)]
    assert sizes[0] == sizes[65] == 160 and sizes[76] == sizes[88] == 192  # FFCV's rn50 ramp, epochs 65..76
    assert sorted(sizes) == sizes and set(sizes) == {160, 192}  # multiples of 32 in between
    assert aug.label_smoothing == 0.1 and aug.color_jitter == 0.0
    assert resolve(AugConfig(preset="simple")).label_smoothing == 0.0  # the demo keeps its loss


def test_mixup_cutmix_targets_are_distributions():
    aug = resolve(AugConfig(mixup=0.2, cutmix=1.0, label_smoothing=0.1))
    mix = BatchMix(aug, 10)
    x, y = torch.rand(8, 1, 12, 12), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    seen_lams = set()
    for seed in range(6):
        xa, ta = mix(x, y, seed)
        xb, tb = mix(x, y, seed)
        assert torch.equal(xa, xb) and torch.equal(ta, tb)  # a pure function of the seed
        assert torch.allclose(ta.sum(1), torch.ones(8)) and float(ta.min()) > 0
        # all mass beyond smoothing sits on the image's own class and its partner's (the flipped batch)
        own = ta[torch.arange(8), y] + ta[torch.arange(8), y.flip(0)]
        assert torch.allclose(own, torch.full((8,), 1 - 0.1 * 8 / 10), atol=1e-6)
        seen_lams.add(round(float(ta[0, 0]), 4))
    assert len(seen_lams) > 1
    with pytest.raises(UserError, match="even batch"):
        mix(x[:7], y[:7], 0)


KILL_SCRIPT = """
import json, os, signal, sys
import synclone.train.augment as augs
import synclone.train.loop as loop
from synclone.train import TrainConfig
cfg = TrainConfig.model_validate(json.loads(sys.argv[1]))
kill_at, calls, real = int(sys.argv[2]), [0], augs.BatchMix.__call__
def call(self, *a, **k):
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final save: a real crash
    calls[0] += 1
    return real(self, *a, **k)
augs.BatchMix.__call__ = call
loop.train(cfg, progress=False)
"""


def _kill_and_resume(cfg: TrainConfig, tmp_path: Path, kill_at: int, ckpt_step: int) -> None:
    out_a = tmp_path / "a"
    train(cfg.model_copy(update={"output": str(out_a)}), progress=False)
    cfg_b = cfg.model_copy(update={"output": str(tmp_path / "b")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg_b.model_dump(mode="json")),
                           str(kill_at)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert torch.load(tmp_path / "b" / CKPT, weights_only=True)["step"] == ckpt_step
    train(cfg_b, resume=True, progress=False)
    from safetensors.torch import load_file

    for sub in ("model", "model_last"):
        wa, wb = load_file(str(out_a / sub / "model.safetensors")), load_file(str(tmp_path / "b" / sub /
                                                                                    "model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), sub
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (out_a, tmp_path / "b"))
    assert [h["loss"] for h in ma["history"]] == [h["loss"] for h in mb["history"]]


@pytest.mark.slow  # ~25 s alone, a minute on a loaded machine: two runs and a killed subprocess
def test_mixup_cutmix_run_killed_and_resumed_equals_uninterrupted(tmp_path):
    """In memory (the batched simple preset) with Mixup and CutMix on: kill -9 at step 17, resume from 14."""
    cfg = TrainConfig.model_validate({
        "threads": 1, "model": {"arch": "synclone_cnn_tiny"}, "data": {"real_per_class": 20, "val_max": 100},
        "optim": {"steps": 20, "batch_size": 16, "warmup_steps": 3},
        "aug": {"mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1}, "checkpoint_every": 7, "eval_every": 10})
    _kill_and_resume(cfg, tmp_path, kill_at=17, ckpt_step=14)


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("standin") / "in", classes=4, per_class=10, size=(64, 48))


@pytest.mark.slow
def test_timm_preset_with_workers_killed_mid_epoch_resumes_exactly(jpeg_folder, tmp_path):
    """Files through 2 DataLoader worker processes, RandAugment + Mixup/CutMix: kill -9 mid-epoch, resume."""
    cfg = TrainConfig.model_validate({
        "threads": 1, "model": {"arch": "synclone_cnn_tiny"},
        "data": {"real": str(jpeg_folder), "image_size": 32, "workers": 2, "val_max": 20},
        "optim": {"steps": 10, "batch_size": 8, "warmup_steps": 2},
        "aug": {"preset": "imagenet_resnet", "auto_augment": "rand-m9-mstd0.5", "mixup": 0.2, "cutmix": 1.0},
        "checkpoint_every": 3, "eval_every": 5})
    _kill_and_resume(cfg, tmp_path, kill_at=7, ckpt_step=6)  # 36 training images: epoch 2 begins at step 4


def test_two_processes_with_two_workers_see_every_image_once_per_epoch():
    class Keys(torch.utils.data.Dataset):
        def __getitem__(self, key):
            return torch.zeros(1), key[3], key, None

    size, per_step, steps = 40, 8, 10  # 5 steps per epoch, 2 epochs
    seen = Counter()
    slots = Counter()
    for rank in range(2):
        loader = make_loader(Keys(), StepBatches([CyclingSampler(size, per_step, 3, 0)], 0, steps, rank, 2),
                             workers=2, prefetch=2, pin_memory=False)
        for step, (_, y, keys, _) in enumerate(loader):
            assert all(k[0] == step for k in keys) and len(keys) == per_step // 2
            seen.update((step // 5, int(i)) for i in y)
            slots.update((k[0], k[1]) for k in keys)
    assert sorted(seen) == [(e, i) for e in range(2) for i in range(size)] and set(seen.values()) == {1}
    assert set(slots.values()) == {1} and len(slots) == steps * per_step  # every slot of every step once


def test_unreadable_images_are_skipped_counted_and_limited(jpeg_folder, tmp_path):
    """A truncated training image and an empty image: skipped, listed and counted; one too many
    for data.max_unreadable stops the run with one line naming the count, the share, the limit and the list."""
    import shutil

    from synclone.train.loop import load_sources

    folder = tmp_path / "f"
    shutil.copytree(jpeg_folder, folder)
    cfg = TrainConfig.model_validate({
        "output": str(tmp_path / "run"), "threads": 1, "model": {"arch": "synclone_cnn_tiny"},
        "data": {"real": str(folder), "image_size": 24, "workers": 1, "max_unreadable": 2},
        "optim": {"steps": 5, "batch_size": 8, "warmup_steps": 1}})
    src = load_sources(cfg)
    in_train, in_val = src.real.paths[3], src.val.paths[1]
    good = in_train.read_bytes()
    in_train.write_bytes(good[: len(good) // 2])  # truncated
    in_val.write_bytes(b"")  # empty
    train(cfg, progress=False)  # 40 images a step of 8: every training image is drawn
    listed = (tmp_path / "run" / "skipped_images.txt").read_text().splitlines()
    assert any(line.startswith("step ") and in_train.name in line and "truncated" in line for line in listed)
    # The empty file is left out when the folder is read (before the split), and listed from there.
    assert any(line.startswith("read") and in_val.stem in line and "empty" in line for line in listed)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_images"] == 2 == len(listed)
    with pytest.raises(UserError) as err:
        train(cfg.model_copy(update={"output": str(tmp_path / "run2"),
                                     "data": cfg.data.model_copy(update={"max_unreadable": 1})}), progress=False)
    msg = str(err.value)
    assert "2 of 40 training images could not be read (5%), more than data.max_unreadable=1 allows (1)" in msg
    assert str(tmp_path / "run2" / "skipped_images.txt") in msg and "\n" not in msg
    # The old name of the setting still reads (configs written before it was shared by every stage).
    assert TrainConfig.model_validate({"data": {"max_bad_images": 3}}).data.max_unreadable == 3


def test_bad_settings_are_clear(tmp_path):
    with pytest.warns(UserWarning, match="more than the"):
        assert clamp_workers(10_000) == len(os.sched_getaffinity(0))
    base = {"output": str(tmp_path / "r"), "threads": 1, "model": {"arch": "synclone_cnn_tiny"},
            "data": {"real_per_class": 5}, "optim": {"steps": 2, "batch_size": 7}}
    with pytest.raises(UserError, match="even batch"):
        train(TrainConfig.model_validate({**base, "aug": {"mixup": 0.2}}), progress=False)
    with pytest.raises(UserError, match="disagree"):
        resolve(AugConfig(label_smoothing=0.1), 0.2)
    with pytest.raises(UserError, match="per-image preset"):
        resolve(AugConfig(auto_augment="rand-m9-mstd0.5"))


def test_cyclic_schedule_is_ffcvs(tmp_path, monkeypatch):
    """optim.sched=cyclic: linear from 1e-4 x lr to lr over the warm-up, then linear to 0 at the last step
    (FFCV's get_cyclic_lr, which Bansal & Grover's code uses), stepped per step."""
    import timm.scheduler

    made = []
    real = timm.scheduler.create_scheduler_v2

    def capture(*a, **k):
        out = real(*a, **k)
        made.append(out[0])
        return out

    monkeypatch.setattr(timm.scheduler, "create_scheduler_v2", capture)
    cfg = TrainConfig.model_validate({
        "output": str(tmp_path / "c"), "threads": 1, "model": {"arch": "synclone_cnn_tiny"},
        "data": {"real_per_class": 3, "val_max": 10},
        "optim": {"steps": 10, "batch_size": 8, "warmup_steps": 3, "lr": 0.5, "sched": "cyclic", "opt": "momentum"}})
    train(cfg, progress=False)
    lrs = [made[0]._get_lr(t)[0] for t in range(11)]
    assert np.allclose(lrs, np.interp(np.arange(11), [0, 3, 10], [0.5e-4, 0.5, 0.0]), rtol=0, atol=1e-12)


def test_batches_do_not_depend_on_the_worker_count(png_set):
    aug = resolve(AugConfig(preset="imagenet_resnet", auto_augment="rand-m9-mstd0.5"))
    runs = []
    for workers in (0, 2):
        items = TrainItems([png_set], aug, seed=1, size=32, total_steps=4)
        batches = StepBatches([CyclingSampler(len(png_set), 6, 1, 0)], 1, 4)  # resumed at step 1
        runs.append([(x, y) for x, y, _, _ in make_loader(items, batches, workers, 2, pin_memory=False)])
    assert len(runs[0]) == len(runs[1]) == 3
    for (xa, ya), (xb, yb) in zip(*runs, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
