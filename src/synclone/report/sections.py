"""The report's sections, built from the merged results and artefacts (never from live objects).

A :class:`Section` holds text, tables and figures; a section with neither a table nor a figure is
never made, so the report has no empty headings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd

from synclone.report import figures as F
from synclone.report.inputs import CurationInfo, DatasetInfo, TrainRun
from synclone.report.load import Evaluations
from synclone.report.metrics import best_flags, fmt
from synclone.report.tables import Cell, Table, probe_table, text_table


@dataclass
class Figure:
    png: bytes
    caption: str
    name: str = ""  # file name under figures/, set when the report is written


@dataclass
class Section:
    id: str
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    code: list[tuple[str, str]] = field(default_factory=list)  # (summary, text) shown folded: configs

    @property
    def empty(self) -> bool:
        return not (self.tables or self.figures)


# Title and one-line explanation per known probe, in the order the sections appear.
PROBES: dict[str, tuple[str, str]] = {
    "clean": ("Clean accuracy", "Top-1 accuracy on the in-distribution test set."),
    "shift": ("Distribution shift and effective robustness",
              "Accuracy on shifted test sets; effective robustness (Taori et al., 2020) is the accuracy above the "
              "logit-linear trend of the baseline models, in percentage points."),
    "synthetic_shift": ("Synthetic shift", "Accuracy on generated test images."),
    "effective_robustness": ("Effective robustness",
                             "Accuracy above the logit-linear trend of the baseline models (Taori et al., 2020)."),
    "calibration": ("Calibration", "Expected calibration error (equal-width bins) and related scores; "
                                   "confidence is the maximum softmax probability."),
    "ood": ("Out-of-distribution detection", "How well each score separates in-distribution test images from "
                                             "other datasets (OOD is the positive class)."),
    "corruptions": ("Common corruptions", "Accuracy under the corruptions of Hendrycks & Dietterich (2019) at "
                                          "severities 1-5; mCE is relative to the baseline model named in the "
                                          "conventions."),
    "corruption": ("Common corruptions", "Accuracy under common corruptions at severities 1-5."),
    "adversarial": ("Adversarial robustness", "Accuracy under attack on pixels in [0, 1], normalisation inside "
                                              "the model."),
    "shape_bias": ("Shape vs texture bias", "Cue-conflict images (Geirhos et al., 2019): the fraction of "
                                            "decisions that follow the shape rather than the texture."),
    "background": ("Background bias", "Accuracy when the foreground or background is removed or swapped (Xiao "
                                      "et al., 2020); BG-gap = acc(mixed_same) − acc(mixed_rand)."),
    "context": ("Context bias", "Accuracy with 0, 1, 2 uncommon context attributes (FOCUS) and the ratios to P0."),
}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "section"


def _figs(pairs) -> list[Figure]:
    return [Figure(F.png(fig), caption) for fig, caption in pairs]


def _lookup(results: pd.DataFrame, probes: tuple[str, ...], metric: str, variant_pref=("all", "mean", "")) -> dict:
    """(model, dataset) -> value of ``metric`` from ``probes``, preferring summary variants."""
    rows = results[results["probe"].isin(probes) & (results["metric"] == metric) & results["value"].notna()]
    out = {}
    for (m, d), g in rows.groupby(["model", "dataset"], sort=False):
        pref = g[g["variant"].isin(variant_pref)]
        out[(m, d)] = float(pref["value"].iloc[0]) if not pref.empty else float(g["value"].mean())
    return out


def _er_table(arts: list[dict]) -> Table | None:
    rows = []
    for a in arts:
        d = a["data"]
        base = [p for p in d.get("points", []) if p.get("baseline")]
        rows.append([d.get("dataset") or a["dataset"], _num(d.get("slope")), _num(d.get("intercept")),
                     _num(d.get("r2")), d.get("n", len(base)), d.get("scale", "logit")])
    if not rows:
        return None
    return text_table(["shifted set", "slope a", "intercept b", "R²", "baselines", "axes"], rows,
                      "Baseline fit logit(acc_shift) = a · logit(acc_id) + b (ordinary least squares, unweighted).")


def _num(v, digits: int = 3) -> str:
    return "–" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"


def _corruption_table(arts: list[dict], style: F.Style) -> Table | None:
    """Models x corruptions: top-1 averaged over severities, best per corruption marked."""
    by_model: dict[str, dict[str, float]] = {}
    for a in style.sort(arts):
        for corr, sev in a["data"].items():
            vals = [float(v) for v in sev.values() if v is not None]
            if vals:
                by_model.setdefault(a["model"], {})[corr] = sum(vals) / len(vals)
    if not by_model:
        return None
    corrs = list(dict.fromkeys(c for d in by_model.values() for c in d))
    body = [[Cell(m)] for m in by_model]
    for c in corrs:
        values = [by_model[m].get(c, math.nan) for m in by_model]
        for row, v, b in zip(body, values, best_flags(values, "higher"), strict=True):
            row.append(Cell(fmt(v, "frac"), b, v))
    return Table(["model"] + corrs, body, "Top-1 per corruption, averaged over severities (higher is better).",
                 [], [""] + ["higher is better"] * len(corrs))


def probe_sections(ev: Evaluations, style: F.Style) -> list[Section]:
    """One section per probe present in the results or the artefacts, with its figures and a compact table."""
    results = ev.results
    present = list(dict.fromkeys(list(results["probe"]) + [a["probe"] for a in ev.artifacts]))
    order = [p for p in PROBES if p in present] + sorted(p for p in present if p not in PROBES)
    ece = _lookup(results, ("calibration",), "ece")
    clean = _lookup(results, ("clean",), "top1")
    shape_overall = {m: v for (m, _d), v in _lookup(results, ("shape_bias",), "shape_bias", ("all",)).items()}
    gaps = {m: v for (m, _d), v in _lookup(results, ("background",), "bg_gap", ("all",)).items()}
    sections = []
    for probe in order:
        title, text = PROBES.get(probe, (probe.replace("_", " ").capitalize(), ""))
        sec = Section(f"probe-{_slug(probe)}", title, text)
        arts = [a for a in ev.artifacts if a["probe"] == probe and a["data"]]  # an empty curve draws nothing
        kinds: dict[str, list[dict]] = {}
        for a in arts:
            kinds.setdefault(a["kind"], []).append(a)
        if "er_fit" in kinds:
            sec.figures += _figs(F.er_fit(kinds["er_fit"], style))
        if "reliability" in kinds:
            sec.figures += _figs(F.reliability(kinds["reliability"], style, ece))
        if "roc" in kinds:
            sec.figures += _figs(F.roc(kinds["roc"], style))
        if "corruption_curve" in kinds:
            sec.figures += _figs(F.corruption_curves(kinds["corruption_curve"], style, clean))
        if "robust_curve" in kinds:
            sec.figures += _figs(F.robust_curves(kinds["robust_curve"], style))
        if "shape_bias" in kinds:
            sec.figures += _figs(F.shape_bias(kinds["shape_bias"], style, shape_overall))
        if "background" in kinds:
            sec.figures += _figs(F.background(kinds["background"], style, gaps))
        table = probe_table(results[results["probe"] == probe], style.models)
        if table is not None:
            sec.tables.append(table)
        if "er_fit" in kinds and (t := _er_table(kinds["er_fit"])) is not None:
            sec.tables.append(t)
        if "corruption_curve" in kinds and (t := _corruption_table(kinds["corruption_curve"], style)) is not None:
            sec.tables.append(t)
        if not sec.empty:
            sections.append(sec)
    return sections


def dataset_sections(datasets: list[DatasetInfo], curation: CurationInfo | None) -> list[Section]:
    """Sample grids of the generated datasets, and the curation's counts and kept/dropped grids."""
    out = []
    if datasets:
        sec = Section("datasets", "Generated data", "Samples of each dataset folder, one row per class.")
        rows = [[d.name, d.images, d.classes, ", ".join(f"{k}={v}" for k, v in d.details.items()) or "–"]
                for d in datasets]
        sec.tables.append(text_table(["dataset", "images", "classes", "generator"], rows))
        sec.figures += [Figure(d.grid.png, d.grid.caption) for d in datasets if d.grid]
        out.append(sec)
    if curation is not None:
        text = "Images the curation kept and dropped, with the reason for each drop."
        if curation.scorer:
            text += f" Scorer: {curation.scorer}."
        sec = Section("curation", "Curation", text)
        pc = curation.per_class
        total = ["all"] + [int(pc[c].sum()) for c in pc.columns[1:]]
        body = [[r[0], *(int(v) for v in r[1:])] for r in pc.itertuples(index=False)] + [total]
        sec.tables.append(text_table(["class", *pc.columns[1:]], body, "Images per class before and after curation."))
        sec.figures += [Figure(g.png, g.caption) for g in curation.grids]
        out.append(sec)
    return out


def training_section(runs: list[TrainRun], style: F.Style) -> Section | None:
    """Which split chose each model's checkpoint, its best validation accuracy, and the training curves."""
    if not runs:
        return None
    sec = Section("training", "Training", "Each model's checkpoint was chosen on the split named below, never on "
                                          "the test split.")
    rows = []
    for r in runs:
        m = r.metrics
        rows.append([r.model, m.get("selected_by", "–"), m.get("validation", "–"),
                     fmt(m.get("best_val_acc"), "frac") if isinstance(m.get("best_val_acc"), (int, float)) else "–",
                     m.get("best_step", "–"), m.get("total_steps", "–"), m.get("train_images", "–"),
                     "–" if r.seed is None else r.seed])
    sec.tables.append(text_table(["model", "selected by", "validation split", "best val top-1", "best step",
                                  "steps", "train images", "seed"], rows))
    sec.figures += _figs(F.training_curves({r.model: r.metrics.get("history") or [] for r in runs}, style))
    return sec


def _seeds(cfg, prefix: str = "") -> list[str]:
    """Every ``seed``-like key of a nested config, as 'path.to.seed = value'."""
    out = []
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            path = f"{prefix}{k}"
            if "seed" in str(k).lower() and not isinstance(v, (dict, list)):
                out.append(f"{path} = {v}")
            else:
                out += _seeds(v, path + ".")
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            out += _seeds(v, f"{prefix}{i}.")
    return out


def provenance_section(ev: Evaluations, runs: list[TrainRun]) -> Section:
    """Commands, times, git sha, host, package versions, seeds and the evaluation configs."""
    sec = Section("provenance", "Provenance", "Where each number comes from: the evaluation runs and their "
                                              "configs.")
    rows = []
    for i, f in enumerate(ev.folders):
        r = f.run
        cmd = r.get("command", "–")
        cmd = " ".join(map(str, cmd)) if isinstance(cmd, list) else str(cmd)
        host = r.get("host", {})
        host = ", ".join(f"{k}={v}" for k, v in host.items()) if isinstance(host, dict) else str(host)
        rows.append([i + 1, str(f.path), cmd, r.get("time", "–"), r.get("git_sha", "–"), host or "–",
                     "; ".join(_seeds(f.config)) or "–"])
    sec.tables.append(text_table(["#", "evaluation folder", "command", "time", "git sha", "host", "seeds"], rows))
    versions = [f.run.get("versions", {}) if isinstance(f.run.get("versions"), dict) else {} for f in ev.folders]
    names = list(dict.fromkeys(k for v in versions for k in v))
    if names:
        cols = ["package"] + [f"#{i + 1}" for i in range(len(versions))] if len(versions) > 1 else ["package",
                                                                                                  "version"]
        sec.tables.append(text_table(cols, [[n, *(v.get(n, "–") for v in versions)] for n in names],
                                     "Package versions of each evaluation run."))
    if runs:
        sec.tables.append(text_table(["model", "training run", "seed"],
                                     [[r.model, str(r.path), "–" if r.seed is None else r.seed] for r in runs],
                                     "Training runs."))
    notes = []
    if ev.replaced_rows:
        notes.append(f"{ev.replaced_rows} result row(s) were measured in more than one folder; the later folder's "
                     "values are shown.")
    if notes:
        sec.tables[0].notes += notes
    for i, f in enumerate(ev.folders):
        if f.config_text:
            sec.code.append((f"config.yaml of #{i + 1} ({f.path.name})", f.config_text))
    return sec
