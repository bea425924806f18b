"""Regenerate-until-full (``CurateConfig.refill``): a tiny class-conditional generator, the tiny open_clip scorer,
and a per-class quantile filter that drops a known share of every class.

The quantile filter keeps the images at or above the class's q-quantile of p_label, so how many survive depends
only on how many there are: q=0.5 keeps ceil(n/2) of n. The tests derive every expected count from that rule
and from the recorded scores rather than from fixed numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from _tiny_clip import shared_openclip, write_dataset_folder
from _tiny_pipelines import gen_config, one_torch_thread  # noqa: F401
from synclone.config import load_config
from synclone.curate import CurateConfig, RefillIncomplete, curate, load_curated
from synclone.curate import scorers as scorers_mod
from synclone.curate.config import FiltersConfig
from synclone.curate.refill import selection_filters
from synclone.errors import UserError
from synclone.generate.backends import BACKENDS, ClassConditional
from synclone.generate.plan import image_seed
from synclone.labels import LabelSpace

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = ("zero", "one", "two")
PER_CLASS = 4  # images per class in the source dataset
SEED = 7  # gen_config's run seed


class Interrupted(Exception):
    """Stands in for Ctrl-C / a killed job in the middle of a refill round."""


class CountingClassCond(ClassConditional):
    """The class-conditional backend, counting its model calls and able to fail at a chosen call."""

    name = "refill_test"
    calls = 0
    fail_at: int | None = None

    def generate(self, jobs, generators):
        type(self).calls += 1
        if self.fail_at is not None and type(self).calls >= self.fail_at:
            raise Interrupted(f"interrupted at model call {type(self).calls}")
        return super().generate(jobs, generators)


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """A tiny random class-conditional generator (14x14 grey) registered under a counting backend."""
    import torch
    from diffusers import DDPMScheduler

    from synclone.generate.classcond import build_unet, make_preprocessing, sampling_scheduler, save_classcond

    BACKENDS[CountingClassCond.name] = CountingClassCond
    torch.manual_seed(0)
    unet = build_unet(len(CLASSES), (8, 8), 4, (8, 16), norm_num_groups=4)
    folder = save_classcond(tmp_path_factory.mktemp("gen") / "g", unet, sampling_scheduler(DDPMScheduler().config),
                            LabelSpace.from_names(list(CLASSES), name="toy"), make_preprocessing((14, 14), 1, 2, 1))
    yield folder
    del BACKENDS[CountingClassCond.name]


def _gen_cfg(generator: Path, out: Path, **kw):
    return gen_config(generator, out, labels=None, images_per_class=kw.pop("images_per_class", PER_CLASS),
                      generator={"backend": CountingClassCond.name, "steps": 2}, **kw)


@pytest.fixture(scope="module")
def source(generator, tmp_path_factory) -> Path:
    from synclone.generate import generate

    return generate(_gen_cfg(generator, tmp_path_factory.mktemp("src") / "generated"))


@pytest.fixture(autouse=True)
def _reset_backend():
    CountingClassCond.calls, CountingClassCond.fail_at = 0, None
    yield
    CountingClassCond.fail_at = None


def _cfg(tmp_path: Path, source: Path, out: str = "curated", q: float = 0.5, **refill) -> CurateConfig:
    return CurateConfig.model_validate({
        "input": str(source), "output": str(tmp_path / out), "cache_dir": str(tmp_path / "cache"), "progress": False,
        "scorer": {"kind": "openclip", "model": str(shared_openclip()), "templates": "simple"},
        "stats": {"enabled": False}, "filters": {"quantile": {"score": "p_label", "q": q}},
        "refill": {"target_per_class": 5, **refill}})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _refill_info(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text())["curation"]["refill"]


def _quantile_kept(values: np.ndarray, q: float) -> int:
    """How many images the quantile filter keeps: those at or above the class's q-quantile."""
    return int((values >= np.quantile(values, q)).sum())


def _hashes(paths) -> dict[str, str]:
    return {Path(p).name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def test_refill_fills_every_class_with_fresh_ids_and_seeds(tmp_path, source, generator):
    target = 5
    out = curate(_cfg(tmp_path, source))
    kept, space = load_curated(out)
    per_class = pd.Series([r.class_name for r in kept]).value_counts().to_dict()
    assert per_class == {c: target for c in CLASSES}

    info = _refill_info(out)
    assert info["full"] and info["short"] == {} and info["kept"] == {c: target for c in CLASSES}
    src, *rounds = info["rounds"]
    assert rounds, "the source alone cannot fill the classes: q=0.5 keeps ceil(4/2) of 4"
    # Round 1 asked each class for (missing / its keep rate) images; the source kept ceil(n/2) of n.
    first = rounds[0]
    for c in CLASSES:
        kept_before = first["kept_before"][c]
        assert kept_before == math.ceil(PER_CLASS / 2) == src["generated"][c] - PER_CLASS // 2
        assert first["requested"][c] == math.ceil((target - kept_before) / (kept_before / PER_CLASS))
    for r in rounds:
        assert r["generated"] == r["requested"] and r["skipped"] == 0
    assert sum(sum(r["kept"].values()) for r in info["rounds"]) == target * len(CLASSES)

    # Every image of the pool was scored and filtered as a whole; each class kept exactly what the rule allows.
    table = pd.read_parquet(out / "curation.parquet")
    assert len(table) == PER_CLASS * len(CLASSES) + sum(sum(r["generated"].values()) for r in rounds)
    for c in CLASSES:
        v = table.loc[table["class_name"] == c, "p_label"].to_numpy()
        assert _quantile_kept(v, 0.5) >= target  # full before the top-k ...
        assert int(table.loc[table["class_name"] == c, "kept"].sum()) == target  # ... which keeps exactly target
    assert set(table.loc[~table["kept"], "drop_reason"]) <= {"quantile:p_label", "keep_k"}
    steps = json.loads((out / "dataset.json").read_text())["curation"]
    assert steps["filters"]["keep_k"]["k"] == target and steps["scoring"]["encoded_now"] == len(table)

    # Fresh ids and seeds: image k of class c has id k * C + c with k after the source's images, and the seed
    # of (run seed, id); none repeats an id or a seed of the source.
    rows = _jsonl(out / "curation.jsonl")
    src_rows = [r for r in rows if r["refill_round"] == 0]
    new_rows = [r for r in rows if r["refill_round"] > 0]
    assert len({r["id"] for r in rows}) == len(rows)
    assert not {r["seed"] for r in src_rows} & {r["seed"] for r in new_rows}
    for r in new_rows:
        k, label = divmod(int(r["id"]), len(CLASSES))
        assert k >= PER_CLASS and CLASSES[label] == r["class_name"]
        assert r["seed"] == image_seed(SEED, int(r["id"])) and r["attempt"] == 0
        assert r["file_name"].startswith(f"../refill/round-{r['refill_round']:03d}/train/")
    for r in kept:
        assert r.path.is_file()

    # A top-up is the continuation of the source's plan: the same bytes as the same ids of a larger dataset.
    from synclone.generate import generate

    bigger = generate(_gen_cfg(generator, tmp_path / "bigger", images_per_class=PER_CLASS + first["requested"]["zero"]))
    made = [out / "train" / r["file_name"] for r in new_rows if r["refill_round"] == 1]
    same = [bigger / "train" / r["source_file_name"] for r in new_rows if r["refill_round"] == 1]
    assert _hashes(made) == _hashes(same)


def test_second_run_makes_and_scores_nothing(tmp_path, source, monkeypatch):
    cfg = _cfg(tmp_path, source)
    out = curate(cfg)
    meta = (out / "train" / "metadata.jsonl").read_bytes()
    section = _refill_info(out)
    calls = CountingClassCond.calls
    assert calls > 0

    def boom(*_a, **_k):
        raise AssertionError("a model was used although everything is made and cached")

    for cls in scorers_mod.SCORERS.values():
        monkeypatch.setattr(cls, "_load", boom)
        monkeypatch.setattr(cls, "_encode_images", boom)
    import synclone.generate.api as gen_api

    monkeypatch.setattr(gen_api, "generate", boom)
    again = curate(cfg)
    assert CountingClassCond.calls == calls
    assert (again / "train" / "metadata.jsonl").read_bytes() == meta
    assert _refill_info(again)["rounds"] == section["rounds"]
    scoring = json.loads((again / "dataset.json").read_text())["curation"]["scoring"]
    assert scoring["encoded_now"] == 0 and not scoring["model_loaded"]


def test_interrupted_refill_resumes_to_the_same_result(tmp_path, source):
    reference = curate(_cfg(tmp_path, source, out="uninterrupted"))
    ref_calls = CountingClassCond.calls
    assert ref_calls >= 3, "the round should need several batches for the interruption to fall inside it"

    CountingClassCond.calls, CountingClassCond.fail_at = 0, 3  # two batches on disk, then the job dies
    with pytest.raises(Interrupted):
        curate(_cfg(tmp_path, source, out="resumed"))
    out = tmp_path / "resumed"
    state = json.loads((out / "refill" / "refill.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1] and not (out / "dataset.json").exists()

    CountingClassCond.calls, CountingClassCond.fail_at = 0, None
    curate(_cfg(tmp_path, source, out="resumed"))  # the same command again
    assert CountingClassCond.calls == ref_calls - 2  # the two finished batches were not made again
    assert (out / "curation.jsonl").read_bytes() == (reference / "curation.jsonl").read_bytes()
    assert _refill_info(out)["rounds"] == _refill_info(reference)["rounds"]
    ref_files = sorted((reference / "refill").rglob("*.png"))
    assert _hashes(sorted((out / "refill").rglob("*.png"))) == _hashes(ref_files) and ref_files


def test_max_rounds_warns_with_the_short_counts_and_a_rerun_continues(tmp_path, source):
    q, target = 0.9, 5  # keeps about a tenth: one round cannot fill 5 per class
    with pytest.warns(RefillIncomplete) as caught:
        out = curate(_cfg(tmp_path, source, q=q, max_rounds=1))
    info = _refill_info(out)
    table = pd.read_parquet(out / "curation.parquet")
    kept = {c: int(table.loc[table["class_name"] == c, "kept"].sum()) for c in CLASSES}
    for c in CLASSES:
        assert kept[c] == _quantile_kept(table.loc[table["class_name"] == c, "p_label"].to_numpy(), q) < target
    assert not info["full"] and info["short"] == kept and len(info["rounds"]) == 2
    (message,) = [str(w.message) for w in caught if issubclass(w.category, RefillIncomplete)]
    assert "refill.max_rounds=1" in message
    for c in CLASSES:
        assert f"'{c}' {kept[c]}" in message
    assert len(load_curated(out)[0]) == sum(kept.values())  # a result, not a crash

    # More rounds allowed: round 1 is reused, and round 2 continues each class's numbering after it.
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        curate(_cfg(tmp_path, source, q=q, max_rounds=2))
    info = _refill_info(out)
    r1, r2 = info["rounds"][1:]
    for c in CLASSES:
        assert r2["image_index"][c][0] == r1["image_index"][c][1] + 1
        assert r2["kept_before"][c] == kept[c]
    assert info["full"] == (not any(issubclass(w.category, RefillIncomplete) for w in again))


def test_full_source_is_cut_to_exactly_the_target(tmp_path, source):
    """No filter drops anything: no round is made and keep_k keeps the best `target` per class by p_label."""
    cfg = CurateConfig.model_validate({**_cfg(tmp_path, source).model_dump(), "filters": {},
                                       "refill": {"target_per_class": 3}})
    out = curate(cfg)
    assert CountingClassCond.calls == 0 and len(_refill_info(out)["rounds"]) == 1
    table = pd.read_parquet(out / "curation.parquet")
    for c in CLASSES:
        t = table[table["class_name"] == c]
        assert t["kept"].sum() == 3
        assert t.loc[t["kept"], "p_label"].min() >= t.loc[~t["kept"], "p_label"].max()


def test_reached_through_config_file_overrides(tmp_path, source):
    """``synclone curate CONFIG refill.target_per_class=N`` needs no new flag: the override creates the section."""
    import yaml

    path = tmp_path / "curate.yaml"
    base = _cfg(tmp_path, source).model_dump(mode="json")
    base.pop("refill")
    path.write_text(yaml.safe_dump(base))
    cfg = load_config(CurateConfig, path, ["refill.target_per_class=4", "refill.max_rounds=2"])
    assert cfg.refill is not None and cfg.refill.target_per_class == 4 and cfg.refill.max_rounds == 2
    assert load_config(CurateConfig, path).refill is None


def test_selection_rule_is_he_top_k_when_he_is_enabled():
    f = selection_filters(FiltersConfig.model_validate({"he": {"enabled": True}}), 7)
    assert f.he.k == 7 and f.keep_k.k is None
    f = selection_filters(FiltersConfig(), 7)
    assert f.keep_k.k == 7 and f.he.k is None
    with pytest.raises(UserError, match="filters.he.k=3 but refill.target_per_class=7"):
        selection_filters(FiltersConfig.model_validate({"he": {"enabled": True, "k": 3}}), 7)
    with pytest.raises(UserError, match="dedup after the top-k"):
        selection_filters(FiltersConfig.model_validate(
            {"dedup": {"enabled": True}, "order": ["degenerate", "keep_k", "dedup"]}), 7)


@pytest.mark.parametrize(("change", "message"), [
    ({"filters": {"keep_k": {"k": 2}}}, "filters.keep_k.k=2 but refill.target_per_class=5"),
    ({"refill": {"target_per_class": 5, "generate_overrides": ["images_per_class=9"]}},
     "images_per_class=9 but .* was made with 4"),
    ({"refill": {"target_per_class": 5, "generate_overrides": ["labels=[zero, two, one]"]}},
     "classes .* must match"),
    ({"refill": {"target_per_class": 5, "generate_config": "missing.yaml"}}, "missing.yaml' does not exist"),
])
def test_bad_refill_settings_fail_before_any_work(tmp_path, source, change, message):
    data = _cfg(tmp_path, source).model_dump()
    data.update(change)
    with pytest.raises(UserError, match=message):
        curate(CurateConfig.model_validate(data))
    assert not (tmp_path / "curated").exists() and CountingClassCond.calls == 0


def test_refill_needs_a_generated_source(tmp_path):
    space = LabelSpace.from_names(list(CLASSES), name="toy")
    rng = np.random.default_rng(0)
    folder = write_dataset_folder(tmp_path / "plain", rng.integers(0, 255, (3, 14, 14), dtype=np.uint8),
                                  [0, 1, 2], space)
    with pytest.raises(UserError, match="refill needs a source folder made by synclone generate"):
        curate(_cfg(tmp_path, folder))


def test_extend_names_only_known_classes(tmp_path, generator):
    from synclone.generate import generate

    with pytest.raises(UserError, match="extend names class 'three'"):
        generate(_gen_cfg(generator, tmp_path / "o", extend={"three": {"start": 4, "count": 1}}))
    assert not (tmp_path / "o").exists() and CountingClassCond.calls == 0
    # The plan holds just the asked-for images, with the ids they have in a larger plan.
    out = generate(_gen_cfg(generator, tmp_path / "o2", extend={"two": {"start": 6, "count": 2}}))
    rows = _jsonl(out / "train" / "metadata.jsonl")
    assert [r["id"] for r in rows] == [6 * 3 + 2, 7 * 3 + 2]
    info = json.loads((out / "dataset.json").read_text())
    assert info["plan"]["jobs"] == 2 and info["plan"]["id_end"] == 7 * 3 + 3
