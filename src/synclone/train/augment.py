"""The field's training augmentations, from timm, behind one config shape (``aug:`` of the train config).

Presets fill every field the config leaves ``null``:

=================  ===========================================================================================
preset             what it is
=================  ===========================================================================================
``simple``         batched random translation (``crop_pad``) + horizontal flip on whole tensors
                   (``train.batches.augment``): small in-memory images, the demo
``imagenet_resnet`` timm's ImageNet training transform (``timm.data.create_transform(is_training=True)``
                   defaults): RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3), bilinear, flip, colour
                   jitter 0.4; label smoothing 0.1 (torchvision's ResNet-50 "new recipe" and timm's scripts)
``ffcv_rn50``      FFCV's ResNet-50 ImageNet configs (``rn50_configs/rn50_*_epochs.yaml``): RandomResizedCrop
                   (0.08, 1) + flip only, label smoothing 0.1, progressive resizing 160 -> 192 px between
                   65/88 and 76/88 of training
=================  ===========================================================================================

Every random choice is a pure function of (seed, step, slot in the global batch): the per-image transform
runs under :func:`seeded` with ``mix_seed(seed, step, slot)`` and Mixup / CutMix under the step's seed, so a
run resumed at step k replays exactly what the uninterrupted run did, whatever the worker count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from synclone.errors import UserError
from synclone.train.config import AugConfig, ProgressiveConfig

PRESETS: dict[str, dict] = {
    "simple": {"color_jitter": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": None},
    "imagenet_resnet": {"rrc_scale": (0.08, 1.0), "rrc_ratio": (3 / 4, 4 / 3), "color_jitter": 0.4,
                        "interpolation": "bilinear", "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0,
                        "label_smoothing": 0.1},
    "ffcv_rn50": {"rrc_scale": (0.08, 1.0), "rrc_ratio": (3 / 4, 4 / 3), "color_jitter": 0.0,
                  "interpolation": "bilinear", "re_prob": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1,
                  "progressive": ProgressiveConfig()},
}


@dataclass(frozen=True)
class Aug:
    """An ``AugConfig`` with the preset's values filled in (every field set)."""

    preset: str
    hflip: bool
    crop_pad: int
    train_size: int | None
    rrc_scale: tuple[float, float]
    rrc_ratio: tuple[float, float]
    color_jitter: float
    auto_augment: str | None
    interpolation: str
    re_prob: float
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_switch_prob: float
    label_smoothing: float
    progressive: ProgressiveConfig | None

    @property
    def per_image(self) -> bool:
        """True for the timm presets (a transform per image, in the data loader)."""
        return self.preset != "simple"

    @property
    def mixing(self) -> bool:
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0


def resolve(aug: AugConfig, optim_label_smoothing: float = 0.0) -> Aug:
    """The effective augmentation: config values, then the preset's, then the defaults of ``imagenet_resnet``."""
    base = {**PRESETS["imagenet_resnet"], "progressive": None, **PRESETS[aug.preset]}
    given = aug.model_dump(exclude_none=True)
    given.pop("progressive", None)
    progressive = base.get("progressive") if aug.progressive is None else (aug.progressive or None)
    d = {**base, **given, "progressive": progressive}
    if aug.label_smoothing is not None and optim_label_smoothing and aug.label_smoothing != optim_label_smoothing:
        raise UserError(f"aug.label_smoothing ({aug.label_smoothing}) and optim.label_smoothing "
                        f"({optim_label_smoothing}) disagree; set only one")
    if aug.label_smoothing is None:
        d["label_smoothing"] = optim_label_smoothing or (base["label_smoothing"] or 0.0)
    d["auto_augment"] = aug.auto_augment
    if aug.preset == "simple" and (aug.auto_augment or aug.rrc_scale or progressive or aug.re_prob):
        raise UserError("aug.preset simple is a batched translation + flip; auto_augment, rrc_scale, re_prob and "
                        "progressive need a per-image preset (imagenet_resnet or ffcv_rn50)")
    return Aug(preset=aug.preset, hflip=d["hflip"], crop_pad=d["crop_pad"], train_size=d.get("train_size"),
               rrc_scale=tuple(d["rrc_scale"]), rrc_ratio=tuple(d["rrc_ratio"]), color_jitter=float(d["color_jitter"]),
               auto_augment=d["auto_augment"], interpolation=d["interpolation"], re_prob=float(d["re_prob"]),
               mixup=float(d["mixup"]), cutmix=float(d["cutmix"]), mixup_prob=d["mixup_prob"],
               mixup_switch_prob=d["mixup_switch_prob"], label_smoothing=float(d["label_smoothing"]),
               progressive=d["progressive"])


def timm_kwargs(aug: Aug, size: int) -> dict:
    """The ``timm.data.create_transform`` arguments of a per-image preset at ``size``.

    Without random erasing the transform ends in uint8 pixels (``normalize=False``): a quarter of the bytes
    through the workers' shared memory, and the loop scales them to [0, 1] (synclone models normalise
    inside). Random erasing needs timm's float output, which normalisation by mean 0 / std 1 keeps in [0, 1].
    """
    kw = {"input_size": (3, size, size), "is_training": True, "scale": aug.rrc_scale, "ratio": aug.rrc_ratio,
          "hflip": 0.5 if aug.hflip else 0.0, "color_jitter": aug.color_jitter or None,
          "auto_augment": aug.auto_augment, "interpolation": aug.interpolation, "re_prob": aug.re_prob}
    if aug.re_prob > 0:
        return {**kw, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    return {**kw, "normalize": False}


def build_transform(aug: Aug, size: int):
    """timm's training transform for a per-image preset: PIL image in, uint8 tensor out (float in [0, 1] with
    random erasing)."""
    import timm.data

    try:
        return timm.data.create_transform(**timm_kwargs(aug, size))
    except (AssertionError, ValueError, KeyError) as err:
        raise UserError(f"aug: timm cannot build this transform ({err}); check auto_augment / interpolation") from None


def resolution_at(aug: Aug, default: int, step: int, total_steps: int) -> int:
    """Training crop size at ``step``: FFCV's progressive schedule when set, else ``train_size`` or ``default``."""
    p = aug.progressive
    if p is None:
        return aug.train_size or default
    frac = step / max(1, total_steps)
    if frac <= p.start_ramp:
        return p.min_res
    if frac >= p.end_ramp:
        return p.max_res
    # FFCV: linear interpolation, rounded to a multiple of 32
    res = np.interp(frac, [p.start_ramp, p.end_ramp], [p.min_res, p.max_res])
    return int(round(res / 32)) * 32


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global CPU generators (timm's transforms draw from all three).

    In the training process their states are put back afterwards, so the caller's streams are untouched;
    a DataLoader worker owns its generators and skips the restore (it is the costly half). ``torch.manual_seed``
    would also seed every accelerator (~0.6 ms per image); the CPU generator is all the transforms use.
    """
    restore = torch.utils.data.get_worker_info() is None
    if restore:
        py, npy, th = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        if restore:
            random.setstate(py)
            np.random.set_state(npy)
            torch.default_generator.set_state(th)


class BatchMix:
    """Mixup / CutMix of one batch with ``timm.data.Mixup`` (batch mode); targets are soft labels that sum to 1."""

    def __init__(self, aug: Aug, num_classes: int) -> None:
        import timm.data

        self.mix = timm.data.Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob,
                                   switch_prob=aug.mixup_switch_prob, mode="batch",
                                   label_smoothing=aug.label_smoothing, num_classes=num_classes)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(x) % 2:
            raise UserError(f"mixup/cutmix need an even batch per process, got {len(x)}; change optim.batch_size")
        with seeded(seed):
            x, target = self.mix(x.clone(), y)
        return x, target


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: the loss of Mixup / CutMix targets."""
    from timm.loss import SoftTargetCrossEntropy

    return SoftTargetCrossEntropy()(logits, target)


