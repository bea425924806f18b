"""Hostile inputs and concurrent writers: each one clear line and exit code 2, nothing earlier lost.

Every case drives the real CLI (``synclone.cli.main`` or a subprocess) on tiny inputs and checks four things:
the exit code is 2 (or the bad item is a recorded skip), the message is one line naming the file / key / model,
there is no traceback, and the output folder's earlier contents are unchanged.

The 14 causes of issue 22 and their tests:

1. no lock on an output folder: ``test_two_generate_runs_on_one_folder`` (slow; more in test_lock.py)
2. streamed reads and unreadable files: ``test_streamed_read_of_a_bomb_is_one_line``,
   ``test_streamed_folder_skips_and_records_unusable_files``, ``test_evaluate_skips_undecodable_images_and_limits_them``
   (streamed and in memory), ``test_training_in_memory_skips_...``, ``test_training_on_shards_skips_...``,
   ``test_training_on_a_cut_short_shard_is_one_line_naming_it``, ``test_max_unreadable_is_one_setting_...``,
   ``test_probes_skip_undecodable_images_and_limit_them`` (linear probe, kNN),
   ``test_fewshot_evaluation_set_limits_its_unreadable_images``
   (the DataLoader worker path: test_train_augment.py ``test_unreadable_images_are_skipped_counted_and_limited``)
3. rows pointing at /dev/zero or a FIFO: ``test_open_image_refuses_devices_fifos_and_bombs``,
   ``test_unreadable_rows_become_recorded_skips``
4. class names over 255 bytes: ``test_long_class_names_get_short_unique_slugs``, ``test_generate_with_a_300_byte_...``
5. - 8. non-UTF-8 YAML, alias bombs, non-finite values, steps / batch size bounds: ``test_hostile_generate_config``,
   ``test_non_utf8_config_for_evaluate_and_run``
9. model config.json and arch_kwargs: ``test_model_config_json_hostile``, ``test_unknown_arch_kwargs_refused``
10. foreign checkpoints: ``test_foreign_checkpoints_refused_in_one_line``, ``test_timm_import_refuses_pickled_code``,
    ``test_import_refuses_a_pickled_checkpoint_in_one_line``, ``test_curate_openclip_scorer_refuses_...``
11. a damaged last.pt: ``test_damaged_last_checkpoint_falls_back_to_previous``,
    ``test_damaged_last_checkpoint_without_a_previous_one_is_one_line``
12. one model with non-finite outputs: ``test_model_with_non_finite_outputs_is_marked_and_others_scored``
13. disk full: ``test_train_on_a_full_disk_...``, ``test_generate_on_a_full_disk_...`` (tmpfs, root only),
    ``test_disk_full_is_recognised_however_a_library_reports_it``
14. results.csv and artifacts.json: ``test_results_csv_is_written_atomically``,
    ``test_evaluate_killed_before_its_table_is_completed_by_the_rerun`` (a real SIGKILL),
    ``test_evaluate_folder_without_artifacts_is_completed_without_recomputing``
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from synclone.cli import main

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative paths); {} when it does not exist."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``synclone ARGV`` in this process: (exit code, stderr)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line(err: str, *names: str) -> str:
    """The error is one ``error: ...`` line (notes aside) naming each of ``names``, without a traceback."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in names:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


# --- 1. one writer per output folder -----------------------------------------------------------------------

_SUBPROCESS = ("import sys; from synclone.cli import main; sys.exit(main(sys.argv[1:]))",)


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(5))
def test_two_generate_runs_on_one_folder(tmp_path, repetition):
    """Two seeds, one folder, started together: one wins, the other is refused naming it; the folder is the
    winner's dataset, whole."""
    from _tiny_pipelines import tiny_sd
    from synclone.generate import GenerateConfig
    from synclone.generate.plan import read_plan

    out = tmp_path / "ds"
    cfg = {"labels": ["T-shirt/top", "Dress"], "images_per_class": 4, "batch_size": 4, "progress": False,
           "output": str(out), "generator": {"model": str(tiny_sd()), "steps": 2, "guidance_scale": 2.0}}
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = {seed: subprocess.Popen([sys.executable, "-c", *_SUBPROCESS, "generate", str(tmp_path / "gen.yaml"),
                                     f"seed={seed}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for seed in (1, 2)}
    done = {seed: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for seed, p in procs.items()}
    codes = sorted(c for c, _, _ in done.values())
    assert codes == [0, 2], done
    winner = next(s for s, (c, _, _) in done.items() if c == 0)
    loser = next(s for s, (c, _, _) in done.items() if c == 2)
    line = assert_one_line(done[loser][2], str(out), f"pid {procs[winner].pid}", f"seed={winner}")
    assert "in use by another synclone run" in line
    # The folder is the winner's dataset: its fingerprint, every planned image listed once and on disk.
    info = json.loads((out / "dataset.json").read_text())
    assert info["seed"] == winner
    assert info["config_fingerprint"] == GenerateConfig(**{**cfg, "seed": winner}).fingerprint()
    rows = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    plan = list(read_plan(out / "plan.jsonl"))
    assert [r["id"] for r in rows] == [j.id for j in plan] == list(range(8))
    assert [r["seed"] for r in rows] == [j.seed for j in plan]
    for r in rows:
        assert (out / "train" / r["file_name"]).is_file()
    assert not list(out.rglob("*.tmp*")) and not (out / ".synclone.lock").exists()


# --- 2. hostile configs: refused before anything is written ------------------------------------------------

@pytest.fixture
def earlier(tmp_path) -> Path:
    """An output folder holding earlier work, which a refused command must leave as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("work of an earlier run\n")
    return out


GEN_OK = {"labels": ["T-shirt/top", "Dress"], "images_per_class": 1, "generator": {"model": "nowhere"}}


@pytest.mark.parametrize("case", ["not-utf8", "alias-bomb", "alias-cycle", "inf", "nan-override", "steps",
                                  "batch", "batch-memory"])
def test_hostile_generate_config(tmp_path, earlier, capsys, case):
    cfg_file = tmp_path / "gen.yaml"
    extra: list[str] = []
    data = {**GEN_OK, "output": str(earlier)}
    if case == "not-utf8":
        cfg_file.write_bytes(yaml.safe_dump(data).encode() + b"# caf\xe9 in latin-1\n")
        names = [cfg_file, "UTF-8"]
    elif case in ("alias-bomb", "alias-cycle"):
        if case == "alias-bomb":  # nine levels of ten aliases: 10^9 strings once expanded
            lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
            lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
        else:
            lines = ["a: &a [1, *a]"]
        cfg_file.write_text("\n".join(lines) + f"\noutput: {earlier}\n")
        names = [cfg_file, "aliases"]
    elif case == "inf":
        data["generator"] = {**data["generator"], "guidance_scale": float("inf")}
        cfg_file.write_text(yaml.safe_dump(data))
        assert ".inf" in cfg_file.read_text()
        names = ["generator.guidance_scale", "finite"]
    elif case == "nan-override":
        cfg_file.write_text(yaml.safe_dump(data))
        extra = ["generator.guidance_scale=.nan"]
        names = ["generator.guidance_scale", "finite"]
    elif case == "steps":
        cfg_file.write_text(yaml.safe_dump(data))
        extra = ["generator.steps=1e21"]
        names = ["generator.steps"]
    elif case == "batch":
        cfg_file.write_text(yaml.safe_dump(data))
        extra = ["batch_size=1e12"]
        names = ["batch_size"]
    else:
        cfg_file.write_text(yaml.safe_dump(data))
        extra = ["batch_size=4000", "generator.height=16384", "generator.width=16384"]
        names = ["batch_size", "GB"]
    before = snapshot(earlier)
    code, err = run_cli(capsys, "generate", cfg_file, *extra)
    assert code == 2
    assert_one_line(err, *names)
    assert snapshot(earlier) == before


def test_non_utf8_config_for_evaluate_and_run(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"output: \xff\xfe\n")
    code, err = run_cli(capsys, "evaluate", "--config", bad)
    assert code == 2 and "UTF-8" in assert_one_line(err, bad)
    code, err = run_cli(capsys, "run", bad)
    assert code == 2 and "UTF-8" in assert_one_line(err, bad)


# --- model folders and architectures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from synclone.labels import FASHION_MNIST
    from synclone.models import create_classifier, save_model

    torch_model = create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28))
    return save_model(torch_model, tmp_path_factory.mktemp("model") / "model")


@pytest.mark.parametrize("bad", ["list", "big"])
def test_model_config_json_hostile(tmp_path, tiny_model, capsys, bad):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    cfg = json.loads((folder / "config.json").read_text())
    if bad == "list":
        (folder / "config.json").write_text(json.dumps([cfg]))
    else:
        (folder / "config.json").write_text(json.dumps({**cfg, "input_size": "big"}))
    out = tmp_path / "eval"
    code, err = run_cli(capsys, "evaluate", folder, "--output", out, "--probes", "clean", "--max-images", "8",
                        "--quiet")
    assert code == 2
    line = assert_one_line(err, folder / "config.json")
    assert ("JSON object" in line) if bad == "list" else ("input_size" in line)
    assert snapshot(out) == {}


def test_unknown_arch_kwargs_refused(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", f"output={out}", "model.arch=synclone_cnn_tiny",
                        "model.arch_kwargs={nonsense: 1}", "data.real_per_class=2", "optim.steps=1",
                        "optim.warmup_steps=0", "data.val_max=10", "--quiet")
    assert code == 2
    assert "unknown model.arch_kwargs 'nonsense'" in assert_one_line(err, "synclone_cnn_tiny")
    assert not (out / "model").exists()


# --- class names over 255 bytes ------------------------------------------------------------------------------

def test_long_class_names_get_short_unique_slugs():
    from synclone.labels import SLUG_MAX_BYTES, LabelSpace, slugify

    a, b = "very long class " * 30 + "A", "very long class " * 30 + "B"
    space = LabelSpace.from_names([a, b, "Dress"])
    assert all(len(s.encode()) <= SLUG_MAX_BYTES for s in space.slugs)
    assert len(set(space.slugs)) == 3 and space.slugs[2] == "dress"
    # Golden: a readable head and a hash of the whole name; short names are unchanged.
    assert slugify(a) == "very_long_class_" * 5 + "very_e1918bc396"  # golden: a readable head + the name's hash
    assert slugify(a).endswith("_" + hashlib.sha1(a.encode()).hexdigest()[:10]) and len(slugify(a)) <= 96
    assert slugify("Ankle boot") == "ankle_boot"


@pytest.mark.slow
def test_generate_with_a_300_byte_class_name(tmp_path, capsys):
    from _tiny_pipelines import tiny_sd

    out = tmp_path / "ds"
    long_name = "a really rather long class name " * 10  # 320 bytes
    cfg = {"labels": [long_name, "Dress"], "images_per_class": 1, "batch_size": 2, "progress": False,
           "output": str(out), "generator": {"model": str(tiny_sd()), "steps": 1, "guidance_scale": 2.0}}
    (tmp_path / "gen.yaml").write_text(yaml.safe_dump(cfg))
    code, err = run_cli(capsys, "generate", tmp_path / "gen.yaml")
    assert code == 0, err
    rows = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert rows[0]["class_name"] == long_name and (out / "train" / rows[0]["file_name"]).is_file()


# --- image files a metadata row may point at -----------------------------------------------------------------

def _png_claiming(path: Path, width: int, height: int) -> None:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's calling card)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 4  # signature, chunk length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))


@pytest.fixture
def hostile_folder(tmp_path) -> Path:
    """A dataset folder whose metadata points at a good image, /dev/zero, a FIFO, a bomb and an empty file."""
    from PIL import Image

    from synclone.labels import LabelSpace

    root = tmp_path / "ds"
    (root / "train" / "a").mkdir(parents=True)
    space = LabelSpace.from_names(["a", "b"])
    (root / "dataset.json").write_text(json.dumps({"label_space": space.to_dict()}))
    Image.new("L", (8, 8), 100).save(root / "train" / "a" / "good.png")
    Image.new("L", (8, 8), 200).save(root / "train" / "a" / "good2.png")
    os.mkfifo(root / "train" / "a" / "fifo.png")
    _png_claiming(root / "train" / "a" / "bomb.png", 100_000, 100_000)
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    names = ["a/good.png", "/dev/zero", "a/fifo.png", "a/bomb.png", "a/empty.png", "a/good2.png"]
    rows = [{"file_name": n, "label": i % 2, "id": str(i)} for i, n in enumerate(names)]
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_open_image_refuses_devices_fifos_and_bombs(hostile_folder):
    from synclone.data.images import UnreadableImage, open_image, read_and_decode

    with open_image(hostile_folder / "train" / "a" / "good.png") as im:
        assert im.size == (8, 8)
    for name, why in (("/dev/zero", "a device"), (hostile_folder / "train" / "a" / "fifo.png", "a FIFO"),
                      (hostile_folder / "train" / "a" / "bomb.png", "pixel cap"),
                      (hostile_folder / "train" / "a" / "empty.png", "empty file")):
        with pytest.raises(UnreadableImage) as err:
            open_image(name)
        assert str(name) in str(err.value) and why in str(err.value) and "\n" not in str(err.value)
        _, dec = read_and_decode(str(name))
        assert not dec.ok and why in dec.error


def test_unreadable_rows_become_recorded_skips(hostile_folder):
    from synclone.data.folder import load_image_folder_tensors

    with pytest.warns(UserWarning, match="4 unreadable image"):
        ds = load_image_folder_tensors(hostile_folder)
    assert len(ds) == 2 and ds.extra["skipped"] == ["1", "2", "3", "4"]


def test_streamed_read_of_a_bomb_is_one_line(hostile_folder):
    from synclone.data.streaming import Preprocess
    from synclone.errors import UserError

    with pytest.raises(UserError) as err:
        Preprocess()(hostile_folder / "train" / "a" / "bomb.png", (1, 8, 8))
    assert "bomb.png" in str(err.value) and "pixel cap" in str(err.value)


# --- checkpoints ---------------------------------------------------------------------------------------------

def _evil_checkpoint(path: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(path.with_suffix(".pwned")),))

    torch.save({"model": Payload()}, path)


@pytest.mark.parametrize("kind", ["pickled-code", "truncated", "empty", "junk"])
def test_foreign_checkpoints_refused_in_one_line(tmp_path, kind):
    from synclone.util.checkpoints import UnreadableCheckpoint, load_tensors

    path = tmp_path / "ckpt.pt"
    _evil_checkpoint(path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "junk":
        path.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(UnreadableCheckpoint) as err:
        load_tensors(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and "weights_only" not in msg and "False" not in msg
    assert not path.with_suffix(".pwned").exists()


def test_timm_import_refuses_pickled_code(tmp_path):
    from synclone.errors import UserError
    from synclone.models.convert import read_checkpoint

    path = tmp_path / "weights.pth"
    _evil_checkpoint(path)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)  # what `synclone import` and backbone checkpoints read through
    assert "pickled code" in str(err.value) and str(path) in str(err.value)
    assert "weights_only=False" not in str(err.value) and not path.with_suffix(".pwned").exists()


TRAIN_TINY = ["model.arch=synclone_cnn_tiny", "data.real_per_class=4", "optim.steps=4", "optim.warmup_steps=0",
              "data.val_max=20", "checkpoint_every=1", "threads=1", "--quiet"]


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty"])
def test_damaged_last_checkpoint_falls_back_to_previous(tmp_path, capsys, damage):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", f"output={out}", *TRAIN_TINY)
    assert code == 0, err
    last, prev = out / "checkpoints" / "last.pt", out / "checkpoints" / "previous.pt"
    assert last.is_file() and prev.is_file()
    data = last.read_bytes()
    last.write_bytes({"corrupt": b"\x00" * len(data), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    before = snapshot(out / "model")
    code, err = run_cli(capsys, "train", f"output={out}", *TRAIN_TINY, "--resume")
    assert code == 0, err
    assert "Traceback" not in err
    warning = next(ln for ln in err.splitlines() if ln.startswith("warning:"))
    assert str(last) in warning and str(prev) in warning and "weights_only" not in warning
    assert snapshot(out / "model").keys() == before.keys()


# --- 3. one broken model never sinks the others --------------------------------------------------------------

def test_model_with_non_finite_outputs_is_marked_and_others_scored(tmp_path, tiny_model, capsys):
    import pandas as pd
    import torch

    from synclone.models import load_model, save_model

    broken = load_model(tiny_model)
    with torch.no_grad():
        broken.net.get_classifier().bias.fill_(float("nan"))
    broken_dir = save_model(broken, tmp_path / "broken" / "model")
    out = tmp_path / "eval"
    code, err = run_cli(capsys, "evaluate", f"good={tiny_model}", f"broken={broken_dir}", "--output", out,
                        "--probes", "clean,calibration,ood", "--max-images", "16", "--quiet")
    assert code == 0, err
    assert "Traceback" not in err
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert warnings_ and all("model 'broken'" in w and "fashion_mnist" in w for w in warnings_)
    df = pd.read_parquet(out / "results.parquet")
    good, bad = df[df.model == "good"], df[df.model == "broken"]
    assert set(good.probe) == {"clean", "calibration", "ood"} and good.value.notna().all()
    assert set(bad.metric) == {"non_finite_outputs"} and set(bad.probe) == {"clean", "calibration", "ood"}
    assert (bad.convention == "status: non-finite outputs").all() and (bad.value == bad.n).all()


# --- 4. curate killed between its metadata and dataset.json ------------------------------------------------

@pytest.mark.slow  # two curate runs with a trained teacher: ~85 s on the loaded 2-core machine
def test_curate_killed_before_dataset_json_resumes_byte_identical(tmp_path, capsys):
    from _tiny_clip import fashion_mnist_mixture, one_thread, shared_teacher

    dataset, _ = fashion_mnist_mixture(tmp_path / "generated")
    out = tmp_path / "curated"
    cfg = {"input": str(dataset), "output": str(out), "cache_dir": str(tmp_path / "cache"),
           "scorer": {"kind": "teacher", "model": str(shared_teacher())}, "progress": False,
           "stats": {"examples_per_class": 2}}
    (tmp_path / "curate.yaml").write_text(yaml.safe_dump(cfg))
    with one_thread():
        code, err = run_cli(capsys, "curate", tmp_path / "curate.yaml")
        assert code == 0, err
        whole = {k: v for k, v in snapshot(out).items() if k not in ("run.json", "dataset.json")}
        info = _without_run_record(out / "dataset.json")
        # The state a kill right after train/metadata.jsonl (and the all-images table) leaves behind:
        for name in ("dataset.json", "config.yaml", "run.json"):
            (out / name).unlink()
        import shutil

        shutil.rmtree(out / "stats")
        assert (out / "train" / "metadata.jsonl").is_file() and not (out / "dataset.json").exists()
        code, err = run_cli(capsys, "curate", tmp_path / "curate.yaml")
        assert code == 0, err
    # Every file byte for byte, apart from what describes the run rather than the data: run.json (the time) and
    # dataset.json's curation.scoring counts of model work (the resumed run found every score in the cache).
    assert {k: v for k, v in snapshot(out).items() if k not in ("run.json", "dataset.json")} == whole
    again = _without_run_record(out / "dataset.json")
    diff = {k: (again["curation"].get(k), v) for k, v in info["curation"].items() if again["curation"].get(k) != v}
    assert again == info, str(diff)


def _without_run_record(path: Path) -> dict:
    info = json.loads(path.read_text())
    for k in ("encoded_now", "model_loaded", "image_batches", "text_batches"):
        info["curation"]["scoring"].pop(k)
    return info


def test_curate_still_refuses_a_foreign_folder(tmp_path, capsys):
    from _tiny_clip import fashion_mnist_mixture, shared_teacher

    dataset, _ = fashion_mnist_mixture(tmp_path / "generated")
    out = tmp_path / "mine"
    (out / "train").mkdir(parents=True)
    (out / "train" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "label": 0}) + "\n")
    before = snapshot(out)
    code, err = run_cli(capsys, "curate", f"input={dataset}", f"output={out}", "scorer.kind=teacher",
                        f"scorer.model={shared_teacher()}", "progress=false")
    assert code == 2 and "not an earlier curate output" in assert_one_line(err, out)
    assert snapshot(out) == before


# --- 5. a shifted set made by the model's own generator is in-distribution for it -----------------------------

def _rows(model, dataset, metric, value, probe="shift", variant="shifted"):
    return {"model": model, "probe": probe, "dataset": dataset, "variant": variant, "metric": metric,
            "value": value, "n": 100, "convention": "c"}


def test_verdict_leaves_in_distribution_sets_out_of_the_shift_headlines():
    import pandas as pd

    from synclone.report.verdict import verdict_columns

    rows = [_rows(m, "clean", "top1", v, probe="clean", variant="all") for m, v in (("real", .9), ("clone", .7))]
    for m, acc, er in (("real", .5, -0.02), ("clone", .69, 0.051)):
        rows += [_rows(m, "synthetic_shift", "top1", acc), _rows(m, "synthetic_shift", "effective_robustness", er)]
    rows.append(_rows("clone", "synthetic_shift", "in_distribution", 1.0))
    cols = {c.headline.key: c for c in verdict_columns(pd.DataFrame(rows), [])}
    er = cols["effective_robustness"]
    assert er.values == {"real": -0.02} and "clone on synthetic_shift" in er.note and "in-distribution" in er.note
    assert cols["shift_top1"].values == {"real": 0.5}
    assert cols["clean_top1"].values == {"real": 0.9, "clone": 0.7}


def test_shift_probe_knows_the_generator_of_a_models_training_data(tmp_path):
    from synclone.probes.shift import _generator_of, _training_generator

    gen = {"backend": "diffusers", "generator": "tiny-sd", "generator_revision": "local:abc", "steps": 2}
    space = {"classes": ["a", "b"]}
    for name, g in (("train_set", gen), ("shift_set", {**gen, "steps": 4}), ("other", {**gen, "generator": "x"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "dataset.json").write_text(json.dumps({"generator": g, "label_space": space}))
    curated = tmp_path / "curated"
    curated.mkdir()
    (curated / "dataset.json").write_text(json.dumps({"label_space": space, "source": {
        "dataset": {"generator": gen, "label_space": space}}}))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"training": {"data": {"synthetic": str(curated)}}}))
    assert _training_generator(model) == _generator_of(tmp_path / "shift_set") == _generator_of(tmp_path / "train_set")
    assert _generator_of(tmp_path / "other") != _training_generator(model)
    assert _generator_of(tmp_path / "missing") is None


# --- 6. disk full ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str):
    """A tmpfs of ``size`` mounted at ``mnt`` for the block (the test is skipped where it cannot be mounted)."""
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                         text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_train_on_a_full_disk_is_one_line_and_resumes(tmp_path, capsys):
    with small_tmpfs(tmp_path / "small", "256k") as mnt:
        out = mnt / "run"
        code, err = run_cli(capsys, "train", f"output={out}", *TRAIN_TINY)
        assert code == 2
        line = assert_one_line(err, out)
        assert "disk is full" in line
        # The space the run needs (its estimate: weights twice, two checkpoints with Adam's state) and the space free.
        from synclone.labels import FASHION_MNIST
        from synclone.models import create_classifier
        from synclone.train.loop import train_output_bytes
        from synclone.util.disk import format_bytes

        need = train_output_bytes(create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28)))
        assert f"this training run writes about {format_bytes(need)} into '{out}' in all (estimate)" in line
        free = re.search(r"; ([0-9.]+) (kB|MB) is free there", line)
        assert free and float(free.group(1)) * {"kB": 1e3, "MB": 1e6}[free.group(2)] < 256e3
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # partial files removed
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        code, err = run_cli(capsys, "train", f"output={out}", *TRAIN_TINY, "--resume")
        assert code == 0, err
        assert (out / "model" / "model.safetensors").is_file()


def test_curate_openclip_scorer_refuses_a_pickled_checkpoint(tmp_path, capsys):
    from _tiny_clip import fashion_mnist_mixture
    from _tiny_openclip import build_tiny_openclip

    dataset, _ = fashion_mnist_mixture(tmp_path / "generated")
    paths = build_tiny_openclip(tmp_path / "clip", train_steps=0)
    evil = tmp_path / "clip.pt"
    _evil_checkpoint(evil)
    out = tmp_path / "curated"
    code, err = run_cli(capsys, "curate", f"input={dataset}", f"output={out}", "scorer.kind=openclip",
                        f"scorer.model={paths['config']}", f"scorer.pretrained={evil}", "progress=false",
                        f"cache_dir={tmp_path / 'cache'}")
    assert code == 2
    line = assert_one_line(err, evil)
    assert "pickled code" in line and "weights_only" not in line and not evil.with_suffix(".pwned").exists()


def test_streamed_folder_skips_and_records_unusable_files(hostile_folder):
    from synclone.data.sources import streamed_folder

    with pytest.warns(UserWarning, match="4 unreadable image"):
        ds = streamed_folder(hostile_folder, "train", 8)
    assert len(ds) == 2 and ds.extra["skipped"] == ["1", "2", "3", "4"]
    x = next(ds.iter_batches(4))
    assert x.shape == (2, 3, 8, 8)


# --- 2 (cont.). files that pass the header check but fail to decode: recorded skips in every path -------------

def _undecodable_folder(root: Path, good_per_class: int = 8) -> tuple[Path, list[Path]]:
    """A ``<class>/<image>`` folder of 16x16 RGB images plus two that open but do not decode: a truncated JPEG and
    a PNG whose compressed pixel data is garbage after a valid header. Returns the folder and the two bad files."""
    import io

    import numpy as np
    from PIL import Image

    from synclone.data.images import check_image_file

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(good_per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    truncated = root / "a" / "truncated.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    png = bytearray((root / "b" / "00.png").read_bytes())
    idat = png.index(b"IDAT") + 4
    png[idat + 2: idat + 40] = rng.integers(0, 256, 38, dtype=np.uint8).tobytes()  # the zlib stream, not the header
    garbage = root / "b" / "garbage.png"
    garbage.write_bytes(bytes(png))
    for bad in (truncated, garbage):  # the case at hand: the header check passes, decoding fails
        assert check_image_file(bad) is None
        with pytest.raises(Exception):  # noqa: B017 - Pillow raises several types
            with Image.open(bad) as im:
                im.load()
    return root, [truncated, garbage]


@pytest.fixture
def rgb16_model(tmp_path) -> Path:
    from synclone.labels import LabelSpace
    from synclone.models import create_classifier, save_model

    net = create_classifier("synclone_cnn_tiny", LabelSpace.from_names(["a", "b"]), (3, 16, 16))
    return save_model(net, tmp_path / "m" / "model")


@pytest.mark.parametrize("path", ["streamed", "in-memory"])
def test_evaluate_skips_undecodable_images_and_limits_them(tmp_path, rgb16_model, capsys, path):
    folder, bad = _undecodable_folder(tmp_path / "data")
    out = tmp_path / "eval"
    args = ["evaluate", f"m={rgb16_model}", "--data", folder, "--output", out, "--probes", "clean", "--quiet"]
    if path == "streamed":
        args += ["--set", "image_size=16"]
    code, err = run_cli(capsys, *args, "--set", "max_unreadable=0.2")
    assert code == 0, err
    assert "Traceback" not in err and "note: 2 unreadable image(s) skipped" in err
    listed = (out / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 2 and all(ln.startswith("data\t") for ln in listed)
    assert any(str(bad[0]) in ln and "truncated" in ln for ln in listed) and any(str(bad[1]) in ln for ln in listed)
    import pandas as pd

    assert pd.read_parquet(out / "results.parquet")["n"].max() == 16  # scored on the 16 readable images
    assert json.loads((out / "timings.json").read_text())["skipped_images"] == 2
    # The default limit (0.001 of the set) turns 2 of 18 into one line, and the finished folder stays as it was.
    before = snapshot(out)
    code, err = run_cli(capsys, *args)
    assert code == 2
    line = assert_one_line(err, "2 of 18 images of dataset 'data'", "(11.1%)", "max_unreadable=0.001",
                           out / "skipped_images.txt")
    assert "allows (0)" in line
    assert {k: v for k, v in snapshot(out).items() if k in before} == before


def test_training_in_memory_skips_undecodable_images_and_limits_them(tmp_path, capsys):
    folder, bad = _undecodable_folder(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", f"output={out}", "model.arch=synclone_cnn_tiny", f"data.real={folder}", "optim.steps=2",
            "optim.batch_size=4", "optim.warmup_steps=0", "threads=1", "--quiet"]
    code, err = run_cli(capsys, *args, "data.max_unreadable=2")
    assert code == 0, err
    listed = (out / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 2 and all(ln.startswith("read\treal ") for ln in listed)
    assert any(str(bad[0]) in ln for ln in listed) and any(str(bad[1]) in ln for ln in listed)
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == 2
    out2 = tmp_path / "run2"
    code, err = run_cli(capsys, *[a.replace(str(out), str(out2)) for a in args])
    assert code == 2
    assert_one_line(err, "2 of 18 training images could not be read", "data.max_unreadable=0.001",
                    out2 / "skipped_images.txt")
    assert not (out2 / "model").exists() and not (out2 / "checkpoints").exists()


@pytest.mark.parametrize("kind, streamed", [("linear-probe", True), ("linear-probe", False), ("knn", False)])
def test_probes_skip_undecodable_images_and_limit_them(tmp_path, capsys, kind, streamed):
    from synclone.labels import LabelSpace
    from synclone.models import create_classifier, save_model

    folder, bad = _undecodable_folder(tmp_path / "data")
    save_model(create_classifier("synclone_cnn_tiny", LabelSpace("ab", ("a", "b")), (3, 16, 16)), tmp_path / "cnn")
    out = tmp_path / "probe"
    args = ["train", "--kind", kind, f"output={out}", "backbone.kind=synclone", f"backbone.name={tmp_path / 'cnn'}",
            f"data.train={folder}", "data.test=null", "data.val_fraction=0.25", "cache_dir=null",
            *(["data.image_size=16"] if streamed else []),
            *(["heads.lrs=[0.01]", "heads.weight_decays=[0.0]", "heads.epochs=2"] if kind != "knn" else [])]
    code, err = run_cli(capsys, *args, "data.max_unreadable=2")
    assert code == 0, err
    listed = (out / "skipped_images.txt").read_text().splitlines()
    # streamed, the two fail when decoded (in the training or the validation split); in memory, when read
    assert len(listed) == 2 and all(ln.split("\t")[0] in ("training", "validation", "training read")
                                    for ln in listed), listed
    assert all(any(str(b) in ln for ln in listed) for b in bad)
    metrics = json.loads((out / "results.json").read_text())["metrics"]
    assert metrics["skipped_images"] == 2
    assert metrics.get("n_train", metrics.get("n_reference")) + metrics.get("n_val", 0) <= 16
    out2 = tmp_path / "probe2"
    code, err = run_cli(capsys, *[a.replace(str(out), str(out2)) for a in args])
    assert code == 2
    assert_one_line(err, "2 of 18 images could not be read", "data.max_unreadable=0.001", out2 / "skipped_images.txt")
    assert sorted(p.name for p in out2.iterdir()) == ["skipped_images.txt"]  # no model made of what was left


def test_fewshot_evaluation_set_limits_its_unreadable_images(tmp_path):
    import shutil

    from synclone.errors import UserError
    from synclone.train import TrainConfig
    from synclone.train.fewshot import fewshot

    test_folder, bad = _undecodable_folder(tmp_path / "test")
    clean = tmp_path / "train"
    shutil.copytree(test_folder, clean, ignore=lambda _, names: [n for n in names if n.startswith(("trunc", "garb"))])

    def config(out: str, limit: float) -> TrainConfig:
        return TrainConfig.model_validate({
            "output": str(tmp_path / out), "model": {"arch": "synclone_cnn_tiny"},
            "data": {"real": str(clean), "val_fraction": 0.25, "max_unreadable": limit},
            "optim": {"steps": 2, "batch_size": 4, "warmup_steps": 0}, "threads": 1})

    res = fewshot(config("ok", 2), shots=3, seeds=[0], eval_data=str(test_folder), progress=False)
    assert res["per_seed"][0]["n_test"] == 16  # scored on the 16 readable test images
    listed = (tmp_path / "ok" / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 2 and all(ln.startswith("evaluation read\t") for ln in listed)
    with pytest.raises(UserError, match="2 of 18 evaluation images could not be read"):
        fewshot(config("strict", 0.001), shots=3, seeds=[0], eval_data=str(test_folder), progress=False)


def test_training_on_shards_skips_an_undecodable_member_naming_its_shard(tmp_path, capsys):
    folder, _ = _undecodable_folder(tmp_path / "data")
    shards = tmp_path / "shards"
    code, err = run_cli(capsys, "shard", folder, "--output", shards)
    assert code == 0, err
    out = tmp_path / "run"
    args = ["train", f"output={out}", "model.arch=synclone_cnn_tiny", f"data.real={shards}", "data.image_size=16",
            "data.workers=0", "optim.steps=6", "optim.batch_size=8", "optim.warmup_steps=0", "threads=1", "--quiet"]
    code, err = run_cli(capsys, *args, "data.max_unreadable=0.2")
    assert code == 0, err
    listed = (out / "skipped_images.txt").read_text().splitlines()
    assert listed and all("shard-000000.tar#" in ln for ln in listed), listed
    assert json.loads((out / "metrics.json").read_text())["skipped_images"] == len(listed)


def test_training_on_a_cut_short_shard_is_one_line_naming_it(tmp_path, capsys):
    folder, _ = _undecodable_folder(tmp_path / "data")
    shards = tmp_path / "shards"
    assert run_cli(capsys, "shard", folder, "--output", shards)[0] == 0
    victim = shards / "shard-000000.tar"
    victim.write_bytes(victim.read_bytes()[:-4000])
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", f"output={out}", "model.arch=synclone_cnn_tiny", f"data.real={shards}",
                        "data.image_size=16", "optim.steps=1", "--quiet")
    assert code == 2
    assert "is cut short" in assert_one_line(err, victim)
    assert not out.exists() or not (out / "model").exists()


# --- 10 (cont.). a pickled checkpoint on the import (recipe `pretrained`) path -----------------------------------

def test_import_refuses_a_pickled_checkpoint_in_one_line(tmp_path, earlier, capsys):
    evil = tmp_path / "weights.pth"
    _evil_checkpoint(evil)
    before = snapshot(earlier)
    code, err = run_cli(capsys, "import", "arch=resnet10t", f"pretrained={evil}", "labels=imagenet1k",
                        f"output={earlier}")
    assert code == 2
    line = assert_one_line(err, evil)
    assert "pickled code" in line and "weights_only" not in line and not evil.with_suffix(".pwned").exists()
    assert snapshot(earlier) == before


# --- 11 (cont.). a damaged last.pt with no previous checkpoint ------------------------------------------------

def test_damaged_last_checkpoint_without_a_previous_one_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, "train", f"output={out}", *TRAIN_TINY)
    assert code == 0, err
    last = out / "checkpoints" / "last.pt"
    (out / "checkpoints" / "previous.pt").unlink()
    last.write_bytes(last.read_bytes()[:100])
    before = snapshot(out)
    code, err = run_cli(capsys, "train", f"output={out}", *TRAIN_TINY, "--resume")
    assert code == 2
    line = assert_one_line(err, last)
    assert "no previous checkpoint" in line and "weights_only" not in line
    assert snapshot(out) == before


# --- 14. results.csv atomic; a kill before the evaluation's last file is finished by the re-run ------------------

_KILL_BEFORE_PARQUET = """
import os, signal, sys
import pandas as pd
from synclone.cli import main
pd.DataFrame.to_parquet = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies as the table is written
sys.exit(main(sys.argv[1:]))
"""


def test_evaluate_killed_before_its_table_is_completed_by_the_rerun(tmp_path, tiny_model, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", f"good={tiny_model}", "--output", str(out), "--probes", "clean,calibration",
            "--max-images", "16", "--quiet"]
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    whole = snapshot(out)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _KILL_BEFORE_PARQUET, *args], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == -9, res.stderr
    # Killed after artifacts.json, timings.json and results.csv: no table, so nothing reads the folder as finished.
    assert not (out / "results.parquet").exists() and (out / "artifacts.json").is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    code, err = run_cli(capsys, "report", out, "--output", tmp_path / "report")
    assert code == 2
    assert "stopped before it finished" in assert_one_line(err, out)
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert json.loads((out / "timings.json").read_text())["forward_passes"] == 0  # every logit from the cache
    again = snapshot(out)
    for name in ("results.parquet", "results.csv", "artifacts.json"):
        assert again[name] == whole[name], name


def test_evaluate_folder_without_artifacts_is_completed_without_recomputing(tmp_path, tiny_model, capsys):
    """The state the old write order left after a kill: results.parquet but no artifacts.json."""
    out = tmp_path / "eval"
    args = ["evaluate", f"good={tiny_model}", "--output", out, "--probes", "clean,calibration", "--max-images", "16",
            "--quiet"]
    assert run_cli(capsys, *args)[0] == 0
    whole = snapshot(out)
    (out / "artifacts.json").unlink()
    code, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "holds results.parquet without artifacts.json" in err
    assert json.loads((out / "timings.json").read_text())["forward_passes"] == 0
    assert snapshot(out)["artifacts.json"] == whole["artifacts.json"]


def test_results_csv_is_written_atomically(tmp_path, tiny_model, capsys, monkeypatch):
    """A failure while the CSV is written leaves the earlier CSV whole and no temporary file."""
    import pandas as pd

    out = tmp_path / "eval"
    args = ["evaluate", f"good={tiny_model}", "--output", out, "--probes", "clean", "--max-images", "16", "--quiet"]
    assert run_cli(capsys, *args)[0] == 0
    before = (out / "results.csv").read_bytes()

    def half_then_fail(self, path, *a, **k):
        Path(path).write_text("model,probe\nhalf")
        raise OSError(5, "Input/output error", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError):
        main([str(a) for a in args])
    assert (out / "results.csv").read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# --- 13 (cont.). disk full while generating --------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_generate_on_a_full_disk_is_one_line_and_resumes(tmp_path, capsys):
    with small_tmpfs(tmp_path / "small", "128k") as mnt:
        out = mnt / "ds"
        args = ["generate", "generator.backend=classcond", "generator.model=builtin:fashion_mnist",
                "generator.steps=2", "images_per_class=20", "batch_size=50", "progress=false", f"output={out}"]
        code, err = run_cli(capsys, *args)
        assert code == 2
        line = assert_one_line(err, out, "this generate run writes about", "is free there")
        assert "disk is full" in line
        assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # partial files removed
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
        code, err = run_cli(capsys, *args)
        assert code == 0, err
        rows = (out / "train" / "metadata.jsonl").read_text().splitlines()
        assert len(rows) == 200 and all((out / "train" / json.loads(r)["file_name"]).is_file() for r in rows)


def test_disk_full_is_recognised_however_a_library_reports_it():
    from synclone.util.disk import disk_full_error, format_bytes

    assert disk_full_error(OSError(28, "No space left on device", "f")).filename == "f"
    wrapped = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert disk_full_error(wrapped) is wrapped.__cause__
    safetensors_style = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                                  'space left on device" })')
    assert disk_full_error(safetensors_style).errno == 28
    assert disk_full_error(OSError(5, "Input/output error")) is None and disk_full_error(ValueError("x")) is None
    assert (format_bytes(1_234_567), format_bytes(999), format_bytes(2.5e9)) == ("1.2 MB", "1 kB", "2.5 GB")


def test_max_unreadable_is_one_setting_a_share_or_a_count():
    from synclone.curate.config import CurateConfig
    from synclone.data.readable import MAX_UNREADABLE, allowed_unreadable
    from synclone.evaluate import EvaluateConfig
    from synclone.train import TrainConfig
    from synclone.train.probe import ProbeDataConfig

    assert CurateConfig(input="a", output="b").max_unreadable == EvaluateConfig().max_unreadable == \
        TrainConfig().data.max_unreadable == ProbeDataConfig().max_unreadable == MAX_UNREADABLE == 0.001
    assert allowed_unreadable(0.001, 999) == 0 and allowed_unreadable(0.001, 1000) == 1
    assert allowed_unreadable(0.001, 1_281_167) == 1281 and allowed_unreadable(3, 10) == 3
