"""A local stand-in for ImageNet: JPEG class folders (WordNet ids or plain names) of mixed sizes around 500x375.

Each image is a class-dependent pattern (a coloured bar whose position and hue name the class) under noise,
at a size drawn around ``size`` (+-20%), saved as a quality-90 JPEG like ImageNet's files. The tests and
``bench/bench_dataloader.py`` exercise the big-folder data path on it without the real dataset.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_standin(root: Path, classes: int = 4, per_class: int = 10, size: tuple[int, int] = (500, 375),
                  seed: int = 0, wnids: bool = False) -> Path:
    """Write ``classes`` x ``per_class`` JPEGs under ``root/<class>/``; class folders are ImageNet-1k WordNet ids
    (the first ``classes``) with ``wnids``, else ``c00, c01, ...``."""
    rng = np.random.default_rng(seed)
    if wnids:
        from synclone.data.imagenet import imagenet1k_wnids

        names = imagenet1k_wnids()[:classes]
    else:
        names = [f"c{c:02d}" for c in range(classes)]
    for c, name in enumerate(names):
        d = Path(root) / name
        d.mkdir(parents=True, exist_ok=True)
        hue = np.array([(37 * c) % 256, (91 * c + 60) % 256, (151 * c + 120) % 256], dtype=np.float32)
        for i in range(per_class):
            w = int(size[0] * rng.uniform(0.8, 1.2))
            h = int(size[1] * rng.uniform(0.8, 1.2))
            a = rng.normal(110, 40, (h, w, 3)).clip(0, 255).astype(np.float32)
            y0 = int(h * (0.1 + 0.8 * (c % 5) / 5))
            a[y0:y0 + max(2, h // 8), w // 8: 7 * w // 8] = hue
            Image.fromarray(a.astype(np.uint8)).save(d / f"{name}_{i:05d}.JPEG", quality=90)
    return Path(root)
