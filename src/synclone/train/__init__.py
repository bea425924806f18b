"""Training: one Accelerate loop for supervised training on real, synthetic or mixed data."""

from synclone.train.config import TrainConfig
from synclone.train.loop import train

__all__ = ["TrainConfig", "train"]
