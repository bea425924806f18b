"""The CLI end to end on a small real subset, and every bad input ending as one line with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from synclone import load_model
from synclone.cli import main
from synclone.data.fashion_mnist import load_fashion_mnist

TINY = ["model.arch=synclone_cnn_tiny", "data.real_per_class=30", "optim.steps=30", "optim.warmup_steps=5",
        "data.val_max=200", "threads=1"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny model trained through the CLI on 300 real images (shared by the tests below)."""
    root = tmp_path_factory.mktemp("cli")
    code = main(["train", f"output={root / 'run'}", *TINY, "--quiet"])
    assert code == 0
    return root


def test_train_writes_model_folder_and_run_snapshot(trained):
    run = trained / "run"
    cfg = json.loads((run / "model" / "config.json").read_text())
    assert cfg["arch"] == "synclone_cnn_tiny" and cfg["label_space"]["classes"][0] == "T-shirt/top"
    assert cfg["input_size"] == [1, 28, 28] and "mean" in cfg["preprocessing"]
    assert (run / "model" / "model.safetensors").is_file()
    snap = json.loads((run / "run.json").read_text())
    assert snap["git_sha"] and "torch" in snap["versions"]
    # The kernel level decides the float rounding, so a run records the one torch used here.
    assert snap["host"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and snap["host"]["cpu"]
    resolved = (run / "config.yaml").read_text()
    assert "real_per_class: 30" in resolved and "steps: 30" in resolved
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selected_by"] == "validation"


def test_load_model_normalises_inside(trained):
    model = load_model(trained / "run" / "model")
    x = torch.rand(4, 1, 28, 28)
    mean = torch.tensor(model.config()["preprocessing"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(model.config()["preprocessing"]["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net((x - mean) / std), atol=1e-5)


def test_evaluate_and_report_end_to_end(trained, capsys):
    ev = trained / "eval"
    code, out, _ = run_cli(capsys, "evaluate", f"tiny={trained / 'run' / 'model'}", "--output", str(ev),
                           "--probes", "clean,calibration", "--max-images", "400", "--quiet")
    assert code == 0, out
    df = pd.read_parquet(ev / "results.parquet")
    assert list(df.columns) == ["model", "probe", "dataset", "variant", "metric", "value", "n", "convention"]
    assert pd.read_csv(ev / "results.csv").shape == df.shape
    top1 = df[(df.probe == "clean") & (df.metric == "top1")]
    assert len(top1) == 1 and top1.model.iloc[0] == "tiny" and top1.n.iloc[0] == 400
    # The row equals an independent computation on the same seeded subset.
    test = load_fashion_mnist("test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:400].sort().values
    model = load_model(trained / "run" / "model")
    with torch.no_grad():
        pred = model(test.images[idx].float() / 255).argmax(1)
    assert top1.value.iloc[0] == pytest.approx(float((pred == test.labels[idx]).float().mean()), abs=1e-6)
    assert {"ece", "nll", "brier"} <= set(df[df.probe == "calibration"].metric)
    assert "bins=15" in df[df.metric == "ece"].convention.iloc[0]

    code, out, _ = run_cli(capsys, "report", str(ev), "--output", str(trained / "report"))
    assert code == 0
    html = (trained / "report" / "report.html").read_text()
    md = (trained / "report" / "report.md").read_text()
    assert "tiny" in html and "tiny" in md
    assert f"{100 * top1.value.iloc[0]:.1f}" in md


def test_existing_run_needs_resume(trained, capsys):
    code, _, err = run_cli(capsys, "train", f"output={trained / 'run'}", *TINY, "--quiet")
    assert code == 2 and "--resume" in err and err.count("\n") == 1


def _one_line_error(capsys, *argv: str) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_unknown_config_key_names_it(capsys, tmp_path):
    assert "unknown config key 'optim.epocs'" in _one_line_error(capsys, "train", "optim.epocs=3")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  arch: synclone_cnn_tiny\n  widht: 3\n")
    assert "unknown config key 'model.widht'" in _one_line_error(capsys, "train", str(cfg))
    assert "probes.ood.scorez" in _one_line_error(capsys, "evaluate", "x", "--set", "probes.ood.scorez=[msp]")
    assert "unknown probe 'robustnes'" in _one_line_error(capsys, "evaluate", "x", "--probes", "robustnes")


def test_bad_yaml_and_bad_values(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("optim: [1, 2\n")
    assert "not valid YAML" in _one_line_error(capsys, "train", str(cfg))
    assert "optim.lr" in _one_line_error(capsys, "train", "optim.lr=-1")


def test_missing_data_is_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SYNCLONE_DATA", str(tmp_path))
    err = _one_line_error(capsys, "train", f"output={tmp_path / 'r'}", *TINY, "--quiet")
    assert "no Fashion-MNIST train files" in err and not (tmp_path / "r" / "model").exists()


def test_unreadable_model_folders(trained, capsys, tmp_path):
    assert "does not exist" in _one_line_error(capsys, "evaluate", str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"junk")
    assert "not valid JSON" in _one_line_error(capsys, "evaluate", str(broken))
    # A folder whose weights don't match its config: the config claims a wider network.
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    cfg = json.loads((trained / "run" / "model" / "config.json").read_text())
    cfg["arch"] = "synclone_cnn_small"
    (mismatch / "config.json").write_text(json.dumps(cfg))
    (mismatch / "model.safetensors").write_bytes((trained / "run" / "model" / "model.safetensors").read_bytes())
    assert "don't match its config" in _one_line_error(capsys, "evaluate", str(mismatch))
    # Garbage weights: safetensors refuses them, and we say which file.
    (mismatch / "model.safetensors").write_bytes(b"\x00" * 64)
    cfg["arch"] = "synclone_cnn_tiny"
    (mismatch / "config.json").write_text(json.dumps(cfg))
    assert "cannot read" in _one_line_error(capsys, "evaluate", str(mismatch))


def test_label_space_mismatch_is_named(trained, capsys, tmp_path):
    folder = tmp_path / "animals"
    for c in ("cat", "dog"):
        (folder / c).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (28, 28), color=40 * i).save(folder / c / f"{i}.png")
    err = _one_line_error(capsys, "evaluate", str(trained / "run" / "model"), "--data", str(folder),
                          "--output", str(tmp_path / "e"))
    assert "model 'run'" in err and "cat" in err


def test_console_script_runs_as_a_process(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    exe = Path(sys.executable).parent / "synclone"
    res = subprocess.run([str(exe), "train", "optim.epocs=1"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "error: config: unknown config key 'optim.epocs'"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "evaluate" in res.stdout


def test_fewshot_from_the_cli(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--kind", "fewshot", "--shots", "3", "--seeds", "0",
                             f"output={tmp_path / 'fs'}", "model.arch=synclone_cnn_tiny", "optim.steps=6",
                             "optim.warmup_steps=1", "data.val_max=50", "threads=1", "--quiet")
    assert code == 0, err
    assert "top-1 over 1 seed(s):" in err and out.strip().endswith("fewshot.json")
    res = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    assert res["n"] == 1 and res["std"] is None and 0.0 <= res["mean"] <= 1.0


def test_run_records_the_cpu_kernel_level_it_was_made_with(tmp_path):
    """Forcing torch's portable kernels (which round differently) must show in run.json: the record follows
    the kernels a process uses, not the CPU's flags."""
    code = ("import sys; from synclone.config import write_run_info; "
            "print(write_run_info(sys.argv[1])['host']['cpu_capability'])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "DEFAULT"
    assert json.loads((tmp_path / "run.json").read_text())["host"]["cpu_capability"] == "DEFAULT"
