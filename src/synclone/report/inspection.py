"""The report's "Dataset diagnostics" section, read from the files ``synclone inspect`` wrote (never recomputed).

An inspection folder holds ``results.parquet`` (dataset, reference, features, class, metric, value, n,
convention), ``confusion.csv``, ``inspect.json`` (its figures) and the PNG grids. The section shows one table
per inspected dataset (every class and the pooled row), the classes the classifier confuses most on the
synthetic images, the curation funnel when there is one, and the grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from synclone.config import read_json
from synclone.errors import UserError
from synclone.report.tables import text_table

RESULTS = "results.parquet"

# (metric, header, digits) of the per-class table, in order.
_COLUMNS = (
    ("frechet_distance", "Fréchet dist.", 3), ("kid", "KID", 4), ("precision", "precision", 3),
    ("recall", "recall", 3), ("density", "density", 3), ("coverage", "coverage", 3),
    ("diversity_ratio", "diversity syn/real", 2), ("near_duplicate_rate", "near-dup.", 3),
    ("classifiability", "classifiability", 3), ("classifier_top1_real", "classifier on real", 3),
)


@dataclass
class Inspection:
    path: Path
    results: pd.DataFrame
    confusion: pd.DataFrame
    figures: list[tuple[bytes, str]] = field(default_factory=list)

    @property
    def title(self) -> str:
        r = self.results.iloc[0]
        return f"{r['dataset']} vs {r['reference']} ({r['features']} features)"


def find_inspection(dataset_folder: str | Path) -> Path | None:
    """The inspection folder ``synclone inspect`` writes by default inside a dataset folder, if there is one."""
    p = Path(dataset_folder) / "inspect"
    return p if (p / RESULTS).is_file() else None


def read_inspection(path: str | Path) -> Inspection:
    """The tables and figures of one inspection folder; a folder without results raises :class:`UserError`."""
    folder = Path(path)
    if not (folder / RESULTS).is_file():
        raise UserError(f"'{folder}' holds no {RESULTS}; pass the output folder of synclone inspect")
    try:
        df = pd.read_parquet(folder / RESULTS)
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        raise UserError(f"cannot read '{folder / RESULTS}' ({type(err).__name__}); re-run synclone inspect") from None
    if df.empty or not {"class", "metric", "value"} <= set(df.columns):
        raise UserError(f"'{folder / RESULTS}' is not a synclone inspect table; re-run synclone inspect")
    conf = pd.read_csv(folder / "confusion.csv") if (folder / "confusion.csv").is_file() else pd.DataFrame()
    info = read_json(folder / "inspect.json") if (folder / "inspect.json").is_file() else {}
    figures = [((folder / f["file"]).read_bytes(), f.get("caption", "")) for f in info.get("figures", [])
               if isinstance(f, dict) and (folder / str(f.get("file", ""))).is_file()]
    return Inspection(folder, df, conf, figures)


def _fmt(v: float, digits: int) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def inspection_tables(ins: Inspection) -> list:
    """Per-class metrics, the top confusions on synthetic images and the curation funnel, as report tables."""
    df = ins.results
    wide = df.pivot_table(index="class", columns="metric", values="value", aggfunc="first", sort=False)
    classes = [c for c in dict.fromkeys(df["class"]) if c != "all"] + (["all"] if "all" in wide.index else [])
    present = [c for c in _COLUMNS if c[0] in wide.columns]
    rows = []
    for c in classes:
        n = wide.loc[c].get("n_synthetic", math.nan)
        rows.append([c, _fmt(n, 0), *(_fmt(wide.loc[c].get(m, math.nan), d) for m, _h, d in present)])
    tables = [text_table(["class", "synthetic images", *(h for _m, h, _d in present)], rows,
                         f"{ins.title}. Ideal for a synthetic set like the real one: distances 0, precision, "
                         "recall, density and coverage near 1, diversity ratio near 1, near duplicates at the real "
                         "set's rate, classifiability at the classifier's accuracy on real images.")]
    if not ins.confusion.empty:
        c = ins.confusion
        syn = c[(c["set"] == "synthetic") & (c["true"] != c["predicted"])]
        top = syn.sort_values(["fraction", "count"], ascending=False).head(8)
        if len(top):
            tables.append(text_table(["synthetic class", "classified as", "images", "share of the class"],
                                     [[r.true, r.predicted, int(r.count), f"{100 * r.fraction:.1f}%"]
                                      for r in top.itertuples(index=False)],
                                     "The classifier's most frequent confusions on the synthetic images."))
    funnel = [m for m in dict.fromkeys(df["metric"]) if m.startswith("funnel_")]
    if funnel:
        body = [[c, *(_fmt(wide.loc[c].get(m, math.nan), 0) for m in funnel)] for c in classes]
        tables.append(text_table(["class", *(m.removeprefix("funnel_").replace("_", " ") for m in funnel)], body,
                                 "Curation funnel: images generated, kept, and dropped per reason."))
    return tables


def inspection_section(inspections: list[Inspection]):
    """The "Dataset diagnostics" section (None without inspections)."""
    from synclone.report.sections import Figure, Section

    if not inspections:
        return None
    sec = Section("dataset", "Dataset diagnostics",
                  "How each synthetic dataset differs from real images, per class, in a feature space: Fréchet "
                  "distance and KID (fidelity), improved precision and recall (Kynkäänniemi et al., 2019), density "
                  "and coverage (Naeem et al., 2020), diversity (mean pairwise feature distance, synthetic over "
                  "real), near duplicates, and classifiability (a real-data classifier's top-1 on the synthetic "
                  "images).")
    for ins in inspections:
        sec.tables += inspection_tables(ins)
        sec.figures += [Figure(png, f"{ins.title}: {caption}") for png, caption in ins.figures]
    return sec
