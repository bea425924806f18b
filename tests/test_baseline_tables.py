"""Published accuracy tables as ER baselines: `synclone er` against scipy.stats.linregress on logits, one table
per shifted set in the shift probe (never another set's trend), and a table missing a named column."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.special import expit
from scipy.special import logit as sp_logit
from scipy.stats import linregress

from synclone.cli import main
from synclone.errors import UserError
from synclone.evaluate import EvaluateConfig, evaluate
from synclone.labels import FASHION_MNIST
from synclone.models import create_classifier, save_model
from synclone.probes.shift import BaselineTable, read_baseline_table

V2 = "imagenetv2-matched-frequency-format-val"


def published_table(path, n: int = 14, seed: int = 0):
    """A table shaped like the imagenet-testbed's results: one row per model, one column per evaluation setting,
    accuracies in percent, a few models not run on some settings (blank), a model-type column."""
    rng = np.random.default_rng(seed)
    val = rng.uniform(55, 88, n)
    v2 = 100 * expit(0.9 * sp_logit(val / 100) - 0.5 + rng.normal(0, 0.08, n))
    val_r = np.clip(val + rng.normal(3, 1.5, n), 0, 99)
    r = 100 * expit(1.2 * sp_logit(val_r / 100) - 2.2 + rng.normal(0, 0.2, n))
    df = pd.DataFrame({"model": [f"net{i}" for i in range(n)], "val": val, V2: v2, "imagenet-r": r,
                       "val-on-imagenet-r-classes": val_r,
                       "type": ["STANDARD"] * (n - 4) + ["MORE_DATA"] * 2 + ["ROBUST_INTV"] * 2})
    df.loc[2, "imagenet-r"] = np.nan  # not evaluated on ImageNet-R
    df.to_csv(path, index=False)
    return df


def _printed(out: str) -> tuple[dict, dict]:
    fit_line = next(line for line in out.splitlines() if line.startswith("fit:"))
    slope, intercept = (float(v) for v in re.findall(r"= (-?[\d.e+-]+) \* logit\(.*?\) \+ (-?[\d.e+-]+)",
                                                      fit_line)[0])
    fit = {"slope": slope, "intercept": intercept, "r2": float(re.search(r"R\^2 = ([\d.e+-]+)", fit_line)[1]),
           "n": int(re.search(r"n = (\d+)", fit_line)[1])}
    er = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("net"):
            er[parts[0]] = float(parts[-1])
    return fit, er


def test_er_command_matches_linregress_on_logits(tmp_path, capsys):
    df = published_table(tmp_path / "results.csv")
    code = main(["er", str(tmp_path / "results.csv"), "--id", "val-on-imagenet-r-classes", "--shift", "imagenet-r",
                 "--filter", "type=STANDARD", "--models", "net0,net3"])
    out = capsys.readouterr().out
    assert code == 0, out
    fit, er = _printed(out)
    base = df[(df.type == "STANDARD") & df["imagenet-r"].notna() & ~df.model.isin(["net0", "net3"])]
    ref = linregress(sp_logit(base["val-on-imagenet-r-classes"] / 100), sp_logit(base["imagenet-r"] / 100))
    assert fit["n"] == len(base) == 7  # 10 standard, minus the blank row, minus the two scored
    assert fit["slope"] == pytest.approx(ref.slope, rel=1e-5)
    assert fit["intercept"] == pytest.approx(ref.intercept, rel=1e-5, abs=1e-5)
    assert fit["r2"] == pytest.approx(ref.rvalue ** 2, rel=1e-5)
    for m in ("net0", "net3"):
        row = df.set_index("model").loc[m]
        pred = expit(ref.slope * sp_logit(row["val-on-imagenet-r-classes"] / 100) + ref.intercept)
        assert er[m] == pytest.approx(100 * (row["imagenet-r"] / 100 - pred), abs=0.006)  # printed to 2 decimals
    assert "read as percent" in out and "1 rows blank" in out


def test_table_missing_a_named_column_lists_its_columns(tmp_path, capsys):
    published_table(tmp_path / "results.csv")
    code = main(["er", str(tmp_path / "results.csv"), "--id", "val", "--shift", "imagenetv2-matched-frequency"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "no column 'imagenetv2-matched-frequency'" in err
    assert f"its columns: model, val, {V2}, imagenet-r, val-on-imagenet-r-classes, type" in err
    # The testbed keeps model types in a separate list: joined as column 'type' for the filter.
    import json

    types = {f"net{i}": ("STANDARD" if i < 5 else "ROBUST_INTV") for i in range(14)}
    (tmp_path / "types.json").write_text(json.dumps(types))
    no_type = pd.read_csv(tmp_path / "results.csv").drop(columns="type")
    no_type.to_csv(tmp_path / "plain.csv", index=False)
    code = main(["er", str(tmp_path / "plain.csv"), "--id", "val", "--shift", V2, "--types",
                 str(tmp_path / "types.json"), "--filter", "type=STANDARD"])
    out = capsys.readouterr().out
    assert code == 0 and "n = 5 baselines" in out
    with pytest.raises(UserError, match="no column 'acc'.*its columns: model, val"):
        read_baseline_table(BaselineTable(csv=str(tmp_path / "results.csv"), id_column="acc", shift_column="val"))


# --- one table per shifted set in the shift probe -----------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from synclone.data.fashion_mnist import load_fashion_mnist

    root = tmp_path_factory.mktemp("er_tables")
    models = {}
    for seed in range(3):
        torch.manual_seed(seed)
        m = create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28), [0.286], [0.353])
        models[f"m{seed}"] = str(save_model(m, root / f"m{seed}"))
    test = load_fashion_mnist("test")
    sets = {}
    for name, fn in (("inverted", lambda a: 255 - a), ("dark", lambda a: a // 3), ("flipped", lambda a: a[:, ::-1])):
        folder = root / name
        for i in range(40):
            sub = folder / FASHION_MNIST.slugs[int(test.labels[i])]
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(fn(test.images[i, 0].numpy()))).save(sub / f"{i}.png")
        sets[name] = str(folder)
    published_table(root / "results.csv")
    return root, models, sets


def test_each_shifted_set_gets_its_own_table_and_one_without_gets_none(setup, tmp_path, capsys):
    root, models, sets = setup
    csv = str(root / "results.csv")
    probes = {"clean": {}, "shift": {
        "datasets": [sets["inverted"], sets["dark"], sets["flipped"]],
        "baselines": {sets["inverted"]: {"csv": csv, "id_column": "val", "shift_column": V2,
                                         "filter": {"type": "STANDARD"}, "scale": "percent"},
                      "dark": {"csv": csv, "id_column": "val-on-imagenet-r-classes", "shift_column": "imagenet-r"}}}}
    df = evaluate(EvaluateConfig(output=str(tmp_path / "e"), models=models, max_images=200, probes=probes),
                  progress=False)
    er = df[(df.probe == "shift") & (df.metric == "effective_robustness")]
    assert set(er.dataset) == {"inverted", "dark"}  # flipped has no table: no ER
    assert "note: no baseline table for shifted set 'flipped'" in capsys.readouterr().out
    table = pd.read_csv(csv)
    std = table[table.type == "STANDARD"]
    ref_v2 = linregress(sp_logit(std.val / 100), sp_logit(std[V2] / 100))
    conv_v2 = er[er.dataset == "inverted"].convention.iloc[0]
    assert f"slope={ref_v2.slope:.4g}" in conv_v2 and "baselines=10" in conv_v2
    r = table[table["imagenet-r"].notna()]
    ref_r = linregress(sp_logit(r["val-on-imagenet-r-classes"] / 100), sp_logit(r["imagenet-r"] / 100))
    conv_r = er[er.dataset == "dark"].convention.iloc[0]
    assert f"slope={ref_r.slope:.4g}" in conv_r and "baselines=13" in conv_r
    # each model's ER on 'inverted' is against V2's trend, computed from this run's clean and shifted accuracy
    clean = df[(df.probe == "clean") & (df.metric == "top1")].set_index("model").value
    shifted = df[(df.probe == "shift") & (df.metric == "top1") & (df.dataset == "inverted")].set_index("model").value
    for m in models:
        pred = expit(ref_v2.slope * sp_logit(np.clip(clean[m], 1e-4, 1 - 1e-4)) + ref_v2.intercept)
        got = er[(er.dataset == "inverted") & (er.model == m)].value.iloc[0]
        assert got == pytest.approx(100 * (shifted[m] - pred), abs=1e-6)


def test_one_csv_for_several_sets_is_refused(setup, tmp_path):
    root, models, sets = setup
    probes = {"shift": {"datasets": [sets["inverted"], sets["dark"]], "baselines_csv": str(root / "results.csv")}}
    with pytest.raises(UserError, match="baselines_csv holds one shifted set's accuracies but datasets lists 2"):
        evaluate(EvaluateConfig(output=str(tmp_path / "e"), models=models, max_images=50, probes=probes),
                 progress=False)
    probes = {"shift": {"datasets": [sets["inverted"]], "baselines": {"imagenet-r": str(root / "results.csv")}}}
    with pytest.raises(UserError, match="names 'imagenet-r', which is not among probes.shift.datasets"):
        evaluate(EvaluateConfig(output=str(tmp_path / "e2"), models=models, max_images=50, probes=probes),
                 progress=False)
