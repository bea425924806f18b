"""recipes/fmnist_adaptation.yaml: the shifted domain, its dry run, the report table, and the quick run end to end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synclone.cli import main
from synclone.recipe.plan import load_recipe, plan

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fmnist_adaptation.yaml"
ENTRIES = ["syn_unadapted", "syn_sdedit", "syn_lora", "syn_full", "shots_only", "shots_lora", "shots_full"]


def test_shifted_domain_is_inverted_fashion_mnist(tmp_path):
    from synclone.data import load_fashion_mnist
    from synclone.data.folder import load_image_folder_tensors, read_dataset_folder
    from synclone.data.shifted import ShiftedDomainConfig, make_shifted_domain

    out = make_shifted_domain(ShiftedDomainConfig(shots_per_class=2, test_per_class=3, output=str(tmp_path / "d")))
    shots = load_image_folder_tensors(out / "shots")
    test = load_image_folder_tensors(out / "shifted_test")
    assert len(shots) == 20 and len(test) == 30 and shots.label_space.classes[0] == "T-shirt/top"
    assert np.bincount(shots.labels.numpy()).tolist() == [2] * 10
    records, _ = read_dataset_folder(out / "shots")
    fm = load_fashion_mnist("train")
    for r in records[:5]:  # each shot is 255 minus the training image its id names
        i = int(r.id.rsplit("-", 1)[1])
        assert r.label == int(fm.labels[i])
        assert np.array_equal(np.asarray(Image.open(r.path)), 255 - fm.images[i, 0].numpy())
    # The references folder real guidance reads: one sub-folder of images per class.
    assert sorted(p.name for p in (out / "shots" / "train").iterdir() if p.is_dir()) == sorted(shots.label_space.slugs)


def test_dry_run_plans_every_arm(tmp_path, capsys):
    code = main(["run", str(RECIPE), "--dry-run", "--quick", f"output={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert code == 0, out
    for stage in ("domain", "finetune.lora", "finetune.full", "generate.sdedit", "generate.full",
                  "train.shots_lora", "evaluate", "report"):
        assert stage in out
    assert not (tmp_path / "out").exists()
    full = load_recipe(RECIPE)
    assert all(full.train[e]["seeds"] == [0, 1, 2] for e in ENTRIES)
    stages = {s.name: s for s in plan(full)}
    assert stages["generate.lora"].cfg.generator.lora.endswith("finetune/lora")
    assert stages["generate.full"].cfg.generator.model.endswith("finetune/full/pipeline")
    assert stages["generate.sdedit"].cfg.generator.options["references"].endswith("domain/shots/train")
    assert len(stages["evaluate"].cfg.models) == len(ENTRIES) * 3
    assert stages["report"].cfg.adaptation["models"] == ENTRIES


def test_adaptation_table_means_over_seeds():
    from synclone.report.adaptation import adaptation_table

    rows = []
    for seed, (s, c) in enumerate([(0.50, 0.80), (0.70, 0.90)]):
        rows += [{"model": f"syn_lora_seed{seed}", "probe": "shift", "dataset": "test", "metric": "top1", "value": s},
                 {"model": f"syn_lora_seed{seed}", "probe": "clean", "dataset": "fm", "metric": "top1", "value": c}]
    rows.append({"model": "shots_only_seed0", "probe": "shift", "dataset": "test", "metric": "top1", "value": 0.4})
    cols, table = adaptation_table(pd.DataFrame(rows), "test", ["syn_lora", "shots_only", "absent"])
    assert cols[1].startswith("shifted")
    # mean 60.0, sample std of (50, 70) = 14.1; one seed has no std
    assert table == [["syn_lora", "60.0 ± 14.1", "85.0 ± 7.1", "2"], ["shots_only", "40.0", "–", "1"]]


@pytest.mark.slow
def test_quick_miniature_runs_end_to_end(tmp_path, capsys):
    t0 = time.perf_counter()
    code = main(["run", str(RECIPE), "--quick", f"output={tmp_path / 'q'}"])
    took = time.perf_counter() - t0
    assert code == 0, capsys.readouterr().err[-3000:]
    report = (tmp_path / "q" / "report.md").read_text()
    assert "## Adapting the generator" in report
    assert all(f"| {e} |" in report for e in ENTRIES)
    rec = json.loads((tmp_path / "q" / "finetune" / "lora" / "synclone_adapter.json").read_text())
    assert rec["denoising_loss"]["after"] < rec["denoising_loss"]["before"]
    ds = json.loads((tmp_path / "q" / "generated" / "lora" / "dataset.json").read_text())
    assert ds["generator"]["lora"]["sha256"]
    print(f"quick miniature: {took:.0f} s")
