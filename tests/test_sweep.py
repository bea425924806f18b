"""``synclone sweep``: every grid point a recipe run, stages shared through their config keys, one long table.

The recipes here are tiny (a few images per class, a few training steps); the quick miniature of
``recipes/fmnist_sweep.yaml`` and the kill-and-resume test are slow.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from _interrupt import cli_until
from synclone.cli import main
from synclone.recipe.sweep import load_sweep, parse_grid

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def tiny_recipe(out: Path, inspect: bool = False) -> dict:
    """Generate (ipc images per class, fixed seed) -> a real and a synthetic model (seed) -> clean + calibration."""
    tiny = {"arch": "synclone_cnn_tiny"}
    optim = {"steps": "${steps}", "batch_size": 32, "warmup_steps": 2}
    recipe = {
        "output": str(out),
        "title": "sweep test",
        "vars": {"ipc": 6, "seed": 0, "steps": 8},
        "generate": {"train": {"generator": {"backend": "classcond", "model": "builtin:fashion_mnist", "steps": 2,
                                             "guidance_scale": 2.0},
                               "images_per_class": "${ipc}", "batch_size": 100, "seed": 0}},
        "train": {
            "real": {"model": tiny, "data": {"real": "fashion_mnist", "real_per_class": 20, "val_max": 100},
                     "optim": optim, "seed": "${seed}", "checkpoint_every": 4, "threads": 1},
            "synthetic": {"model": tiny, "data": {"real": None, "synthetic": "@generated.train", "val_max": 100},
                          "optim": optim, "seed": "${seed}", "checkpoint_every": 4, "threads": 1},
        },
        "evaluate": {"max_images": 200, "threads": 1, "probes": {"clean": {}, "calibration": {}}},
        "sweep": {"metrics": ["clean_top1", "ece"]},
    }
    if inspect:
        recipe["inspect"] = {"features": "pixels:8", "max_per_class": 8, "kid_subsets": 2, "kid_subset_size": 4,
                             "grid_examples": 0, "worst_covered": 0}
        recipe["sweep"]["metrics"].append("inspect/coverage")
    return recipe


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def ran(sweep_dir: Path, point: str) -> set[str]:
    """The stages a point's last run actually ran (timings.json 'ran' flags)."""
    times = json.loads((sweep_dir / "points" / point / "timings.json").read_text())
    return {k for k, v in times.items() if v["ran"]}


# --- checking the grid ---------------------------------------------------------------------------------------

def test_grid_values_are_typed_and_keys_name_variables():
    assert parse_grid(["vars.ipc=100,250", "vars.guidance=1,2.5", "name=a,b"]) == {
        "ipc": [100, 250], "guidance": [1, 2.5], "name": ["a", "b"]}


def test_points_are_every_combination_times_seeds(tmp_path):
    rec = write(tmp_path / "r.yaml", {**tiny_recipe(tmp_path / "out"), "vars": {"ipc": 6, "seed": 0, "steps": 8,
                                                                               "g": 1}})
    sw = load_sweep(rec, grid=["vars.ipc=4,8", "vars.g=1,2,4"], seeds="0,1")
    assert len(sw.points) == 2 * 3 * 2
    assert sw.points[0].id == "ipc-4__g-1__seed-0" and sw.points[-1].id == "ipc-8__g-4__seed-1"
    assert sw.output == tmp_path / "out"  # the recipe's own output folder by default
    r = sw.point_recipe(sw.points[-1])
    assert r.vars == {"ipc": 8, "seed": 1, "steps": 8, "g": 4}
    assert r.output == str(tmp_path / "out" / "points" / "ipc-8__g-4__seed-1")
    assert r.generate["train"]["images_per_class"] == 8 and r.train["real"]["seed"] == 1


@pytest.mark.parametrize("argv, needle", [
    (["--grid", "vars.guidance=1,2"], "grid key 'guidance' is not a variable of"),
    (["--grid", "train.real.optim.steps=1,2"], "grid key 'train.real.optim.steps' is not a variable of"),
    (["--grid", "vars.ipc="], "lists no values: the grid is empty"),
    ([], "the grid is empty"),
    (["--grid", "vars.ipc=4,4"], "lists the value 4 twice"),
    (["--grid", "vars.ipc=4,6", "--seeds", "0,x"], "--seeds '0,x'"),
    (["--grid", "vars.ipc=4,6", "--metric", "top_one"], "unknown metric 'top_one'"),
    (["--grid", "vars.seed=1,2", "--seeds", "0,1"], "'seed' is both a grid key and --seeds"),
    (["--grid", "vars.ipc=2,many"], "sweep point ipc=many: recipe generate.train: bad value for 'images_per_class'"),
])
def test_bad_grids_are_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    rec = write(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    code, out, err = run(capsys, "sweep", str(rec), *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    if "not a variable" in needle or "grid is empty" in needle:
        assert "this recipe's variables: ipc, seed, steps" in err  # what the user may sweep, named
    assert not (tmp_path / "out").exists()  # nothing was made


def test_seeds_need_a_seed_variable(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path / "out")
    recipe["vars"].pop("seed")
    for entry in recipe["train"].values():
        entry["seed"] = 0
    rec = write(tmp_path / "r.yaml", recipe)
    code, _, err = run(capsys, "sweep", str(rec), "--grid", "vars.ipc=4,6", "--seeds", "0,1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--seeds sets the variable 'seed'" in err and "this recipe's variables: ipc, steps" in err


def test_dry_run_counts_shared_stages(tmp_path, capsys):
    rec = write(tmp_path / "r.yaml", tiny_recipe(tmp_path / "out"))
    code, out, _ = run(capsys, "sweep", str(rec), "--grid", "vars.ipc=4,6,8", "--seeds", "0,1", "--dry-run")
    assert code == 0
    # 6 runs x 5 stages; distinct: 3 generations, 2 real models, 6 clones, and each run's evaluation and report
    assert "6 runs, 30 stages planned, 23 distinct" in out, out
    assert not (tmp_path / "out").exists()


# --- running ---------------------------------------------------------------------------------------------------

def test_stages_are_shared_and_a_changed_grid_value_reruns_only_its_points(tmp_path, capsys):
    out = tmp_path / "sweep"
    rec = write(tmp_path / "r.yaml", tiny_recipe(out))
    code, stdout, err = run(capsys, "sweep", str(rec), "--grid", "vars.ipc=2,3")
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == str(out / "report.html")
    assert ran(out, "ipc-2") == {"generate.train", "train.real", "train.synthetic", "evaluate", "report"}
    # the real model does not depend on ipc: the second point reuses the first point's
    assert ran(out, "ipc-3") == {"generate.train", "train.synthetic", "evaluate", "report"}
    first = pd.read_csv(out / "results.csv")
    assert list(first.columns[:2]) == ["point", "ipc"] and set(first["ipc"]) == {2, 3}
    assert {"model", "probe", "metric", "value"} <= set(first.columns)
    assert len(list((out / "stages").glob("generate.train-*"))) == 2
    assert len(list((out / "stages").glob("train.real-*"))) == 1

    # 3 -> 5: the point at 2 runs nothing; the new point generates and trains its clone, and reuses the real model
    code, _, err = run(capsys, "sweep", str(rec), "--grid", "vars.ipc=2,5")
    assert code == 0, err
    assert ran(out, "ipc-2") == set()
    assert ran(out, "ipc-5") == {"generate.train", "train.synthetic", "evaluate", "report"}
    second = pd.read_parquet(out / "results.parquet")
    assert set(second["ipc"]) == {2, 5}
    pd.testing.assert_frame_equal(
        first[first["ipc"] == 2].reset_index(drop=True),
        pd.read_csv(out / "results.csv").query("ipc == 2").reset_index(drop=True))
    # one real model serves both points: the same top-1 at each
    top1 = second[(second["probe"] == "clean") & (second["metric"] == "top1")].set_index(["ipc", "model"])["value"]
    assert top1[(2, "real")] == top1[(5, "real")]
    assert (out / "report.html").is_file() and 'id="sweep"' in (out / "report.html").read_text()


def test_a_moved_sweep_folder_finds_every_finished_stage(tmp_path, capsys):
    grid = ["--grid", "vars.ipc=2,3"]
    first = tmp_path / "first"
    code, _, err = run(capsys, "sweep", str(write(tmp_path / "a.yaml", tiny_recipe(first, inspect=True))), *grid)
    assert code == 0, err
    assert "different CPUs" not in err  # one machine made every stage
    before = pd.read_parquet(first / "results.parquet")
    keyed = sorted(p.name for p in (first / "stages").iterdir())
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    # the moved folder is continued on "another machine": one stage's record names another CPU
    record = next((moved / "stages").glob("generate.train-*/run.json"))
    info = json.loads(record.read_text())
    here = f"{info['host']['cpu']}, {info['host']['cpu_capability']}"
    info["host"].update(cpu="Other CPU", cpu_capability="AVX512")
    record.write_text(json.dumps(info))
    rec = tmp_path / "a.yaml"
    code, _, err = run(capsys, "sweep", str(rec), *grid, "--out", str(moved))
    assert code == 0, err
    notes = [line for line in err.splitlines() if "different CPUs" in line]
    assert len(notes) == 1 and f"1 on Other CPU, AVX512 ({record.parent.name})" in notes[0] and here in notes[0]
    # stage hashes and store keys hold paths relative to the sweep's folders: nothing is made again
    assert ran(moved, "ipc-2") == set() and ran(moved, "ipc-3") == set()
    assert sorted(p.name for p in (moved / "stages").iterdir()) == keyed
    pd.testing.assert_frame_equal(before, pd.read_parquet(moved / "results.parquet"))
    # and a changed value still reruns what depends on it
    code, _, err = run(capsys, "sweep", str(rec), "--grid", "vars.ipc=2,4", "--out", str(moved))
    assert code == 0, err
    assert ran(moved, "ipc-4") == {"generate.train", "train.synthetic", "inspect.train", "evaluate", "report"}


def test_a_run_continued_on_another_cpu_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    rec = write(tmp_path / "r.yaml", tiny_recipe(out))
    code, _, err = run(capsys, "run", str(rec))
    assert code == 0, err
    assert "different CPUs" not in err
    records = sorted(out.glob("train/*/run.json"))
    assert len(records) == 2  # the real and the synthetic model
    info = json.loads(records[0].read_text())
    info["host"].update(cpu="Other CPU", cpu_capability="DEFAULT")
    records[0].write_text(json.dumps(info))
    code, _, err = run(capsys, "run", str(rec))
    assert code == 0, err
    notes = [line for line in err.splitlines() if "different CPUs" in line]
    assert len(notes) == 1 and f"1 on Other CPU, DEFAULT ({records[0].parent.name})" in notes[0], err


def test_a_store_keyed_by_an_older_release_is_not_redone(tmp_path, capsys, monkeypatch):
    plan_module = importlib.import_module("synclone.recipe.plan")  # the package re-exports plan() under this name
    out = tmp_path / "sweep"
    rec = write(tmp_path / "r.yaml", tiny_recipe(out))
    # releases before portable keys hashed the paths as written: no folder was a token
    monkeypatch.setattr(plan_module, "_roots", lambda **folders: ())
    code, _, err = run(capsys, "sweep", str(rec), "--grid", "vars.ipc=2")
    assert code == 0, err
    def records() -> dict[str, str]:
        return {p.parent.name: json.loads(p.read_text())["hash"] for p in (out / "stages").glob("*/stage.json")}

    old = records()
    monkeypatch.undo()
    code, _, err = run(capsys, "sweep", str(rec), "--grid", "vars.ipc=2")
    assert code == 0, err
    # what the stages made is kept; only the derived evaluation and report, hashed over the new hashes, are redone
    assert ran(out, "ipc-2") == {"evaluate", "report"}
    new = records()
    assert sorted(new) == sorted(old) and len(old) == 3  # the old folders serve: generation, real model, clone
    assert all(new[name] != old[name] for name in old)  # their records now hold the portable hash


@pytest.mark.slow
def test_a_killed_sweep_continues_and_gives_the_same_table(tmp_path, capsys):
    grid = ["--grid", "vars.ipc=4,6", "--seeds", "0,1"]
    ref = tmp_path / "ref"
    code, _, err = run(capsys, "sweep", str(write(tmp_path / "ref.yaml", tiny_recipe(ref, inspect=True))), *grid)
    assert code == 0, err
    out = tmp_path / "int"
    rec = write(tmp_path / "int.yaml", tiny_recipe(out, inspect=True))
    points, stages = out / "points", out / "stages"

    def second_point_started() -> bool:
        # the first point made 4 stage folders (its generation, real model, clone and inspection);
        # the second (seed 1) starts training its own real model in a new one
        made = [p for p in stages.glob("*-*") if p.is_dir()] if stages.is_dir() else []
        return (points / "ipc-4__seed-0" / "timings.json").is_file() and len(made) > 4

    cli_until(["sweep", str(rec), *grid], second_point_started, ENV)
    assert not (out / "results.parquet").exists()
    done_before = {p.name for p in points.iterdir() if (p / "timings.json").is_file()}
    assert "ipc-4__seed-0" in done_before and len(done_before) < 4
    code, _, err = run(capsys, "sweep", str(rec), *grid)
    assert code == 0, err
    # the finished point ran nothing again
    assert ran(out, "ipc-4__seed-0") == set()
    a = pd.read_parquet(ref / "results.parquet")
    b = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(a, b)
    # the dataset's and the inspection's paths differ between the two sweeps (their store keys do not)
    da = pd.read_parquet(ref / "diagnostics.parquet").drop(columns=["dataset", "stage"])
    db = pd.read_parquet(out / "diagnostics.parquet").drop(columns=["dataset", "stage"])
    pd.testing.assert_frame_equal(da, db)
    assert len(a["point"].unique()) == 4 and set(da["inspected"]) == {"train"}


@pytest.mark.slow
def test_quick_fmnist_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "quick"
    t0 = time.time()
    code, stdout, err = run(capsys, "sweep", str(ROOT / "recipes" / "fmnist_sweep.yaml"), "--quick", "--out", str(out))
    took = time.time() - t0
    assert code == 0, err
    res = pd.read_parquet(out / "results.parquet")
    assert set(res["images_per_class"]) == {20, 40} and set(res["guidance"]) == {1, 4} and set(res["seed"]) == {0, 1}
    assert res["point"].nunique() == 8
    assert {"clean", "calibration", "corruptions"} <= set(res["probe"])
    diag = pd.read_parquet(out / "diagnostics.parquet")
    assert diag["point"].nunique() == 8 and {"frechet_distance", "coverage"} <= set(diag["metric"])
    # one generation per guidance serves every size and seed; one teacher serves all; diagnostics per grid point
    stages = out / "stages"
    assert len(list(stages.glob("generate.train-*"))) == 2 and len(list(stages.glob("teacher-*"))) == 1
    assert len(list(stages.glob("train.real-*"))) == 2 and len(list(stages.glob("train.synthetic-*"))) == 8
    assert len(list(stages.glob("inspect.train-*"))) == 4
    info = json.loads((out / "sweep.json").read_text())
    html = (out / "report.html").read_text()
    assert html.count("<img") == len(info["metrics"]) * 2  # every metric against both swept variables
    print(f"quick sweep: {took:.0f} s")
    assert took < 300
