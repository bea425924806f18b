"""Curation statistics: per-class tables and PNG figures in ``<output>/stats/`` for the report.

Files: ``per_class.csv`` / ``.parquet`` (counts before/after, drops by reason, mean scores, diversity),
``drop_reasons.csv``, ``summary.json``, ``scores.png`` (score histograms, all readable vs kept),
``counts.png``, ``diversity.png``, ``examples_kept.png``, ``examples_dropped.png``, and ``index.json``
listing every figure and table with a caption.

Diversity of a class = mean pairwise cosine distance of its embeddings, 1 - mean_{i != j} cos(e_i, e_j),
computed exactly in O(n d) from the sum of the unit vectors: sum_{i != j} e_i.e_j = |sum e|^2 - sum |e_i|^2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from synclone.curate.config import StatsConfig
from synclone.data.images import read_and_decode
from synclone.labels import LabelSpace
from synclone.util.files import write_text_atomic

SCORES = ("p_label", "margin", "class_sim", "prompt_sim")


def mean_pairwise_cosine_distance(emb: np.ndarray) -> float:
    """1 - mean cosine similarity over all ordered pairs i != j of the rows of ``emb`` (NaN for fewer than 2)."""
    n = len(emb)
    if n < 2:
        return float("nan")
    e = emb.astype(np.float64)
    total = e.sum(axis=0)
    off_diag = float(total @ total) - float(np.einsum("nd,nd->", e, e))
    return 1.0 - off_diag / (n * (n - 1))


def per_class_table(table: pd.DataFrame, emb: np.ndarray, space: LabelSpace) -> pd.DataFrame:
    rows = []
    reasons = sorted(r for r in table["drop_reason"].dropna().unique())
    for c, name in enumerate(space.classes):
        m = (table["label"] == c).to_numpy()
        readable = m & table["readable"].to_numpy(dtype=bool)
        kept = m & table["kept"].to_numpy(dtype=bool)
        row = {"label": c, "class_name": name, "images": int(m.sum()), "readable": int(readable.sum()),
               "kept": int(kept.sum()), "dropped": int(m.sum() - kept.sum()),
               "kept_fraction": float(kept.sum() / m.sum()) if m.sum() else float("nan")}
        for r in reasons:
            row[f"dropped_{r}"] = int((m & (table["drop_reason"] == r).to_numpy()).sum())
        for s in SCORES:
            v = table[s].to_numpy(dtype=np.float64)
            row[f"mean_{s}_all"] = float(np.nanmean(v[readable])) if np.isfinite(v[readable]).any() else float("nan")
            row[f"mean_{s}_kept"] = float(np.nanmean(v[kept])) if np.isfinite(v[kept]).any() else float("nan")
        row["top1_agrees_all"] = float((table.loc[readable, "top1"] == name).mean()) if readable.any() else float("nan")
        row["diversity_all"] = mean_pairwise_cosine_distance(emb[readable])
        row["diversity_kept"] = mean_pairwise_cosine_distance(emb[kept])
        rows.append(row)
    return pd.DataFrame(rows)


def write_stats(folder: Path, table: pd.DataFrame, emb: np.ndarray, space: LabelSpace, cfg: StatsConfig,
                log: list[dict]) -> dict:
    """Write the statistics files into ``folder``; returns the index (figures and tables with captions)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    pc = per_class_table(table, emb, space)
    pc.to_csv(folder / "per_class.csv", index=False)
    pc.to_parquet(folder / "per_class.parquet", index=False)
    reasons = table.loc[~table["kept"], "drop_reason"].value_counts().rename_axis("reason").reset_index(name="count")
    reasons.to_csv(folder / "drop_reasons.csv", index=False)
    readable = table["readable"].to_numpy(dtype=bool)
    kept = table["kept"].to_numpy(dtype=bool)
    summary = {"images": len(table), "readable": int(readable.sum()), "kept": int(kept.sum()),
               "diversity_all": mean_pairwise_cosine_distance(emb[readable]),
               "diversity_kept": mean_pairwise_cosine_distance(emb[kept]),
               "drop_reasons": dict(zip(reasons["reason"], reasons["count"].astype(int).tolist(), strict=True)),
               "filters": log}
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    figures = []

    present = [s for s in SCORES if np.isfinite(table[s].to_numpy(dtype=np.float64)[readable]).any()]
    if present:
        fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.8), squeeze=False)
        for ax, s in zip(axes[0], present, strict=True):
            v = table[s].to_numpy(dtype=np.float64)
            lo, hi = (0.0, 1.0) if s == "p_label" else (np.nanmin(v[readable]), np.nanmax(v[readable]))
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, cfg.bins + 1)
            ax.hist(v[readable & np.isfinite(v)], bins=bins, color="0.75", label="all readable")
            ax.hist(v[kept & np.isfinite(v)], bins=bins, color="tab:blue", alpha=0.8, label="kept")
            ax.set_xlabel(s)
            ax.set_ylabel("images")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / "scores.png", dpi=110)
        plt.close(fig)
        figures.append({"file": "scores.png", "caption": "Score histograms: all readable images vs kept ones"})

    x = np.arange(len(space))
    width = 0.4
    names = [n if len(n) <= 14 else n[:13] + "…" for n in space.classes]
    for fname, cols, ylabel, caption in (
        ("counts.png", ("images", "kept"), "images", "Images per class before and after curation"),
        ("diversity.png", ("diversity_all", "diversity_kept"), "mean pairwise cosine distance",
         "Diversity per class (mean pairwise cosine distance of embeddings), before and after curation"),
    ):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(space) + 1.5), 3.0))
        ax.bar(x - width / 2, pc[cols[0]].to_numpy(dtype=float), width, label="before", color="0.7")
        ax.bar(x + width / 2, pc[cols[1]].to_numpy(dtype=float), width, label="after", color="tab:blue")
        ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)
        figures.append({"file": fname, "caption": caption})

    if cfg.examples_per_class > 0:
        for which, mask in (("kept", kept), ("dropped", ~kept)):
            path = folder / f"examples_{which}.png"
            shown = example_grid(table, mask, space, path, cfg.examples_per_class, cfg.thumb_size,
                                 captions=which == "dropped")
            if shown:
                figures.append({"file": path.name, "caption": f"Examples of {which} images per class"
                                + (" (with the reason)" if which == "dropped" else "")})

    index = {"figures": figures, "tables": [
        {"file": "per_class.csv", "caption": "Per-class counts, drops by reason, mean scores and diversity"},
        {"file": "drop_reasons.csv", "caption": "Dropped images by reason"},
        {"file": "summary.json", "caption": "Totals and the per-filter log"}]}
    write_text_atomic(folder / "index.json", json.dumps(index, indent=2) + "\n")
    return index


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(type(o).__name__)


# Captions short enough for a 64-pixel thumbnail.
_REASON_SHORT = {"unreadable": "unreadable", "duplicate": "duplicate", "he:below_chance": "p<1/C",
                 "he:not_top_k": "not top-k", "he:not_sampled": "not drawn", "keep_k": "not top-k"}


def example_grid(table: pd.DataFrame, mask: np.ndarray, space: LabelSpace, path: Path, per_class: int,
                 thumb: int, captions: bool, seed: int = 0) -> bool:
    """A grid of up to ``per_class`` images of each class (a seeded sample of ``mask``); False if none."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(len(space)):
        idx = np.nonzero(mask & (table["label"].to_numpy() == c))[0]
        if len(idx) > per_class:
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        rows.append(idx)
    if not any(len(r) for r in rows):
        return False
    font = ImageFont.load_default()
    label_w, cap_h, pad = 110, (12 if captions else 0), 2
    cell_h = thumb + cap_h + pad
    grid = Image.new("RGB", (label_w + per_class * (thumb + pad), len(space) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    paths = table["path"].to_numpy()
    reasons = table["drop_reason"].to_numpy()
    for c, idx in enumerate(rows):
        y = c * cell_h
        draw.text((4, y + thumb // 2 - 6), space.classes[c][:16], fill="black", font=font)
        for j, i in enumerate(idx):
            x = label_w + j * (thumb + pad)
            _, dec = read_and_decode(paths[i])
            if dec.ok:
                grid.paste(dec.image.convert("RGB").resize((thumb, thumb), Image.Resampling.BICUBIC), (x, y))
            else:
                draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), outline="red")
            if captions and reasons[i]:
                text = _REASON_SHORT.get(reasons[i], str(reasons[i]).split(":")[-1])[: max(4, thumb // 6)]
                draw.text((x, y + thumb), text, fill="firebrick", font=font)
    grid.save(path)
    return True
