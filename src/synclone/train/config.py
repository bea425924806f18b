"""The training config: model, data (real / synthetic / mixed), optimisation, augmentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from synclone.config import StrictModel
from synclone.data.readable import max_unreadable_field
from synclone.errors import UserError


class ModelConfig(StrictModel):
    arch: str = "synclone_cnn_small"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = Field(None, description="a synclone model folder to start from (fine-tuning)")
    init_head: Literal["keep", "new"] = Field(
        "keep", description="new: a fresh head for the training data's classes on model.init's backbone (transfer)")
    freeze_steps: int = Field(0, ge=0, description="fine-tuning: steps at the start with the backbone frozen (lr 0)")
    mean: list[float] | None = None
    std: list[float] | None = None


class DataConfig(StrictModel):
    real: str | None = Field("fashion_mnist", description="built-in name or dataset folder; null for none")
    synthetic: str | None = Field(None, description="a synclone dataset folder; null for none")
    data_root: str | None = None
    real_per_class: int | None = Field(None, ge=1, description="images per class taken from the real source")
    synthetic_per_class: int | None = Field(None, ge=1)
    mix: Literal["concat", "ratio"] = "concat"
    synthetic_ratio: float = Field(0.5, description="share of synthetic images in every batch when mix=ratio")
    real_loss_weight: float | None = Field(
        None, description="few-shot: weight of the real batch's loss (the synthetic one gets 1 - w); needs mix=ratio")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="held out from each training source for selection")
    val_max: int | None = Field(5000, ge=1, description="cap on validation images (speed)")
    image_size: int | None = Field(
        None, ge=8, description="stream folders from disk at this size (resize + centre crop) instead of loading "
        "them into memory: ImageNet-sized data")
    workers: int | None = Field(
        None, ge=0, description="DataLoader worker processes decoding streamed images (default: from the CPU "
        "count, at most 8; 0 decodes in the training process)")
    prefetch: int = Field(4, ge=1, description="batches each worker prepares ahead")
    decoder: Literal["auto", "pillow", "torchvision"] = Field(
        "auto", description="JPEG decoder: auto/pillow (Pillow, with draft mode), torchvision (decode_jpeg)")
    max_unreadable: float = max_unreadable_field("training images")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not 0.0 <= self.synthetic_ratio <= 1.0:
            raise ValueError(f"synthetic_ratio must be in [0, 1], got {self.synthetic_ratio}")
        if self.real_loss_weight is not None and not 0.0 <= self.real_loss_weight <= 1.0:
            raise ValueError(f"real_loss_weight must be in [0, 1], got {self.real_loss_weight}")
        if self.real is None and self.synthetic is None:
            raise ValueError("give data.real, data.synthetic or both")
        if self.mix == "ratio" and (self.real is None or self.synthetic is None):
            raise ValueError("mix=ratio needs both data.real and data.synthetic")
        if self.real_loss_weight is not None and self.mix != "ratio":
            # Under concat a batch has no fixed real/synthetic split to weight; ignoring the setting would be silent.
            raise ValueError("real_loss_weight needs mix=ratio (a fixed real/synthetic share in every batch)")
        return self


class OptimConfig(StrictModel):
    opt: str = "adamw"
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    epochs: int = Field(4, ge=1, le=1_000_000)
    steps: int | None = Field(None, ge=1, le=10**9,
                              description="total steps; overrides epochs (equal budgets across runs)")
    batch_size: int = Field(128, ge=1, le=65_536)
    sched: str = Field("cosine", description="a timm schedule (cosine, step, poly, ...) or cyclic (FFCV's: linear "
                       "warm-up from 1e-4 x lr, then linear to 0)")
    warmup_steps: int = Field(100, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)
    layer_decay: float | None = Field(None, gt=0, le=1, description="layer-wise lr decay (fine-tuning), timm's")


class ProgressiveConfig(StrictModel):
    """Progressive resizing as FFCV's ResNet recipes: ``min_res`` until ``start_ramp``, then a linear ramp (in
    steps of 32 px) to ``max_res`` at ``end_ramp``; ramps are fractions of the run's steps."""

    min_res: int = Field(160, ge=8)
    max_res: int = Field(192, ge=8)
    start_ramp: float = Field(65 / 88, ge=0, le=1)
    end_ramp: float = Field(76 / 88, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> ProgressiveConfig:
        if self.min_res > self.max_res or self.start_ramp > self.end_ramp:
            raise ValueError("progressive needs min_res <= max_res and start_ramp <= end_ramp")
        return self


class AugConfig(StrictModel):
    """Training augmentation; one shape for the in-memory (batched tensor) and the file (per-image timm) paths.

    ``preset`` fills every field left unset (``null``); see ``synclone.train.augment.PRESETS``. ``simple`` is
    a batched random translation + flip (small in-memory images, the demo); ``imagenet_resnet`` and
    ``ffcv_rn50`` build ``timm.data.create_transform`` per image. Mixup / CutMix (``timm.data.Mixup``) and
    label smoothing work with every preset.
    """

    preset: Literal["simple", "imagenet_resnet", "ffcv_rn50"] = "simple"
    hflip: bool = True
    crop_pad: int = Field(2, ge=0, description="simple: random translation by up to this many pixels (pad + crop)")
    train_size: int | None = Field(None, ge=8, description="timm presets: training crop size (default "
                                   "data.image_size; the model is still evaluated at data.image_size)")
    rrc_scale: tuple[float, float] | None = Field(None, description="RandomResizedCrop area range")
    rrc_ratio: tuple[float, float] | None = Field(None, description="RandomResizedCrop aspect-ratio range")
    color_jitter: float | None = Field(None, ge=0)
    auto_augment: str | None = Field(None, description="timm policy string, e.g. rand-m9-mstd0.5, trivialaugment, "
                                     "augmix-m5-w3-d1 (AugMix)")
    interpolation: str | None = None
    re_prob: float | None = Field(None, ge=0, le=1, description="random erasing probability")
    mixup: float | None = Field(None, ge=0, description="Mixup alpha (0: off)")
    cutmix: float | None = Field(None, ge=0, description="CutMix alpha (0: off)")
    mixup_prob: float = Field(1.0, ge=0, le=1, description="probability of mixing a batch")
    mixup_switch_prob: float = Field(0.5, ge=0, le=1, description="probability of CutMix when both are on")
    label_smoothing: float | None = Field(None, ge=0, lt=1, description="default: optim.label_smoothing")
    progressive: ProgressiveConfig | Literal[False] | None = Field(
        None, description="progressive resizing (timm presets); false turns off the preset's")


class TrainConfig(StrictModel):
    """Everything ``synclone train`` needs; load from YAML with dotted overrides."""

    output: str = "runs/train"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    aug: AugConfig = Field(default_factory=AugConfig)
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    eval_every: int | None = Field(
        None, ge=1, description="steps between validations (default: once per epoch, at most 50 per run)")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    cpu: bool = False
    log_with: Literal["none", "tensorboard"] = "none"
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")

    def budget_key(self) -> dict:
        """The settings a resumed run must share with the checkpoint it resumes."""
        d = self.model_dump(mode="json")
        for k in ("output", "checkpoint_every", "eval_every", "log_with", "threads"):
            d.pop(k, None)
        for k in ("workers", "prefetch", "max_unreadable"):  # how images are loaded, not which pixels
            d["data"].pop(k, None)
        return d


def check_ratio(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} must be in [0, 1], got {value}")
