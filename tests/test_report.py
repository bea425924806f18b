"""synclone.report: evaluation folders -> self-contained report.html + report.md, checked as text and in Chromium.

The evaluation folders are written here, the way ``synclone evaluate`` writes them (long-format
rows in results.parquet, curves in artifacts.json), from simulated model outputs: reliability bins,
ROC curves and the baseline fit are computed from those outputs, not typed in.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score, roc_curve

from synclone.errors import UserError
from synclone.labels import FASHION_MNIST
from synclone.probes.corruptions.metrics import mce
from synclone.report import build_report

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
CATEGORIES = ("airplane", "bear", "bicycle", "bird", "boat", "bottle", "car", "cat", "chair", "clock", "dog",
              "elephant", "keyboard", "knife", "oven", "truck")
BG_VARIANTS = ("original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "mixed_same", "mixed_rand", "mixed_next")

# Per model: clean top-1, synthetic-shift top-1, over-confidence, OOD separation, corruption robustness,
# adversarial robustness, shape bias, BG-gap. The three 'real-w*' models are the effective-robustness baselines.
MODELS = {
    "real": dict(clean=0.912, shift=0.55, overconf=0.06, sep=1.6, corr=0.70, adv=0.30, shape=0.31, gap=0.052),
    "synthetic": dict(clean=0.741, shift=0.71, overconf=0.12, sep=1.1, corr=0.80, adv=0.22, shape=0.48, gap=-0.013),
    "real+synthetic": dict(clean=0.905, shift=0.68, overconf=0.01, sep=2.2, corr=0.78, adv=0.35, shape=0.42,
                           gap=-0.061),
    "real-w4": dict(clean=0.842, shift=0.43, overconf=0.09, sep=1.2, corr=0.62, adv=0.18, shape=0.25, gap=0.09),
    "real-w8": dict(clean=0.874, shift=0.48, overconf=0.08, sep=1.4, corr=0.66, adv=0.21, shape=0.27, gap=0.08),
    "real-w16": dict(clean=0.897, shift=0.52, overconf=0.07, sep=1.5, corr=0.68, adv=0.25, shape=0.29, gap=0.06),
}
BASELINES = ("real-w4", "real-w8", "real-w16")
CLEAN, SHIFT, OOD_SETS = "fashion_mnist:test", "synthetic_clone:test", ("mnist", "kmnist")
EPS = (1 / 255, 2 / 255, 4 / 255)


def _logit(p):
    p = np.asarray(p, dtype=float)
    return np.log(p / (1 - p))


def _row(model, probe, dataset, variant, metric, value, n=1000, convention=""):
    return {"model": model, "probe": probe, "dataset": dataset, "variant": variant, "metric": metric,
            "value": float(value), "n": n, "convention": convention}


def _reliability(rng, acc, overconf, n=2000, bins=15):
    """Simulated confidences/hits of a model -> reliability bins and its ECE (as the calibration probe writes)."""
    conf = np.clip(rng.beta(8 * (acc + overconf), 8 * (1 - acc - overconf) + 0.3, n), 1e-3, 1.0)
    hits = rng.random(n) < np.clip(conf - overconf, 0, 1)
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    c = [float(conf[idx == b].mean()) if count[b] else None for b in range(bins)]
    a = [float(hits[idx == b].mean()) if count[b] else None for b in range(bins)]
    ece = sum(count[b] / n * abs(a[b] - c[b]) for b in range(bins) if count[b])
    return {"edges": edges.tolist(), "conf": c, "acc": a, "count": count.tolist()}, ece, float(hits.mean())


def write_eval_folder(folder: Path, models=MODELS, probes=None, seed=0, git_sha="0123abc") -> Path:
    """An evaluation folder like ``synclone evaluate`` writes: results.parquet/.csv, artifacts.json, run.json, config.

    ``probes``: the subset of probes to write (default all).
    """
    rng = np.random.default_rng(seed)
    want = set(probes or ("clean", "shift", "calibration", "ood", "corruptions", "adversarial", "shape_bias",
                          "background"))
    rows, arts = [], []
    errors: dict[str, dict] = {}

    def art(model, probe, dataset, kind, data):
        arts.append({"model": model, "probe": probe, "dataset": dataset, "kind": kind, "data": data})

    for m, p in models.items():
        if "clean" in want:
            rows.append(_row(m, "clean", CLEAN, "clean", "top1", p["clean"], 10000))
        if "shift" in want:
            rows.append(_row(m, "shift", SHIFT, "clean", "top1", p["shift"], 1000))
        if "calibration" in want:
            diagram, ece, acc = _reliability(rng, p["clean"], p["overconf"])
            conv = "bins=15 equal-width; conf=max softmax"
            for metric, v in (("ece", ece), ("mce", ece * 2.1), ("nll", 0.3 + ece), ("brier", 0.15 + ece / 2)):
                rows.append(_row(m, "calibration", CLEAN, "clean", metric, v, 2000, conv))
            art(m, "calibration", CLEAN, "reliability", diagram)
        if "ood" in want:
            for d in OOD_SETS:
                for score, shift in (("msp", 0.0), ("energy", 0.3)):
                    s_id = rng.normal(p["sep"] + shift, 1.0, 500)
                    s_ood = rng.normal(0.0, 1.0, 500)
                    y = np.r_[np.zeros(500), np.ones(500)]  # OOD = positive; higher score = more ID
                    auroc = roc_auc_score(y, -np.r_[s_id, s_ood])
                    fpr, tpr, _ = roc_curve(y, -np.r_[s_id, s_ood])
                    conv = "positive=ood"
                    rows.append(_row(m, "ood", d, score, "auroc", auroc, 1000, conv))
                    rows.append(_row(m, "ood", d, score, "fpr95", float(fpr[np.searchsorted(tpr, 0.95)]), 1000, conv))
                    if score == "msp":
                        art(m, "ood", d, "roc", {"score": score, "fpr": fpr[::4].tolist(), "tpr": tpr[::4].tolist(),
                                                 "auroc": auroc})
        if "corruptions" in want:
            curve = {}
            for k, c in enumerate(CORRUPTIONS):
                curve[c] = {}
                for s in range(1, 6):
                    top1 = float(np.clip(p["clean"] * (p["corr"] ** (s / 3)) - 0.01 * (k % 4), 0.05, 1))
                    curve[c][str(s)] = top1
                    rows.append(_row(m, "corruptions", CLEAN, f"{c}/{s}", "top1", top1, 1000))
            art(m, "corruptions", CLEAN, "corruption_curve", curve)
            errors[m] = {c: {int(k): 1 - v for k, v in sev.items()} for c, sev in curve.items()}
        if "adversarial" in want:
            curves = {"pgd_linf": [], "fgsm": []}
            for e in EPS:
                for attack, drop in (("pgd_linf", 1.0), ("fgsm", 0.7)):
                    v = p["clean"] * p["adv"] ** (drop * e * 255 / 4)
                    curves[attack].append(v)
                    rows.append(_row(m, "adversarial", CLEAN, f"{attack}/eps={round(e * 255)}/255", "robust_top1", v,
                                     500, "linf; pixels in [0,1]"))
            for attack, vals in curves.items():
                art(m, "adversarial", CLEAN, "robust_curve", {"eps": list(EPS), "robust_top1": vals,
                                                              "clean_top1": p["clean"], "attack": attack})
        if "shape_bias" in want:
            per_cat = np.clip(p["shape"] + rng.normal(0, 0.08, len(CATEGORIES)), 0, 1)
            rows.append(_row(m, "shape_bias", "cue_conflict", "all", "shape_bias", p["shape"], 1280))
            rows += [_row(m, "shape_bias", "cue_conflict", c, "shape_bias", v, 80)
                     for c, v in zip(CATEGORIES, per_cat, strict=True)]
            art(m, "shape_bias", "cue_conflict", "shape_bias", {"categories": list(CATEGORIES),
                                                                "shape_bias": per_cat.tolist()})
        if "background" in want:
            accs = {v: float(np.clip(p["clean"] - 0.05 * k, 0, 1)) for k, v in enumerate(BG_VARIANTS)}
            accs["mixed_rand"] = accs["mixed_same"] - p["gap"]
            rows += [_row(m, "background", "fmnist_bg", v, "accuracy", a, 900) for v, a in accs.items()]
            rows.append(_row(m, "background", "fmnist_bg", "all", "bg_gap", p["gap"], 900))
            art(m, "background", "fmnist_bg", "background", accs)

    if "corruptions" in want:  # mCE against the real-data model, as the demo reports it
        ref = "real" if "real" in errors else next(iter(errors))
        for m, errs in errors.items():
            rows.append(_row(m, "corruptions", CLEAN, "all", "mce", mce(errs, errors[ref], CORRUPTIONS), 15000,
                             f"baseline={ref}"))
    if "shift" in want:
        base = [m for m in models if m in BASELINES]
        slope, intercept = np.polyfit(_logit([models[b]["clean"] for b in base]),
                                      _logit([models[b]["shift"] for b in base]), 1)
        pred = _logit([models[b]["clean"] for b in base]) * slope + intercept
        resid = _logit([models[b]["shift"] for b in base]) - pred
        tot = _logit([models[b]["shift"] for b in base])
        r2 = 1 - (resid ** 2).sum() / ((tot - tot.mean()) ** 2).sum()
        for m, p in models.items():
            er = 100 * (p["shift"] - 1 / (1 + np.exp(-(slope * _logit(p["clean"]) + intercept))))
            rows.append(_row(m, "shift", SHIFT, "clean", "effective_robustness", er, 1000,
                             f"logit fit over {len(base)} baselines"))
        art("", "shift", SHIFT, "er_fit", {
            "dataset": SHIFT, "slope": slope, "intercept": intercept, "r2": r2, "n": len(base), "scale": "logit",
            "points": [{"model": m, "acc_id": p["clean"], "acc_shift": p["shift"], "baseline": m in BASELINES}
                       for m, p in models.items()]})

    folder.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_parquet(folder / "results.parquet", index=False)
    df.to_csv(folder / "results.csv", index=False)
    (folder / "artifacts.json").write_text(json.dumps(arts), encoding="utf-8")
    (folder / "run.json").write_text(json.dumps({
        "command": "synclone evaluate --config eval.yaml", "time": "2026-11-22T08:00:00+00:00", "git_sha": git_sha,
        "versions": {"python": "3.11.7", "synclone": "0.1.0", "torch": "2.14.1"},
        "host": {"platform": "Linux", "cpus": 2}}), encoding="utf-8")
    (folder / "config.yaml").write_text(f"seed: {seed}\nprobes:\n  calibration:\n    bins: 15\n", encoding="utf-8")
    return folder


def write_dataset(root: Path, n_per_class: int = 3, seed: int = 0) -> Path:
    """A synclone dataset folder (train/<slug>/<id>.png + metadata.jsonl + dataset.json) of noisy 28x28 images."""
    rng = np.random.default_rng(seed)
    space = FASHION_MNIST
    lines = []
    for label, slug in enumerate(space.slugs):
        (root / "train" / slug).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = (rng.random((28, 28)) * 60 + label * 18).astype(np.uint8)
            name = f"{slug}/{label:02d}_{i:03d}.png"
            Image.fromarray(img, "L").save(root / "train" / name)
            lines.append({"file_name": name, "id": f"{label:02d}_{i:03d}", "label": label,
                          "class_name": space.classes[label], "seed": int(label * 100 + i)})
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    (root / "dataset.json").write_text(json.dumps({"label_space": space.to_dict(), "seed": seed,
                                                   "generator": {"backend": "classcond", "steps": 20}}),
                                       encoding="utf-8")
    return root


def write_curation(root: Path, source: Path) -> Path:
    """A curated folder as synclone.curate writes it: curation.jsonl (every image, kept/drop_reason) + dataset.json."""
    meta = [json.loads(x) for x in (source / "train" / "metadata.jsonl").read_text().splitlines()]
    (root / "train").mkdir(parents=True, exist_ok=True)
    rows, kept_rows = [], []
    for k, r in enumerate(meta):
        kept = k % 3 != 0
        rel = Path("..", "..", source.name, "train", r["file_name"]).as_posix()
        row = {**r, "file_name": rel, "kept": kept, "drop_reason": None if kept else
               ("he:below_chance" if k % 2 else "duplicate"), "dup_of": None}
        rows.append(row)
        if kept:
            kept_rows.append(row)
    (root / "curation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept_rows), encoding="utf-8")
    (root / "dataset.json").write_text(json.dumps({
        "label_space": FASHION_MNIST.to_dict(), "kind": "curated",
        "curation": {"scorer_id": "teacher:real-w8", "counts": {"images": len(rows), "kept": len(kept_rows)}}}))
    return root


def write_train_run(root: Path, best: float, seed: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    history = [{"step": 50 * (i + 1), "loss": 2.0 / (i + 1), "val_acc": best * (1 - 0.3 / (i + 1))} for i in range(5)]
    history[-1]["val_acc"] = best
    (root / "metrics.json").write_text(json.dumps({
        "best_val_acc": best, "best_step": 250, "total_steps": 250, "selected_by": "validation",
        "validation": "10% of real train (seeded split)", "history": history, "train_images": 6000}))
    (root / "config.yaml").write_text(f"seed: {seed}\n")
    return root


# --- reading the HTML back -------------------------------------------------------------------------------

class _ReportParser(HTMLParser):
    """Sections (id -> tables as rows of (text, is_best) and <img> src list) and every external reference."""

    def __init__(self):
        super().__init__()
        self.sections: dict[str, dict] = {}
        self.imgs: list[str] = []
        self._sec = None
        self._cell = None
        self._row = None
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self._sec = a.get("id")
            self.sections[self._sec] = {"tables": [], "imgs": []}
        elif tag == "table" and self._sec:
            self.sections[self._sec]["tables"].append([])
        elif tag == "tr" and self._sec:
            self._row = []
            self.sections[self._sec]["tables"][-1].append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ["", "best" in (a.get("class") or "")]
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
            if self._sec:
                self.sections[self._sec]["imgs"].append(a.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append((self._cell[0].strip(), self._cell[1]))
            self._cell = None
        elif tag == "section":
            self._sec = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def parse(html: str) -> _ReportParser:
    p = _ReportParser()
    p.feed(html)
    return p


def column(table: list[list[tuple[str, bool]]], header_prefix: str) -> dict[str, tuple[str, bool]]:
    """model -> (text, is_best) of the first column whose header starts with ``header_prefix``."""
    header = [c[0] for c in table[0]]
    j = next(i for i, h in enumerate(header) if h.startswith(header_prefix))
    return {r[0][0]: r[j] for r in table[1:]}


def best_models(col: dict[str, tuple[str, bool]]) -> set[str]:
    return {m for m, (_t, b) in col.items() if b}


# --- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    ev = write_eval_folder(tmp / "eval")
    gen = write_dataset(tmp / "generated")
    cur = write_curation(tmp / "curated", gen)
    runs = {m: write_train_run(tmp / "runs" / m, MODELS[m]["clean"] + 0.004, seed=k)
            for k, m in enumerate(("real", "synthetic", "real+synthetic"))}
    html_path = build_report(ev, tmp / "out", title="Fashion-MNIST synthetic clone", curation=cur, datasets=[gen],
                             train_runs=runs)
    return html_path, ev


# --- tests -----------------------------------------------------------------------------------------------

def test_verdict_marks_the_best_per_column_in_the_right_direction(full_report):
    html_path, ev = full_report
    df = pd.read_parquet(ev / "results.parquet")
    table = parse(html_path.read_text())
    verdict = table.sections["verdict"]["tables"][0]
    assert [r[0][0] for r in verdict[1:]] == list(MODELS)

    def pick(probe, metric, variant=None):
        d = df[(df.probe == probe) & (df.metric == metric)]
        if variant is not None:
            d = d[d.variant == variant]
        return d.groupby("model")["value"].mean()

    clean = pick("clean", "top1")
    assert best_models(column(verdict, "Clean top-1")) == {clean.idxmax()}
    assert column(verdict, "Clean top-1")["real"][0] == f"{100 * clean['real']:.1f}%"
    ece = pick("calibration", "ece")  # lower is better
    assert best_models(column(verdict, "ECE")) == {ece.idxmin()}
    assert ece.idxmin() != ece.idxmax()
    auroc = pick("ood", "auroc", "msp")  # MSP only, mean over the two OOD sets
    assert best_models(column(verdict, "OOD AUROC")) == {auroc.idxmax()}
    gap = pick("background", "bg_gap", "all")  # closest to 0 wins, not the most negative
    assert best_models(column(verdict, "BG-gap")) == {gap.abs().idxmin()} == {"synthetic"}
    assert gap.idxmin() == "real+synthetic"
    er = pick("shift", "effective_robustness")
    assert best_models(column(verdict, "Effective robustness")) == {er.idxmax()}
    assert column(verdict, "Effective robustness")["synthetic"][0].endswith(" pp")
    # Robust top-1 at the largest budget (4/255), worst of the two attacks.
    adv = df[(df.probe == "adversarial") & df.variant.str.endswith("eps=4/255")].groupby("model")["value"].min()
    col = column(verdict, "Robust top-1 (ε=4/255)")
    assert col["real"][0] == f"{100 * adv['real']:.1f}%"
    assert best_models(col) == {adv.idxmax()}
    corr = df[(df.probe == "corruptions") & (df.metric == "top1")].groupby("model")["value"].mean()
    assert best_models(column(verdict, "Corruption top-1")) == {corr.idxmax()}
    mce_ = pick("corruptions", "mce")  # in %, lower is better; the reference model scores 100
    assert column(verdict, "mCE")["real"][0] == "100.0%"
    assert best_models(column(verdict, "mCE")) == {mce_.idxmin()} and mce_.idxmin() != "real"
    shift = pick("shift", "top1")
    assert best_models(column(verdict, "Synthetic-shift top-1")) == {shift.idxmax()}
    assert best_models(column(verdict, "Shape bias")) == {"synthetic"}


def test_sections_figures_and_no_external_references(full_report):
    html_path, _ = full_report
    html = html_path.read_text()
    p = parse(html)
    expected = {"verdict", "datasets", "curation", "training", "probe-clean", "probe-shift", "probe-calibration",
                "probe-ood", "probe-corruptions", "probe-adversarial", "probe-shape-bias", "probe-background",
                "provenance"}
    assert set(p.sections) == expected
    for sid, sec in p.sections.items():
        assert sec["imgs"] or any(len(t) > 1 for t in sec["tables"]), f"section {sid} is empty"
    for sid in expected - {"verdict", "probe-clean", "provenance"}:
        assert p.sections[sid]["imgs"], f"section {sid} has no figure"
    assert len(p.sections["curation"]["imgs"]) == 2  # kept and dropped grids
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html, re.I)
    assert "<link" not in html.lower() and "@import" not in html and "url(" not in html
    assert "<script" not in html.lower()
    assert p.imgs and len(p.imgs) == sum(len(s["imgs"]) for s in p.sections.values())
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 50
        im.verify()
    prov = p.sections["provenance"]["tables"][0]
    assert "0123abc" in [c[0] for c in prov[1]] and "seed = 0" in prov[1][-1][0]
    training = p.sections["training"]["tables"][0]
    assert training[1][1][0] == "validation" and training[1][2][0].startswith("10% of real train")


def test_markdown_has_the_tables_and_figures(full_report):
    html_path, _ = full_report
    md = (html_path.parent / "report.md").read_text()
    assert md.startswith("# Fashion-MNIST synthetic clone")
    verdict = md.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    lines = [x for x in verdict.splitlines() if x.startswith("|")]
    assert lines[0].startswith("| model | Clean top-1 |") and len(lines) == 2 + len(MODELS)
    assert "**" in verdict  # best values in bold
    links = re.findall(r"!\[[^\]]*\]\((figures/[^)]+\.png)\)", md)
    assert len(links) == len(parse(html_path.read_text()).imgs)
    for link in links:
        assert Image.open(html_path.parent / link).format == "PNG"
    for title in ("## Calibration", "## Out-of-distribution detection", "## Provenance", "```yaml"):
        assert title in md


def test_only_present_probes_get_sections(tmp_path):
    ev = write_eval_folder(tmp_path / "eval", probes=("clean", "calibration"))
    p = parse(build_report(ev, tmp_path / "out").read_text())
    assert set(p.sections) == {"verdict", "probe-clean", "probe-calibration", "provenance"}
    header = [c[0] for c in p.sections["verdict"]["tables"][0][0]]
    assert header == ["model", "Clean top-1", "ECE"]
    assert len(p.sections["probe-calibration"]["imgs"]) == 1
    assert [f.name for f in (tmp_path / "out" / "figures").iterdir()] == ["02-probe-calibration-1.png"]


def test_several_folders_merge_and_later_wins(tmp_path):
    a = write_eval_folder(tmp_path / "a", probes=("clean",), git_sha="aaa")
    sub = {"real": dict(MODELS["real"], clean=0.5)}
    b = write_eval_folder(tmp_path / "b", models=sub, probes=("clean", "ood"), git_sha="bbb")
    p = parse(build_report([a, b], tmp_path / "out").read_text())
    col = column(p.sections["verdict"]["tables"][0], "Clean top-1")
    assert col["real"][0] == "50.0%" and best_models(col) == {"real+synthetic"}
    assert "probe-ood" in p.sections
    assert {r[4][0] for r in p.sections["provenance"]["tables"][0][1:]} == {"aaa", "bbb"}


def test_bad_input_is_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_report(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no results.parquet"):
        build_report(tmp_path / "empty", tmp_path / "out")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError, match="cannot read") as err:
        build_report(bad, tmp_path / "out")
    assert "\n" not in str(err.value)
    cols = tmp_path / "cols"
    cols.mkdir()
    pd.DataFrame({"model": ["a"], "value": [1.0]}).to_parquet(cols / "results.parquet")
    with pytest.raises(UserError, match="lacks the column"):
        build_report(cols, tmp_path / "out")
    with pytest.raises(UserError, match="no evaluation folder"):
        build_report([], tmp_path / "out")
    ev = write_eval_folder(tmp_path / "ev", probes=("clean",))
    with pytest.raises(UserError, match="metrics.json"):
        build_report(ev, tmp_path / "out", train_runs={"real": tmp_path / "missing-run"})


# --- the browser -----------------------------------------------------------------------------------------

# Runs after load: counts images that failed to decode, sections without a visible figure or table
# row, and whether the page is wider than the window (tables must scroll inside their own box).
_CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  const empty = Array.from(document.querySelectorAll('section')).filter(s =>
      !s.querySelector('img, tbody tr') || s.getBoundingClientRect().height < 40).map(s => s.id);
  const overflow = document.documentElement.scrollWidth > window.innerWidth + 1;
  document.body.setAttribute('data-check', JSON.stringify({images: imgs.length, broken, empty, overflow,
      sections: document.querySelectorAll('section').length}));
});
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run_chromium(args: list[str], tmp: Path) -> str:
    exe = _chromium()
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp / 'ud'}",
           "--window-size=1280,2000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True).stdout


def _browser_check(html: str, tmp: Path) -> dict:
    """Load ``html`` in headless Chromium with :data:`_CHECK` appended; its findings as a dict."""
    page = tmp / "check.html"
    page.write_text(html.replace("</body>", _CHECK + "</body>"), encoding="utf-8")
    dom = _run_chromium(["--virtual-time-budget=5000", "--dump-dom", page.as_uri()], tmp)
    m = re.search(r"data-check=\"([^\"]+)\"", dom)
    assert m, "the check script did not run"
    return json.loads(m.group(1).replace("&quot;", '"'))


needs_chromium = pytest.mark.skipif(_chromium() is None,
                                    reason="chromium is not installed (Debian: apt-get install chromium)")


@needs_chromium
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    html_path, _ = full_report
    html = html_path.read_text()
    check = _browser_check(html, tmp_path)
    assert check["broken"] == 0, check
    assert check["images"] == len(parse(html).imgs) and check["images"] >= 10
    assert check["empty"] == [], f"empty sections: {check['empty']}"
    assert not check["overflow"], "the page is wider than a 1280 px window"
    assert check["sections"] == len(parse(html).sections)

    shot = tmp_path / "shot.png"
    _run_chromium([f"--screenshot={shot}", html_path.as_uri()], tmp_path)
    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (2000, 1280)
    assert img.std() > 15, "the screenshot is (nearly) blank"
    assert (img < 128).mean() > 0.01  # text and plots, not just a white page


@needs_chromium
def test_browser_check_catches_a_broken_image_and_an_empty_section(full_report, tmp_path):
    """The check above can fail: an image that does not decode and a heading-only section are both reported.

    (Chromium draws a truncated PNG partially, with its full size, so file integrity is checked with PIL in
    test_sections_figures_and_no_external_references; this check is about what the browser shows.)
    """
    html = full_report[0].read_text()
    start = html.index("data:image/png;base64,") + len("data:image/png;base64,")
    broken = html[:start] + base64.b64encode(b"not a png").decode() + html[html.index('"', start):]
    broken = broken.replace("</main>", '<section id="hollow"><h2>Nothing here</h2></section></main>')
    check = _browser_check(broken, tmp_path)
    assert check["broken"] == 1 and check["empty"] == ["hollow"]


# --- the sweep report ------------------------------------------------------------------------------------

SWEEP_GRID = {"images_per_class": [100, 250, 500], "guidance": [1.0, 4.0]}
SWEEP_METRICS = ["clean_top1", "ece", "mce", "inspect/coverage"]


def _sweep_top1(model: str, ipc: int, guidance: float, seed: int) -> float:
    """The simulated clone gains 8 points per doubling of its data and loses 3 at guidance 4; real is flat."""
    if model == "real":
        return 0.90 + 0.004 * seed
    return 0.55 + 0.08 * np.log2(ipc / 100) - 0.03 * (guidance == 4.0) + 0.01 * seed


def write_sweep_folder(root: Path) -> Path:
    """A sweep folder as ``synclone sweep`` writes it: sweep.json, results and diagnostics with point columns."""
    root.mkdir(parents=True, exist_ok=True)
    rows, diag, points = [], [], []
    for ipc in SWEEP_GRID["images_per_class"]:
        for g in SWEEP_GRID["guidance"]:
            for seed in (0, 1):
                pid = f"images_per_class-{ipc}__guidance-{g}__seed-{seed}"
                points.append({"id": pid, "values": {"images_per_class": ipc, "guidance": g, "seed": seed}})
                tag = {"point": pid, "images_per_class": ipc, "guidance": g, "seed": seed}
                err = {}
                for m in ("real", "synthetic"):
                    top1 = _sweep_top1(m, ipc, g, seed)
                    err[m] = 1 - top1
                    rows.append({**tag, **_row(m, "clean", CLEAN, "clean", "top1", top1, 10000)})
                    rows.append({**tag, **_row(m, "calibration", CLEAN, "clean", "ece", 0.02 + 0.1 * (1 - top1),
                                               10000, "15 equal-width bins")})
                for m in ("real", "synthetic"):
                    rows.append({**tag, **_row(m, "corruptions", CLEAN, "all", "mce", 100 * err[m] / err["real"],
                                               1500, "baseline real")})
                cov = min(1.0, 0.2 * np.log2(ipc / 50)) * (0.9 if g == 4.0 else 1.0)
                for cls, v in (("all", cov), ("Bag", cov / 2)):
                    diag.append({**tag, "dataset": "gen", "reference": "fashion_mnist:test", "features": "model:t",
                                 "class": cls, "metric": "coverage", "value": v, "n": 100, "convention": "k=5",
                                 "inspected": "train"})
    pd.DataFrame(rows).to_parquet(root / "results.parquet")
    pd.DataFrame(diag).to_parquet(root / "diagnostics.parquet")
    (root / "sweep.json").write_text(json.dumps({
        "recipe": "recipes/fmnist_sweep.yaml", "title": "sweep test", "grid": SWEEP_GRID, "seeds": [0, 1],
        "metrics": SWEEP_METRICS, "models": None, "points": points}))
    return root


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    from synclone.report.sweep import build_sweep_report

    folder = write_sweep_folder(tmp_path_factory.mktemp("sweep"))
    return build_sweep_report(folder)


def test_sweep_section_draws_every_curve_and_the_best_points(sweep_report):
    html = sweep_report.read_text()
    p = parse(html)
    sec = p.sections["sweep"]
    # one figure per metric and swept variable
    assert len(sec["imgs"]) == len(SWEEP_METRICS) * len(SWEEP_GRID)
    best, every = sec["tables"]
    header = [c[0] for c in best[0]]
    rows = {(r[0][0], r[1][0]): r for r in best[1:]}
    # top-1 of the clone is best at the most data and guidance 1, worst at the least and guidance 4
    clone = rows[("Clean top-1", "synthetic")]
    assert clone[header.index("best point")][0] == "images_per_class = 500, guidance = 1"
    assert clone[header.index("worst point")][0] == "images_per_class = 100, guidance = 4"
    mean = np.mean([_sweep_top1("synthetic", 500, 1.0, s) for s in (0, 1)])
    std = np.std([_sweep_top1("synthetic", 500, 1.0, s) for s in (0, 1)], ddof=1)
    assert clone[header.index("best (mean ± std)")][0] == f"{100 * mean:.1f}% ± {100 * std:.1f}%"
    # lower is better for ECE and mCE: the best point is where the clone is most accurate
    assert rows[("ECE", "synthetic")][header.index("best point")][0] == "images_per_class = 500, guidance = 1"
    assert rows[("mCE", "synthetic")][header.index("best point")][0] == "images_per_class = 500, guidance = 1"
    # a diagnostic: one line per inspected dataset, from the pooled ("all") rows only
    cov = rows[("coverage (diagnostics)", "train")]
    assert cov[header.index("best point")][0] == "images_per_class = 500, guidance = 1"
    assert cov[header.index("best (mean ± std)")][0] == f"{min(1.0, 0.2 * np.log2(10)):.3f} ± 0.000"
    # every grid point x model in the second table, the best per column marked
    assert len(every) - 1 == 6 * 2 + 6  # 6 grid points x (2 models + the inspected dataset)
    md = (sweep_report.parent / "report.md").read_text()
    assert "## Sweep" in md and md.count("![") == len(SWEEP_METRICS) * len(SWEEP_GRID)


@needs_chromium
def test_sweep_report_renders_in_headless_chromium(sweep_report, tmp_path):
    html = sweep_report.read_text()
    check = _browser_check(html, tmp_path)
    assert check["broken"] == 0, check
    assert check["images"] == len(SWEEP_METRICS) * len(SWEEP_GRID)  # every curve is on the page
    assert check["empty"] == [] and not check["overflow"], check
