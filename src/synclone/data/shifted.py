"""A shifted real domain made from Fashion-MNIST by one fixed transform: the target of the adaptation miniature.

``invert`` maps every grey level v to 255 - v: white backgrounds and dark garments, a domain the built-in
generator (trained on black backgrounds) never made. :func:`make_shifted_domain` writes two dataset folders:

- ``shots/``: ``shots_per_class`` images per class from the training split (a seeded per-class subset),
  the few real images a user of the new domain would have;
- ``shifted_test/``: the test split (all of it, or ``test_per_class`` per class), transformed the same way.

Both are synclone dataset folders (``train/<slug>/<id>.png`` + metadata, ids ``fmnist-<split>-<index>``), so
fine-tuning, real guidance (``shots/train`` holds one sub-folder per class), training and evaluation read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from synclone.config import StrictModel
from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.data.folder import write_image_folder

TRANSFORMS = {"invert": lambda x: 255 - x}
SHOTS, TEST = "shots", "shifted_test"


class ShiftedDomainConfig(StrictModel):
    """The shifted domain: which transform, how many real shots per class, how much of the test split."""
    transform: Literal["invert"] = "invert"
    shots_per_class: int = Field(10, ge=1)
    test_per_class: int | None = Field(None, ge=1, description="default: the whole test split (1000 per class)")
    seed: int = 0
    data_root: str | None = None
    output: str = "runs/domain"


def shift_images(images: torch.Tensor, transform: str) -> torch.Tensor:
    """uint8 images under the named transform (see :data:`TRANSFORMS`)."""
    return TRANSFORMS[transform](images)


def make_shifted_domain(cfg: ShiftedDomainConfig) -> Path:
    """Write ``OUTPUT/shots`` and ``OUTPUT/shifted_test`` (see the module docstring); returns ``OUTPUT``."""
    out = Path(cfg.output)
    info = {"domain": {"source": "fashion_mnist", "transform": cfg.transform, "seed": cfg.seed}}
    train = load_fashion_mnist("train", data_root=cfg.data_root)
    for split, data, per_class in (("train", train, cfg.shots_per_class),
                                   ("test", load_fashion_mnist("test", data_root=cfg.data_root), cfg.test_per_class)):
        idx = torch.arange(len(data))
        if per_class is not None:
            g = torch.Generator().manual_seed(cfg.seed)
            order = torch.randperm(len(data), generator=g)
            idx = torch.cat([order[data.labels[order] == c][:per_class] for c in range(len(data.label_space))])
            idx = idx.sort().values
        write_image_folder(out / (SHOTS if split == "train" else TEST), shift_images(data.images[idx], cfg.transform),
                           data.labels[idx], data.label_space, ids=[f"fmnist-{split}-{int(i)}" for i in idx],
                           info={**info, "split": split, "per_class": per_class})
    return out
