"""``synclone run`` / ``synclone demo``: the chain, its skip/resume logic, dry-run checks, the quick demo."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from _interrupt import cli_until
from synclone.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
GEN = {"backend": "classcond", "model": "builtin:fashion_mnist", "steps": 2, "guidance_scale": 2.0}


def small_recipe(out: Path, train_steps: int = 30) -> dict:
    """Generate -> train (real and synthetic) -> evaluate -> report, tiny sizes."""
    tiny = {"arch": "synclone_cnn_tiny"}
    optim = {"steps": train_steps, "batch_size": 32, "warmup_steps": 2}
    return {
        "output": str(out),
        "title": "pipeline test",
        "generate": {"train": {"generator": GEN, "images_per_class": 8, "batch_size": 20, "seed": 0}},
        "train": {
            "real": {"model": tiny, "data": {"real": "fashion_mnist", "real_per_class": 20, "val_max": 100},
                     "optim": optim, "checkpoint_every": 5, "threads": 1},
            "synthetic": {"model": tiny, "data": {"real": None, "synthetic": "@generated.train", "val_max": 100},
                          "optim": optim, "checkpoint_every": 5, "threads": 1},
        },
        "evaluate": {"max_images": 200, "probes": {"clean": {}, "calibration": {}}},
    }


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def test_dry_run_reports_plan_and_writes_nothing(tmp_path, capsys):
    p = write(tmp_path, small_recipe(tmp_path / "out"))
    code, out = run(capsys, "run", str(p), "--dry-run")
    assert code == 0
    assert "generate.train" in out and "train.synthetic" in out and "estimated" in out and "MB of disk" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["train"]["real"]["optim"].update(epocs=2), "unknown config key 'optim.epocs'"),
    (lambda r: r.update(trian={}), "unknown config key 'trian'"),
    (lambda r: r["train"]["synthetic"]["data"].update(synthetic="/no/such/folder"), "neither a built-in"),
    (lambda r: r["train"]["synthetic"]["data"].update(synthetic="@generated.tain"),
     "unknown reference '@generated.tain'"),
    (lambda r: r["generate"]["train"].update(labels=["cat", "dog"]), "cannot make"),
    (lambda r: r["train"]["real"]["data"].update(synthetic="@generated.train"), None),  # fine: same label space
])
def test_bad_recipes_fail_before_any_work(tmp_path, capsys, edit, message):
    recipe = small_recipe(tmp_path / "out")
    edit(recipe)
    p = write(tmp_path, recipe)
    code, out = run(capsys, "run", str(p), "--dry-run")
    if message is None:
        assert code == 0
        return
    assert code == 2 and message in out, out
    assert not (tmp_path / "out").exists()


def test_label_spaces_must_align_across_stages(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "out")
    recipe["generate"]["train"]["labels"] = ["Trouser", "Bag"]  # the built-in generator knows both
    recipe["train"]["real"]["data"]["synthetic"] = "@generated.train"
    code, out = run(capsys, "run", str(write(tmp_path, recipe)), "--dry-run")
    assert code == 2 and "label spaces don't align" in out and "train.real" in out


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_results(tmp_path, capsys):
    ref = write(tmp_path, small_recipe(tmp_path / "ref", train_steps=150), "ref.yaml")
    assert main(["run", str(ref)]) == 0
    capsys.readouterr()
    out = tmp_path / "int"
    rec = write(tmp_path, small_recipe(out, train_steps=150), "int.yaml")
    gen = out / "generated" / "train" / "train"
    # 1) killed during generation, once some images exist
    cli_until(["run", str(rec)], lambda: gen.is_dir() and len(list(gen.rglob("*.png"))) >= 20, ENV)
    assert not (out / "generated" / "train" / "stage.json").exists()
    # 2) killed during training of the real model, after its first checkpoint
    ckpt = out / "train" / "real" / "checkpoints" / "last.pt"
    cli_until(["run", str(rec)], ckpt.is_file, ENV)
    assert (out / "generated" / "train" / "stage.json").exists()
    assert not (out / "train" / "real" / "stage.json").exists()
    gen_mtime = (out / "generated" / "train" / "stage.json").stat().st_mtime
    # 3) finish: generation is not redone, training resumes
    assert main(["run", str(rec)]) == 0
    assert (out / "generated" / "train" / "stage.json").stat().st_mtime == gen_mtime
    a = pd.read_parquet(tmp_path / "ref" / "eval" / "results.parquet")
    b = pd.read_parquet(out / "eval" / "results.parquet")
    pd.testing.assert_frame_equal(a, b)
    # the generated images are byte-identical
    for f in sorted((tmp_path / "ref" / "generated" / "train" / "train").rglob("*.png")):
        g = out / f.relative_to(tmp_path / "ref")
        assert f.read_bytes() == g.read_bytes()
    # 4) a third run skips everything
    t0 = time.time()
    assert main(["run", str(rec)]) == 0
    timings = json.loads((out / "timings.json").read_text())
    skipped = {k: v for k, v in timings.items() if not k.startswith(("evaluate", "report"))}
    # skipped, but each still reports the seconds it took when it ran
    assert all(not v["ran"] and v["seconds"] > 0 for v in skipped.values()), timings
    assert time.time() - t0 < 60


def test_changed_stage_config_is_refused_not_overwritten(tmp_path, capsys):
    recipe = small_recipe(tmp_path / "out", train_steps=10)
    recipe["train"].pop("synthetic")
    recipe["generate"] = {}
    assert main(["run", str(write(tmp_path, recipe))]) == 0
    weights = (tmp_path / "out" / "train" / "real" / "model" / "model.safetensors").read_bytes()
    recipe["train"]["real"]["optim"]["steps"] = 12
    code, out = run(capsys, "run", str(write(tmp_path, recipe)))
    assert code == 2 and "train.real" in out and "another config" in out
    assert (tmp_path / "out" / "train" / "real" / "model" / "model.safetensors").read_bytes() == weights


def test_quick_demo_end_to_end(tmp_path, capsys):
    code, out = run(capsys, "demo", "--quick", "--output", str(tmp_path / "demo"))
    assert code == 0, out
    demo = tmp_path / "demo"
    html = (demo / "report.html").read_text()
    df = pd.read_parquet(demo / "eval" / "results.parquet")
    models = {"real", "synthetic", "real_plus_synthetic", "real_100pc", "real_500pc", "real_2000pc"}
    assert set(df.model) >= models
    probes = set(df.probe)
    assert {"clean", "calibration", "shift", "ood", "corruptions", "adversarial", "shape_bias", "background"} <= probes
    # The report's numbers come from this run's results.
    real_top1 = df[(df.model == "real") & (df.probe == "clean") & (df.metric == "top1")].value.iloc[0]
    assert f"{100 * real_top1:.1f}" in html
    assert "effective_robustness" in set(df.metric)
    # Dataset diagnostics of the generated and the curated sets, in the real model's features, in the report.
    for name in ("generated/train", "curated"):
        ins = pd.read_parquet(demo / name / "inspect" / "results.parquet")
        assert set(ins.features) == {"model:real"} and "coverage" in set(ins.metric)
    assert 'id="dataset"' in html and "Dataset diagnostics" in html
