"""The report's "Adapting the generator" section: every training recipe's accuracy on the shifted domain's test set
and on the original test set, mean ± sample std over seeds.

It reads the evaluation rows only (``clean`` top-1 on the original test set, ``shift`` top-1 on the shifted one);
a model ``NAME_seedS`` (a few-shot entry's seeds) counts towards row ``NAME``.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from synclone.report.sections import Section
from synclone.report.tables import text_table

_SEED = re.compile(r"^(?P<name>.+)_seed(?P<seed>\d+)$")


def _entry(model: str) -> str:
    m = _SEED.match(model)
    return m.group("name") if m else model


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    v = 100 * np.asarray(values, dtype=np.float64)
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v.mean():.1f}"


def adaptation_table(results: pd.DataFrame, shifted: str, models: list[str] | None = None) -> tuple[list, list]:
    """(columns, rows) of the table: one row per training entry, shifted and original test top-1 (%)."""
    clean = results[(results["probe"] == "clean") & (results["metric"] == "top1")]
    shift = results[(results["probe"] == "shift") & (results["metric"] == "top1")]
    if shifted in set(shift["dataset"]):
        shift = shift[shift["dataset"] == shifted]
    entries = list(dict.fromkeys(models or [])) or list(dict.fromkeys(_entry(m) for m in results["model"]))
    rows = []
    for e in entries:
        s = [float(v) for m, v in zip(shift["model"], shift["value"], strict=True) if _entry(m) == e]
        c = [float(v) for m, v in zip(clean["model"], clean["value"], strict=True) if _entry(m) == e]
        if s or c:
            rows.append([e, _cell(s), _cell(c), str(max(len(s), len(c)))])
    return ["training data", "shifted test top-1 (%)", "original test top-1 (%)", "seeds"], rows


def adaptation_section(results: pd.DataFrame, adaptation: dict) -> Section | None:
    """The section, or None when the evaluation has no row for the listed models."""
    cols, rows = adaptation_table(results, adaptation["shifted"], adaptation.get("models"))
    if not rows:
        return None
    desc = adaptation.get("descriptions") or {}
    if desc:
        cols = [cols[0], "what", *cols[1:]]
        rows = [[r[0], desc.get(r[0], ""), *r[1:]] for r in rows]
    sec = Section("adaptation", "Adapting the generator",
                  "Classifiers for a shifted real domain that has only a few labelled images per class: trained on "
                  "synthetic clones from the generator as it is, guided by the real shots (SDEdit), or fine-tuned "
                  "on the shots (LoRA or the whole UNet); on the shots alone; and on the shots plus a fine-tuned "
                  "generator's clones. Test top-1 (%) on the shifted domain and on the original one, mean ± sample "
                  "std over seeds; each model is the one its training run chose on a validation split held out "
                  "from its own training data (never on a test set).")
    sec.tables.append(text_table(cols, rows, caption=f"Shifted test set '{adaptation['shifted']}', original "
                                                     f"'{adaptation.get('original', '?')}'"))
    return sec
