"""The training config: model, data (real / synthetic / mixed), optimisation, augmentation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from synclone.config import StrictModel
from synclone.errors import UserError


class ModelConfig(StrictModel):
    arch: str = "synclone_cnn_small"
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = Field(None, description="a synclone model folder to start from (fine-tuning)")
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
    sched: str = "cosine"
    warmup_steps: int = Field(100, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)


class AugConfig(StrictModel):
    hflip: bool = True
    crop_pad: int = Field(2, ge=0, description="random translation by up to this many pixels (pad + crop)")


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
        return d


def check_ratio(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{name} must be in [0, 1], got {value}")
