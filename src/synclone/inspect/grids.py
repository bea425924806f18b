"""Picture grids of the diagnostics: synthetic next to real per class, and the worst-covered real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_PAD = 2


def _thumb(img: torch.Tensor, size: int) -> Image.Image:
    a = img.numpy()
    im = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")
    return im.convert("RGB").resize((size, size), Image.Resampling.NEAREST if a.shape[-1] <= size
                                    else Image.Resampling.BICUBIC)


def _block(images: list[torch.Tensor], cols: int, rows: int, thumb: int) -> Image.Image:
    out = Image.new("RGB", (cols * (thumb + _PAD), rows * (thumb + _PAD)), "white")
    for i, img in enumerate(images[: cols * rows]):
        out.paste(_thumb(img, thumb), ((i % cols) * (thumb + _PAD), (i // cols) * (thumb + _PAD)))
    return out


def class_grid(synthetic: list[torch.Tensor], real: list[torch.Tensor], title: str, path: Path,
               cols: int = 6, rows: int = 2, thumb: int = 56) -> None:
    """One class: ``rows`` x ``cols`` synthetic images on the left, as many real ones on the right."""
    font = ImageFont.load_default()
    left = _block(synthetic, cols, rows, thumb)
    right = _block(real, cols, rows, thumb)
    gap, head = 16, 16
    out = Image.new("RGB", (left.width + gap + right.width, head + max(left.height, right.height)), "white")
    d = ImageDraw.Draw(out)
    d.text((2, 2), f"{title}: synthetic", fill="black", font=font)
    d.text((left.width + gap, 2), "real", fill="black", font=font)
    out.paste(left, (0, head))
    out.paste(right, (left.width + gap, head))
    out.save(path)


def overview_grid(rows: list[tuple[str, list[torch.Tensor], list[torch.Tensor]]], path: Path, per_side: int = 6,
                  thumb: int = 40) -> None:
    """Every class in one image: a row per class, ``per_side`` synthetic images | ``per_side`` real ones."""
    font = ImageFont.load_default()
    label_w, gap, head = 96, 12, 14
    side_w = per_side * (thumb + _PAD)
    out = Image.new("RGB", (label_w + 2 * side_w + gap, head + len(rows) * (thumb + _PAD)), "white")
    d = ImageDraw.Draw(out)
    d.text((label_w, 1), "synthetic", fill="black", font=font)
    d.text((label_w + side_w + gap, 1), "real", fill="black", font=font)
    for r, (name, syn, real) in enumerate(rows):
        y = head + r * (thumb + _PAD)
        d.text((2, y + thumb // 2 - 6), name[:15], fill="black", font=font)
        out.paste(_block(syn, per_side, 1, thumb), (label_w, y))
        out.paste(_block(real, per_side, 1, thumb), (label_w + side_w + gap, y))
    out.save(path)


def worst_covered_grid(rows: list[tuple[str, list[torch.Tensor], list[torch.Tensor], list[float]]], path: Path,
                       thumb: int = 40) -> bool:
    """Per class: the worst-covered real images (top) above their nearest synthetic image, with the gap ratio."""
    rows = [r for r in rows if r[1]]
    if not rows:
        return False
    font = ImageFont.load_default()
    label_w, cap = 96, 12
    cols = max(len(r[1]) for r in rows)
    cell_h = 2 * (thumb + _PAD) + cap + 4
    out = Image.new("RGB", (label_w + cols * (thumb + _PAD), len(rows) * cell_h), "white")
    d = ImageDraw.Draw(out)
    for r, (name, real, nearest, gaps) in enumerate(rows):
        y = r * cell_h
        d.text((2, y + thumb - 6), name[:15], fill="black", font=font)
        for j, (a, b, g) in enumerate(zip(real, nearest, gaps, strict=True)):
            x = label_w + j * (thumb + _PAD)
            out.paste(_thumb(a, thumb), (x, y))
            out.paste(_thumb(b, thumb), (x, y + thumb + _PAD))
            d.text((x, y + 2 * (thumb + _PAD)), "inf" if not np.isfinite(g) else f"{g:.2f}",
                   fill="firebrick" if g >= 1 else "black", font=font)
    out.save(path)
    return True
