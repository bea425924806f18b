"""The report's "Pre-training" section: the transfer table of ``kind: transfer`` stages and their plot.

It reads what :func:`synclone.train.transfer_eval.run_transfer` wrote (``results.json``,
``transfer.png``), never live objects: one row per encoder, one column per (measure, shots), test
top-1 mean ± sample std over seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from synclone.errors import UserError
from synclone.report.sections import Figure, Section
from synclone.report.tables import text_table


def pretraining_section(folders: list[Path]) -> Section | None:
    """The section for one or more transfer folders (None when there are none)."""
    if not folders:
        return None
    sec = Section("pretraining", "Pre-training",
                  "Encoders pre-trained on synthetic or real images (or not at all) and transferred to the downstream "
                  "data: a linear probe and a kNN classifier on frozen features, and fine-tuning of the whole "
                  "network under a new head, each with k labelled images per class. Test top-1 (%), mean ± sample "
                  "std over seeds; nothing was selected on the test set.")
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise UserError(f"transfer folder '{folder}' has no results.json; run its stage first")
        res = json.loads(path.read_text(encoding="utf-8"))
        summary = res["summary"]
        encoders = list(dict.fromkeys(r["encoder"] for r in summary))
        cols = list(dict.fromkeys((r["measure"], r["shots"]) for r in summary))
        by = {(r["encoder"], r["measure"], r["shots"]): r for r in summary}
        rows = []
        for enc in encoders:
            cells = [enc]
            for m, s in cols:
                r = by.get((enc, m, s))
                sd = "" if r is None or r["std"] is None else f" ± {100 * r['std']:.1f}"
                cells.append("–" if r is None else f"{100 * r['mean']:.1f}{sd}")
            rows.append(cells)
        n = max((r["n"] for r in summary), default=0)
        sec.tables.append(text_table(["encoder", *[f"{m.replace('_', ' ')} {s}-shot" for m, s in cols]], rows,
                                     caption=f"Transfer to '{res.get('test', '?')}' ({n} seeds)"))
        png = Path(folder) / "transfer.png"
        if png.is_file():
            sec.figures.append(Figure(png.read_bytes(), "Transfer top-1 per measure and shot count; bars are "
                                                        "means over seeds, whiskers one sample std."))
    return sec
