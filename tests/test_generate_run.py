"""End-to-end generation with tiny random diffusers pipelines loaded from folders, in this process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_pipelines import file_hashes, gen_config, one_torch_thread, tiny_sd, tiny_sd_flag_all  # noqa: F401
from synclone.errors import UserError
from synclone.generate import generate, image_folder, load_hf_dataset
from synclone.generate.backends import create_backend
from synclone.generate.plan import read_plan, retry_seed
from synclone.generate.writer import METADATA, SKIPPED, ledger_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd() -> Path:
    return tiny_sd()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def made(sd, tmp_path_factory) -> Path:
    """One small dataset with awkward class names, made once for the tests that only read it."""
    out = tmp_path_factory.mktemp("made") / "ds"
    labels = ["T-shirt/top", "../x", "a/b", "Ankle boot"]
    cfg = gen_config(sd, out, labels=labels, prompts={"strategy": "clip_templates", "negative_prompt": "blurry"})
    assert generate(cfg) == out
    return out


def test_dataset_layout_and_metadata(made):
    rows = read_jsonl(made / "train" / METADATA)
    plan = list(read_plan(made / "plan.jsonl"))
    assert [r["id"] for r in rows] == [j.id for j in plan] == list(range(12))
    for row, job in zip(rows, plan, strict=True):
        assert row["file_name"] == job.file_name and row["prompt"] == job.prompt and row["seed"] == job.seed
        assert row["negative_prompt"] == "blurry" and row["attempt"] == 0 and row["batch_size"] == 4
        assert row["strategy"] == "clip_templates" and row["scheduler"] == "DDIMScheduler" and row["steps"] == 2
        assert row["generator_revision"].startswith("local:")
        with Image.open(made / "train" / row["file_name"]) as im:
            assert im.size == (row["width"], row["height"]) == (16, 16)
    info = json.loads((made / "dataset.json").read_text())
    assert info["label_space"]["classes"] == ["T-shirt/top", "../x", "a/b", "Ankle boot"]
    assert info["counts"]["images"] == 12 and info["counts"]["skipped"] == 0
    assert info["generator"]["pipeline"] == "StableDiffusionPipeline" and "torch" in info["versions"]
    assert (made / "config.yaml").is_file() and (made / "run.json").is_file()


def test_awkward_class_names_stay_inside_the_folder(made):
    # "../x" and "a/b" are slugged to "x" and "a_b"; nothing exists outside the output folder.
    assert sorted(p.name for p in (made / "train").iterdir() if p.is_dir()) == ["a_b", "ankle_boot", "t_shirt_top", "x"]
    assert sorted(p.name for p in made.parent.iterdir()) == ["ds"]
    for p in made.rglob("*"):
        assert p.resolve().is_relative_to(made.resolve())


def test_loads_with_datasets_imagefolder(made):
    import datasets

    plain = datasets.load_dataset("imagefolder", data_dir=str(made), split="train")
    rows = read_jsonl(made / "train" / METADATA)
    # With a `label` column in metadata.jsonl, imagefolder keeps it (an int) instead of numbering folders.
    assert plain["label"] == [r["label"] for r in rows] == [0, 1, 2, 3] * 3
    ds = load_hf_dataset(made)
    assert ds.features["label"].names == ["T-shirt/top", "../x", "a/b", "Ankle boot"]
    first = ds[1]
    assert first["class_name"] == "../x" and first["label"] == 1
    with Image.open(made / "train" / rows[1]["file_name"]) as im:
        assert np.array_equal(np.asarray(first["image"]), np.asarray(im))


def test_loads_with_torchvision_imagefolder(made):
    from torchvision.datasets import ImageFolder

    plain = ImageFolder(str(made / "train"))
    # Plain ImageFolder numbers the sorted slugs: a_b=0, ankle_boot=1, t_shirt_top=2, x=3; not our labels.
    assert plain.classes == ["a_b", "ankle_boot", "t_shirt_top", "x"]
    ours = image_folder(made)
    assert ours.classes == ["t_shirt_top", "x", "a_b", "ankle_boot"]
    by_file = {r["file_name"]: r["label"] for r in read_jsonl(made / "train" / METADATA)}
    for path, target in ours.samples:
        assert target == by_file[Path(path).relative_to(made / "train").as_posix()]
    assert len(ours) == 12


def test_rerun_is_a_no_op_and_a_lost_file_comes_back_identical(made):
    hashes = file_hashes(made)
    meta = (made / "train" / METADATA).read_bytes()
    ledger_lines = sum(len(p.read_text().splitlines()) for p in ledger_files(made))
    from synclone.config import load_config
    from synclone.generate import GenerateConfig

    cfg = load_config(GenerateConfig, made / "config.yaml")
    generate(cfg)
    assert sum(len(p.read_text().splitlines()) for p in ledger_files(made)) == ledger_lines
    victim = made / "train" / read_jsonl(made / "train" / METADATA)[5]["file_name"]
    victim.unlink()
    generate(cfg)
    assert file_hashes(made) == hashes
    assert (made / "train" / METADATA).read_bytes() == meta


def test_changed_config_does_not_resume_into_the_same_folder(made):
    from synclone.config import load_config
    from synclone.generate import GenerateConfig

    cfg = load_config(GenerateConfig, made / "config.yaml", ["seed=8"])
    with pytest.raises(UserError, match="different config"):
        generate(cfg)


def test_dry_run_reports_counts_time_and_disk(sd, tmp_path, capsys):
    out = tmp_path / "dry"
    generate(gen_config(sd, out, images_per_class=50), dry_run=True)
    report = json.loads((out / "dry_run.json").read_text())
    assert report["images"] == 150 and report["per_class"] == {"T-shirt/top": 50, "Dress": 50, "Ankle boot": 50}
    assert report["images_per_second_per_process"] > 0 and report["estimated_seconds"] > 0
    assert 100 < report["bytes_per_image"] < 2000  # a 16x16 RGB PNG of noise
    assert "150 images, 3 classes (50 each)" in capsys.readouterr().out
    assert not (out / "train").exists() and (out / "plan.jsonl").is_file()
    generate(gen_config(sd, out, images_per_class=2))  # a real run may start in a dry run's folder
    assert len(file_hashes(out)) == 6


@pytest.mark.parametrize(
    ("labels", "message"),
    [(["Dress", "Dress"], "appears twice"), ([], "is empty"), (["ok", " "], "empty name")],
)
def test_bad_label_spaces_fail_before_any_image(sd, tmp_path, labels, message):
    with pytest.raises(UserError, match=message):
        generate(gen_config(sd, tmp_path / "o", labels=labels))
    assert not (tmp_path / "o").exists()


def test_unknown_model_offline_fails_before_any_image(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        generate(gen_config("nobody/no-such-model", tmp_path / "o"))
    with pytest.raises(UserError, match="neither an existing folder"):
        generate(gen_config("./no/such/folder", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_prompt_file_missing_classes_fails_before_any_image(sd, tmp_path):
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps({"Dress": ["a dress"]}))
    with pytest.raises(UserError, match="no prompts for 2 of 3 classes"):
        generate(gen_config(sd, tmp_path / "o", prompts={"strategy": "file", "options": {"path": str(f)}}))
    assert not (tmp_path / "o").exists()


def test_foreign_output_folder_is_refused(sd, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "thesis.tex").write_text("precious")
    with pytest.raises(UserError, match="not empty and is not a synclone dataset"):
        generate(gen_config(sd, tmp_path / "o"))


def test_unknown_scheduler_and_backend_options_are_user_errors(sd, tmp_path):
    with pytest.raises(UserError, match="unknown config key 'strenght'"):
        gen_config(sd, tmp_path / "o", generator={"options": {"strenght": 0.5}})
    with pytest.raises(UserError, match="unknown scheduler 'NoSuchScheduler'"):
        generate(gen_config(sd, tmp_path / "o", generator={"scheduler": "NoSuchScheduler"}))


def test_scheduler_choice_by_class_name(sd, tmp_path):
    out = generate(gen_config(sd, tmp_path / "o", images_per_class=1,
                              generator={"scheduler": "DPMSolverMultistepScheduler"}))
    assert {r["scheduler"] for r in read_jsonl(out / "train" / METADATA)} == {"DPMSolverMultistepScheduler"}


def test_flagged_images_are_skipped_never_saved_black(tmp_path):
    out = generate(gen_config(tiny_sd_flag_all(), tmp_path / "o", images_per_class=2, generator={"safety_retries": 2}))
    assert file_hashes(out) == {}
    assert read_jsonl(out / "train" / METADATA) == []
    skipped = read_jsonl(out / SKIPPED)
    assert len(skipped) == 6
    for row in skipped:
        assert row["reason"] == "flagged by the pipeline's safety checker" and row["attempt"] == 2
    info = json.loads((out / "dataset.json").read_text())
    assert info["counts"] == {"images": 0, "skipped": 6, "per_class": {"T-shirt/top": 0, "Dress": 0, "Ankle boot": 0}}


def test_flagged_images_are_regenerated_from_derived_seeds(sd, tmp_path):
    """A backend whose checker flags images by content (their mean): some pass only on a retry."""
    from synclone.generate.backends import BACKENDS, DiffusersText2Image, Generated

    class Picky(DiffusersText2Image):
        name = "picky_test"
        threshold = float("inf")

        def generate(self, jobs, generators):
            out = super().generate(jobs, generators)
            return [Generated(None, "too bright") if np.asarray(g.image).mean() > self.threshold else g for g in out]

    BACKENDS["picky_test"] = Picky
    try:
        cfg = gen_config(sd, tmp_path / "o", images_per_class=4, generator={"backend": "picky_test"})
        probe = create_backend(cfg.generator)
        probe.load()
        from synclone.generate.runner import generate_padded

        jobs = list(read_plan_jobs(cfg))
        means = [np.asarray(g.image).mean() for g in generate_padded(probe, jobs, [j.seed for j in jobs], 4)]
        Picky.threshold = float(np.median(means))  # about half the first attempts fail
        out = generate(cfg)
    finally:
        del BACKENDS["picky_test"]
    rows = read_jsonl(out / "train" / METADATA)
    retried = [r for r in rows if r["attempt"] > 0]
    assert retried, "some images should have needed a retry"
    by_id = {j.id: j for j in read_plan(out / "plan.jsonl")}
    for r in retried:
        assert r["seed"] == retry_seed(by_id[r["id"]].seed, r["attempt"])
        with Image.open(out / "train" / r["file_name"]) as im:
            assert np.asarray(im).mean() <= Picky.threshold
    skipped = read_jsonl(out / SKIPPED)
    assert all(r["reason"] == "too bright" and r["attempt"] == 3 for r in skipped)
    assert len(rows) + len(skipped) == 12


def read_plan_jobs(cfg):
    from synclone.generate.job import resolve_labels
    from synclone.generate.plan import build_plan
    from synclone.prompts import create_strategy

    labels = resolve_labels(cfg.labels, None)
    strategy = create_strategy(cfg.prompts, labels, cfg.seed)
    strategy.prepare(cfg.images_per_class)
    return build_plan(labels, strategy, cfg.images_per_class, cfg.seed)


def test_img2img_records_each_reference(sd, tmp_path):
    refs = tmp_path / "refs"
    rng = np.random.default_rng(0)
    for slug, n in (("t_shirt_top", 2), ("dress", 1), ("Ankle boot", 3)):  # a folder by slug or by class name
        (refs / slug).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(refs / slug / f"r{i}.png")
    options = {"references": str(refs), "strength": 0.5}
    cfg = gen_config(sd, tmp_path / "o", images_per_class=3, generator={"backend": "img2img", "steps": 4,
                                                                        "options": options})
    out = generate(cfg)
    rows = read_jsonl(out / "train" / METADATA)
    assert [r["reference"] for r in rows if r["label"] == 0] == ["t_shirt_top/r0.png", "t_shirt_top/r1.png",
                                                                 "t_shirt_top/r0.png"]
    assert {r["reference"] for r in rows if r["label"] == 2} == {"Ankle boot/r0.png", "Ankle boot/r1.png",
                                                                 "Ankle boot/r2.png"}
    assert json.loads((out / "dataset.json").read_text())["generator"]["strength"] == 0.5
    (refs / "dress" / "r0.png").unlink()
    with pytest.raises(UserError, match="no images for 1 classes \\('Dress'\\)"):
        generate(gen_config(sd, tmp_path / "o2", generator={"backend": "img2img",
                                                                 "options": {"references": str(refs)}}))
    assert not (tmp_path / "o2").exists()


def test_same_images_from_different_batch_cuts(sd, tmp_path):
    """Every model call has the full batch shape (short batches are padded), so an image doesn't depend
    on where its batch was cut: CPU kernels can round differently for another batch size."""
    from synclone.generate.backends import BACKENDS, DiffusersText2Image

    calls: list[int] = []

    class Spy(DiffusersText2Image):
        name = "spy_test"

        def generate(self, jobs, generators):
            calls.append(len(jobs))
            return super().generate(jobs, generators)

    BACKENDS["spy_test"] = Spy
    try:
        spy = {"backend": "spy_test"}
        a = generate(gen_config(sd, tmp_path / "a", images_per_class=3, batch_size=4, generator=spy))
        # Keep the first 6 images: the resumed run remakes ids 6-8 in one batch cut where none was before.
        for row in read_jsonl(a / "train" / METADATA)[6:]:
            os.unlink(a / "train" / row["file_name"])
        generate(gen_config(sd, a, images_per_class=3, batch_size=4, generator=spy))
    finally:
        del BACKENDS["spy_test"]
    assert calls == [4, 4, 4, 4]  # 9 images = 4 + 4 + (1 + 3 padding), then 3 remade + 1 padding
    b = generate(gen_config(sd, tmp_path / "b", images_per_class=3, batch_size=4))
    assert file_hashes(a) == file_hashes(b)


def test_classcond_backend(tmp_path):
    from diffusers import DDPMScheduler

    from synclone.generate.classcond import build_unet, make_preprocessing, sampling_scheduler, save_classcond
    from synclone.labels import LabelSpace

    torch.manual_seed(0)
    space = LabelSpace.from_names(["zero", "one", "two"], name="toy")
    unet = build_unet(3, (8, 8), 4, (8, 16), norm_num_groups=4)
    folder = save_classcond(tmp_path / "g", unet, sampling_scheduler(DDPMScheduler().config), space,
                            make_preprocessing((14, 14), 1, 2, 1))
    cfg = gen_config(folder, tmp_path / "o", labels=None, generator={"backend": "classcond", "steps": 2})
    out = generate(cfg)
    rows = read_jsonl(out / "train" / METADATA)
    assert [r["class_name"] for r in rows[:3]] == ["zero", "one", "two"] and len(rows) == 9
    assert {r["generator_revision"][:7] for r in rows} == {"sha256:"}
    with Image.open(out / "train" / rows[0]["file_name"]) as im:
        assert im.size == (14, 14) and im.mode == "L"
    # A subset of the generator's classes, in another order, maps by name.
    sub = generate(gen_config(folder, tmp_path / "o2", labels=["two", "zero"], images_per_class=1,
                              generator={"backend": "classcond", "steps": 2}))
    twos = [r for r in read_jsonl(sub / "train" / METADATA) if r["class_name"] == "two"]
    assert twos[0]["label"] == 0
    with pytest.raises(UserError, match="cannot make 'three'"):
        generate(gen_config(folder, tmp_path / "o3", labels=["three"], generator={"backend": "classcond"}))


def test_caption_and_context_prompts_are_recorded(sd, tmp_path):
    from _tiny_pipelines import tiny_t5

    opts = {"model": str(tiny_t5()), "require_class_name": False, "max_new_tokens": 1, "num_sentences": 50}
    out = generate(gen_config(sd, tmp_path / "cap", images_per_class=2, prompts={"strategy": "captions",
                                                                                  "options": opts}))
    info = json.loads((out / "dataset.json").read_text())["prompts"]
    assert info["strategy"] == "captions" and set(info["info"]["shortfall"]) == {"T-shirt/top", "Dress", "Ankle boot"}
    rows = read_jsonl(out / "train" / METADATA)
    plan = {j.id: j.prompt for j in read_plan(out / "plan.jsonl")}
    assert all(r["prompt"] == plan[r["id"]] and r["attributes"]["unique_captions"] >= 1 for r in rows)

    out = generate(gen_config(sd, tmp_path / "ctx", images_per_class=2, prompts={"strategy": "contexts"}))
    ds = load_hf_dataset(out)
    assert set(ds.features["attributes"]) >= {"time", "weather", "location", "n_uncommon"}
    assert [a["n_uncommon"] for a in ds["attributes"]] == [r["attributes"]["n_uncommon"]
                                                         for r in read_jsonl(out / "train" / METADATA)]


def test_module_entry_point_reports_user_errors(tmp_path, capsys):
    from synclone.generate.__main__ import main

    cfg = tmp_path / "gen.yaml"
    cfg.write_text("labels: [a, a]\ngenerator: {model: ./nowhere}\n")
    assert main([str(cfg)]) == 2
    assert "error:" in capsys.readouterr().err
    cfg.write_text("labels: [a]\nimages_per_clas: 3\n")
    assert main([str(cfg)]) == 2
    assert "unknown config key 'images_per_clas'" in capsys.readouterr().err


def test_resume_with_a_changed_model_folder_is_refused(sd, tmp_path):
    import shutil

    model = shutil.copytree(sd, tmp_path / "model")
    out = generate(gen_config(model, tmp_path / "o", images_per_class=1))
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text().replace('"beta_end": 0.012', '"beta_end": 0.02'))
    with pytest.raises(UserError, match="generator differs .*generator_revision"):
        generate(gen_config(model, out, images_per_class=1))
