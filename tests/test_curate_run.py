"""``curate(cfg)`` end to end: a real teacher, the cache, bad images, output modes, loading the result."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from _tiny_clip import (  # noqa: E402
    fashion_mnist_mixture,
    one_thread,
    shared_openclip,
    shared_teacher,
    write_png16,
)
from synclone.config import load_config
from synclone.curate import CurateConfig, curate, load_curated, load_image_folder_tensors, read_dataset_folder
from synclone.curate import scorers as scorers_mod
from synclone.errors import UserError


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    return fashion_mnist_mixture(tmp_path_factory.mktemp("mix") / "generated")


def _cfg(tmp_path, dataset, out="curated", **kw):
    base = {"input": str(dataset), "output": str(tmp_path / out), "cache_dir": str(tmp_path / "cache"),
            "scorer": {"kind": "teacher", "model": str(shared_teacher())}, "progress": False,
            "stats": {"examples_per_class": 3}}
    for k, v in kw.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return CurateConfig.model_validate(base)


def _table(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "curation.parquet")


def test_teacher_drops_off_label_and_noise_images(tmp_path, mixture):
    dataset, kinds = mixture
    out = curate(_cfg(tmp_path, dataset, filters={"he": {"enabled": True}}))
    t = _table(out)
    kinds = np.array(kinds)
    kept = t["kept"].to_numpy()
    # The teacher (about 75% accurate on real test images) agrees with correct labels and not with wrong ones.
    assert kept[kinds == "real"].mean() >= 0.7
    assert kept[kinds == "off_label"].mean() <= 0.3
    assert kept[kinds == "noise"].mean() <= 0.4
    assert set(t.loc[~t["kept"], "drop_reason"]) == {"he:below_chance"}
    assert (t.loc[~t["kept"], "p_label"] <= 0.1).all() and (t.loc[t["kept"], "p_label"] > 0.1).all()

    # The output is a dataset folder: its metadata lists exactly the kept images, pointing at the source files.
    records, space = load_curated(out)
    assert [r.id for r in records] == list(t.loc[t["kept"], "id"])
    assert all(r.path.is_file() and dataset in r.path.parents for r in records)
    info = json.loads((out / "dataset.json").read_text())
    assert info["source"]["path"] == str(dataset.resolve()) and info["curation"]["counts"]["kept"] == len(records)
    assert info["source"]["dataset"]["generator"] == {"kind": "test-fixture"}
    everything, _ = load_curated(out, include_dropped=True)
    assert len(everything) == len(t) and sum(not r.meta["kept"] for r in everything) == int((~t["kept"]).sum())
    ds = load_image_folder_tensors(out)
    assert len(ds) == len(records) and ds.images.shape[1:] == (1, 28, 28) and ds.label_space == space

    # Statistics: tables that add up and the figures the index names.
    pc = pd.read_csv(out / "stats" / "per_class.csv")
    assert pc["images"].sum() == len(t) and pc["kept"].sum() == len(records)
    assert (pc["dropped_he:below_chance"] == pc["dropped"]).all()
    index = json.loads((out / "stats" / "index.json").read_text())
    files = {f["file"] for f in index["figures"]}
    assert {"scores.png", "counts.png", "diversity.png", "examples_kept.png", "examples_dropped.png"} <= files
    for f in files:
        with Image.open(out / "stats" / f) as im:
            assert im.size[0] > 100
    assert ((pc["diversity_all"] > 0) & (pc["diversity_all"] < 2)).all()


@pytest.mark.parametrize("kind", ["teacher", "openclip"])
def test_second_run_reads_the_cache_and_calls_no_model(tmp_path, mixture, monkeypatch, kind):
    dataset, _ = mixture
    scorer = {"kind": "teacher", "model": str(shared_teacher())} if kind == "teacher" else \
        {"kind": "openclip", "model": str(shared_openclip()), "templates": "simple"}
    path = tmp_path / "curate.yaml"
    path.write_text(yaml.safe_dump({"input": str(dataset), "output": str(tmp_path / "out"), "progress": False,
                                    "cache_dir": str(tmp_path / "cache"), "scorer": scorer,
                                    "stats": {"enabled": False}}))
    first = curate(load_config(CurateConfig, path, ["filters.threshold.p_label=0.05"]))
    t1 = _table(first)
    info1 = json.loads((first / "dataset.json").read_text())["curation"]["scoring"]
    assert info1["model_loaded"] and info1["encoded_now"] == len(t1)

    def boom(*_a, **_k):
        raise AssertionError("a model was used although everything is cached")

    for cls in scorers_mod.SCORERS.values():
        monkeypatch.setattr(cls, "_load", boom)
        monkeypatch.setattr(cls, "_encode_images", boom)
    monkeypatch.setattr(scorers_mod.Scorer, "encode_texts", boom)
    monkeypatch.setattr(scorers_mod.OpenClipScorer, "zero_shot_weights", boom)
    second = curate(load_config(CurateConfig, path, ["filters.threshold.p_label=0.5", "filters.dedup.enabled=true"]))
    t2 = _table(second)
    info2 = json.loads((second / "dataset.json").read_text())["curation"]
    assert not info2["scoring"]["model_loaded"] and info2["scoring"]["encoded_now"] == 0
    assert info2["filters"]["threshold"]["p_label"] == 0.5
    np.testing.assert_array_equal(t1["p_label"], t2["p_label"])
    np.testing.assert_array_equal(t1["prompt_sim"], t2["prompt_sim"])
    assert list(t2["kept"]) == list((t2["p_label"] >= 0.5) & (t2["drop_reason"].isna()))
    assert t2["kept"].sum() <= t1["kept"].sum()


def test_bad_images_are_dropped_and_the_rest_scored(tmp_path, mixture):
    src, _ = mixture
    dataset = tmp_path / "generated"
    shutil.copytree(src, dataset, ignore=shutil.ignore_patterns(".curate_cache"))
    train = dataset / "train"
    rows = [json.loads(line) for line in (train / "metadata.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    real = np.asarray(Image.open(train / rows[0]["file_name"]))
    rows_out = list(rows)

    def add(name, label=0, write=None):
        rel = f"t_shirt_top/{name}"
        if write is not None:
            write(train / rel)
        rows_out.append({**by_id[rows[0]["id"]], "id": name.split(".")[0], "file_name": rel, "label": label})

    good = (train / rows[0]["file_name"]).read_bytes()
    add("truncated.png", write=lambda p: p.write_bytes(good[: len(good) // 2]))
    add("empty.png", write=lambda p: p.write_bytes(b""))
    add("missing.png")
    add("cmyk.tif", write=lambda p: Image.fromarray(real).convert("CMYK").save(p))  # lossless, unlike JPEG
    add("rgba.png", write=lambda p: Image.fromarray(np.stack([real] * 3 + [np.full_like(real, 255)], -1)).save(p))
    add("grey16.png", write=lambda p: write_png16(p, real.astype(np.uint16) * 257))
    add("rgb16.png", write=lambda p: write_png16(p, np.stack([real.astype(np.uint16) * 257] * 3, -1)))
    add("black.png", write=lambda p: Image.fromarray(np.zeros_like(real)).save(p))
    add("grey.png", write=lambda p: Image.fromarray(np.full_like(real, 120)).save(p))
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_out))

    # Three unreadable images of 29 are more than the default max_unreadable (0.001) allows: one line, naming
    # the count, the share, the limit and the list file.
    with pytest.raises(UserError) as err:
        curate(_cfg(tmp_path, dataset))
    listed = tmp_path / "curated" / "skipped_images.txt"
    assert (f"3 of {len(rows_out)} images of '{dataset}' could not be read ({100 * 3 / len(rows_out):.3g}%), more "
            f"than max_unreadable=0.001 allows (0); they are listed in '{listed}'") in str(err.value)
    assert not (tmp_path / "curated" / "dataset.json").exists()
    out = curate(_cfg(tmp_path, dataset, max_unreadable=3))
    lines = listed.read_text().splitlines()
    assert len(lines) == 3 and all(ln.startswith("curate\t") for ln in lines) and "truncated.png" in lines[0]
    t = _table(out).set_index("id")
    for name in ("truncated", "empty", "missing"):
        assert t.loc[name, "drop_reason"] == "unreadable" and not t.loc[name, "readable"]
        assert isinstance(t.loc[name, "error"], str) and np.isnan(t.loc[name, "p_label"])
    assert "truncated" in t.loc["truncated", "error"] and "FileNotFoundError" in t.loc["missing", "error"]
    assert t.loc["black", "drop_reason"] == "degenerate:black"
    assert t.loc["grey", "drop_reason"] == "degenerate:constant"
    # Every other mode is converted and scored exactly like the original 8-bit grey image.
    ref = t.loc[rows[0]["id"], "p_label"]
    for name in ("cmyk", "rgba", "grey16", "rgb16"):
        assert t.loc[name, "kept"] and t.loc[name, "p_label"] == pytest.approx(ref, abs=1e-6)
    # None of the other images lost its score.
    ok = t.index.isin([r["id"] for r in rows])
    assert t.loc[ok, "p_label"].notna().all()
    errors = json.loads((out / "dataset.json").read_text())["curation"]["counts"]["by_reason"]
    assert errors["unreadable"] == 3
    # Cached failures are not decoded again, and the unreadable rows stay listed with their error.
    again = curate(_cfg(tmp_path, dataset, filters={"threshold": {"p_label": 0.2}}, max_unreadable=0.2))
    assert json.loads((again / "dataset.json").read_text())["curation"]["scoring"]["encoded_now"] == 0
    assert (_table(again).set_index("id").loc[["truncated", "empty", "missing"], "drop_reason"] == "unreadable").all()


@pytest.mark.parametrize("mode", ["hardlink", "copy", "absolute", "relative"])
def test_output_modes(tmp_path, mixture, mode):
    dataset, _ = mixture
    kw = {"materialize": mode} if mode in ("hardlink", "copy") else {"paths": mode}
    out = curate(_cfg(tmp_path, dataset, filters={"keep_k": {"k": 3}}, stats={"enabled": False}, **kw))
    records, space = read_dataset_folder(out)
    assert len(records) == 3 * len(space)
    meta = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    src = {r.id: r.path for r in read_dataset_folder(dataset)[0]}
    for r, row in zip(records, meta, strict=True):
        assert r.path.read_bytes() == src[r.id].read_bytes()
        if mode in ("hardlink", "copy"):
            assert out / "train" in r.path.parents
            same_inode = os.stat(r.path).st_ino == os.stat(src[r.id]).st_ino
            assert same_inode == (mode == "hardlink")
        else:
            assert r.path == src[r.id] and Path(row["file_name"]).is_absolute() == (mode == "absolute")
    if mode == "relative":
        # Relative references survive moving the source and the curated folder together.
        project = tmp_path / "project"
        shutil.copytree(dataset, project / "generated", ignore=shutil.ignore_patterns(".curate_cache"))
        curate(_cfg(tmp_path, project / "generated", output=str(project / "curated"), stats={"enabled": False}))
        shutil.move(project, tmp_path / "moved")
        moved = read_dataset_folder(tmp_path / "moved" / "curated")[0]
        assert moved and all(r.path.is_file() and tmp_path / "moved" in r.path.parents for r in moved)


def test_output_folder_guards(tmp_path, mixture):
    dataset, _ = mixture
    with pytest.raises(UserError, match="inside"):
        curate(_cfg(tmp_path, dataset, output=str(dataset / "curated")))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        curate(_cfg(tmp_path, dataset, output=str(busy)))
    # An earlier curate output is replaced without asking; overwrite=true allows any folder.
    out = curate(_cfg(tmp_path, dataset, output=str(busy), overwrite=True, stats={"enabled": False}))
    assert (out / "notes.txt").is_file()
    assert curate(_cfg(tmp_path, dataset, output=str(busy), stats={"enabled": False})) == out


def test_plain_image_folder_with_clip(tmp_path):
    folder = tmp_path / "plain"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    scorer = {"kind": "openclip", "model": str(shared_openclip()), "templates": ["a photo of a {c}."]}
    cfg = dict(input=str(folder), output=str(tmp_path / "out"), scorer=scorer, progress=False,
               stats={"enabled": False})
    # No prompts in a plain folder: a prompt_sim filter is a config error, class_sim works.
    with pytest.raises(UserError, match="prompt_sim"):
        curate(CurateConfig.model_validate({**cfg, "filters": {"threshold": {"prompt_sim": 0.1}}}))
    out = curate(CurateConfig.model_validate({**cfg, "filters": {"quantile": {"score": "class_sim", "q": 0.5}}}))
    t = _table(out)
    assert t["prompt_sim"].isna().all() and t["class_sim"].notna().all()
    assert (t.groupby("label")["kept"].sum() == 2).all()
    assert (folder / ".curate_cache").is_dir()  # the default cache lives beside the images
    assert read_dataset_folder(folder)[1].classes == ("cat", "dog")  # and is not taken for a class


def test_real_centroid_filter_with_real_shots(tmp_path, mixture):
    """He et al.'s real-feature filter end to end: teacher features, centroids of 3 real training shots per class."""
    from synclone.data import load_fashion_mnist

    dataset, kinds = mixture
    shots = tmp_path / "shots"
    fm = load_fashion_mnist("train").per_class_subset(3, seed=0)
    for i in range(len(fm)):
        folder = shots / fm.label_space.slugs[int(fm.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(fm.images[i, 0].numpy()).save(folder / f"{i}.png")
    out = curate(_cfg(tmp_path, dataset, filters={"real_centroid": {"references": str(shots)}}))
    t = _table(out)
    kinds = np.array(kinds)
    kept = t["kept"].to_numpy()
    assert kept[kinds == "real"].mean() >= 0.6 and kept[kinds == "off_label"].mean() <= 0.3
    assert set(t.loc[~t["kept"], "drop_reason"]) <= {"real_centroid", "degenerate:constant"}
    step = next(s for s in json.loads((out / "dataset.json").read_text())["curation"]["log"]
                if s["filter"] == "real_centroid")
    assert step["references"] == str(shots) and step["classes"] == 10
    (shots / fm.label_space.slugs[0]).rename(tmp_path / "gone")
    with pytest.raises(UserError, match="no real image of class"):
        curate(_cfg(tmp_path, dataset, out="again", filters={"real_centroid": {"references": str(shots)}}))
