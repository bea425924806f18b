"""recipes/fmnist_pretraining.yaml: its dry run, its --quick overrides, and the quick run end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from synclone.cli import main
from synclone.recipe.plan import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fmnist_pretraining.yaml"
ENCODERS = ["synthetic_multipositive", "synthetic_simclr", "synthetic_supervised", "real_simclr", "random_init"]


def test_dry_run_plans_pretraining_and_transfer(tmp_path, capsys):
    code = main(["run", str(RECIPE), "--dry-run", "--quick", f"output={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in ("train.syn_multipositive", "train.real_simclr", "train.transfer", "evaluate"):
        assert stage in out
    assert not (tmp_path / "out").exists()
    full, quick = load_recipe(RECIPE), load_recipe(RECIPE, quick=True)
    assert full.train["transfer"]["seeds"] == [0, 1, 2] and full.train["transfer"]["shots"] == [10, 100]
    assert quick.train["transfer"]["shots"] == [10] and quick.output.endswith("_quick")
    # Only the supervised pre-training makes a classifier to evaluate; SSL backbones and the table do not.
    from synclone.recipe.plan import plan

    ev = next(s for s in plan(full) if s.name == "evaluate")
    assert list(ev.cfg.models) == ["syn_supervised"]


def test_quick_needs_quick_overrides(tmp_path, capsys):
    bare = tmp_path / "r.yaml"
    bare.write_text("output: x\n", encoding="utf-8")
    assert main(["run", str(bare), "--quick", "--dry-run"]) == 2
    assert "needs a 'quick:' list" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_miniature_runs_end_to_end(tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["run", str(RECIPE), "--quick", f"output={tmp_path / 'q'}"])
    took = time.perf_counter() - t0
    assert code == 0, capsys.readouterr().err[-3000:]
    res = json.loads((tmp_path / "q" / "train" / "transfer" / "results.json").read_text())
    assert len(res["rows"]) == len(ENCODERS) * 3 * 2  # encoders x measures x 2 seeds, 10 shots
    assert all(0.0 <= r["test_top1"] <= 1.0 for r in res["rows"])
    table = (tmp_path / "q" / "train" / "transfer" / "table.md").read_text()
    assert all(f"| {e} |" in table for e in ENCODERS)
    assert (tmp_path / "q" / "train" / "transfer" / "transfer.png").stat().st_size > 1000
    conf = json.loads((tmp_path / "q" / "train" / "syn_multipositive" / "model" / "config.json").read_text())
    assert conf["training"]["backbone_only"] and conf["training"]["pretraining"]["groups"] is None
    report = (tmp_path / "q" / "report.md").read_text()
    assert "## Pre-training" in report and "| synthetic_multipositive |" in report
    print(f"quick miniature: {took:.0f} s")
