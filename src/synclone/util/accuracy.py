"""Top-1 accuracy: the one definition every trainer, probe and report figure uses."""

from __future__ import annotations

import torch


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax over the last dimension equals the label; NaN for no rows."""
    if not len(labels):
        return float("nan")
    return float((logits.argmax(-1) == labels).float().mean())
