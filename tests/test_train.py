"""The supervised loop end to end on tiny budgets: kill-and-resume exactness, mixing, model selection on
validation only, failure modes, model folders, and few-shot over seeds.

Batches are observed by wrapping ``synclone.train.loop.augment`` (it receives every training batch before
augmentation) and validation sets by wrapping ``loop._validate``. The dataset folders written here carry a
source marker and an image id in their first pixels, so any batch can be traced back to the images in it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import synclone.data.fashion_mnist as fm
import synclone.train.fewshot as fewshot_mod
import synclone.train.loop as loop
from synclone.config import load_config
from synclone.data import load_fashion_mnist
from synclone.data.streaming import FileImageSet, Preprocess
from synclone.errors import UserError
from synclone.labels import FASHION_MNIST, LabelSpace
from synclone.models import load_model
from synclone.train import TrainConfig, train
from synclone.train.batches import CyclingSampler
from synclone.train.fewshot import fewshot
from synclone.train.loop import CKPT, load_sources, predict

REAL, SYN = 1, 2  # source markers written into pixel (0, 0)


def write_folder(root: Path, space: LabelSpace, per_class: int, marker: int, empty: tuple[int, ...] = ()) -> Path:
    """A synclone dataset folder of 28x28 grey images: a class-dependent bar plus noise; row 0 holds
    (marker, id // 256, id % 256) so a batch can be decoded back to (source, image id)."""
    rng = np.random.default_rng(marker)
    (root / "train").mkdir(parents=True)
    rows = []
    for c, slug in enumerate(space.slugs):
        if c in empty:
            continue
        (root / "train" / slug).mkdir()
        for i in range(per_class):
            iid = c * per_class + i
            a = rng.integers(0, 60, (28, 28), dtype=np.uint8)
            a[4 + 2 * c: 6 + 2 * c, 4:24] = 220
            a[0, :3] = (marker, iid // 256, iid % 256)
            name = f"{slug}/{iid:05d}.png"
            Image.fromarray(a, mode="L").save(root / "train" / name)
            rows.append({"file_name": name, "id": f"{iid:05d}", "label": c, "class_name": space.classes[c]})
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "dataset.json").write_text(json.dumps({"label_space": space.to_dict()}), encoding="utf-8")
    return root


def decode(x: torch.Tensor) -> list[tuple[int, int]]:
    """(marker, id) of every image in a float batch in [0, 1] or a uint8 batch."""
    px = x[:, 0, 0, :3]
    px = (px * 255).round().long() if px.is_floating_point() else px.long()
    return [(int(m), int(h) * 256 + int(lo)) for m, h, lo in px]


def tiny_cfg(out: Path, **over) -> TrainConfig:
    d = {"output": str(out), "threads": 1, "model": {"arch": "synclone_cnn_tiny"},
         "data": {"real_per_class": 30, "val_max": 200},
         "optim": {"steps": 30, "batch_size": 32, "warmup_steps": 5}}
    for key, value in over.items():
        d.setdefault(key, {}).update(value) if isinstance(value, dict) else d.__setitem__(key, value)
    return TrainConfig.model_validate(d)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("folders")
    return {"real": write_folder(base / "real", FASHION_MNIST, 12, REAL),
            "syn": write_folder(base / "syn", FASHION_MNIST, 12, SYN)}


class Recorder:
    """Wraps the loop's augment / _validate to record every training batch and every validation set."""

    def __init__(self, mp: pytest.MonkeyPatch, poison_step: int | None = None) -> None:
        self.batches: list[torch.Tensor] = []
        self.val_sets: list = []
        real_augment, real_validate = loop.augment, loop._validate

        def augment(x, *a, **k):
            self.batches.append(x.clone())
            if poison_step is not None and len(self.batches) - 1 == poison_step:
                x = x * float("nan")  # a corrupt batch: the loss turns NaN at this step
            return real_augment(x, *a, **k)

        def validate(model, data, device):
            self.val_sets.append(data)
            return real_validate(model, data, device)

        mp.setattr(loop, "augment", augment)
        mp.setattr(loop, "_validate", validate)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# --- kill and resume ------------------------------------------------------------------------------------

KILL_SCRIPT = """
import json, os, signal, sys
import synclone.train.loop as loop
from synclone.train import TrainConfig
cfg = TrainConfig.model_validate(json.loads(sys.argv[1]))
kill_at, calls, real_augment = int(sys.argv[2]), [0], loop.augment
def augment(x, *a, **k):
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, no final save: a real crash
    calls[0] += 1
    return real_augment(x, *a, **k)
loop.augment = augment
loop.train(cfg, progress=False)
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Run A on Fashion-MNIST without interruption; records every IDX file read and the live final model."""
    out = tmp_path_factory.mktemp("runs") / "a"
    cfg = tiny_cfg(out, checkpoint_every=7, eval_every=10)
    reads, saved = [], {}
    real_read, real_save = fm.read_idx, loop.save_model

    def read_idx(path):
        reads.append(str(path))
        return real_read(path)

    def save_model(model, folder, extra=None):
        saved[Path(folder).name] = model
        return real_save(model, folder, extra)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fm, "read_idx", read_idx)
        mp.setattr(loop, "save_model", save_model)
        train(cfg, progress=False)
    return {"cfg": cfg, "out": out, "reads": reads, "live": saved["model_last"]}


def test_killed_run_resumes_to_identical_weights(uninterrupted, tmp_path):
    cfg_a, out_a = uninterrupted["cfg"], uninterrupted["out"]
    cfg_b = cfg_a.model_copy(update={"output": str(tmp_path / "b")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg_b.model_dump(mode="json")), "17"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    out_b = Path(cfg_b.output)
    state = torch.load(out_b / CKPT, map_location="cpu", weights_only=True)
    # Checkpoints at 7, 10 (validation) and 14: the resumed run must replay steps 14..16.
    assert state["step"] == 14
    assert not (out_b / "model_last").exists() and not (out_b / "metrics.json").exists()

    train(cfg_b, resume=True, progress=False)
    _assert_same_weights(out_a / "model_last", out_b / "model_last")
    _assert_same_weights(out_a / "model", out_b / "model")
    ma, mb = (json.loads((o / "metrics.json").read_text()) for o in (out_a, out_b))
    strip = [[(h["step"], h["loss"], h["val_acc"]) for h in m["history"]] for m in (ma, mb)]
    assert strip[0] == strip[1] and [h[0] for h in strip[0]] == [10, 20, 30]
    assert ma["best_step"] == mb["best_step"] and ma["data"] == mb["data"]


def test_existing_run_needs_resume_and_same_budget(uninterrupted):
    cfg = uninterrupted["cfg"]
    with pytest.raises(UserError, match="already holds a training run"):
        train(cfg, progress=False)
    changed = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 1e-3})})
    with pytest.raises(UserError, match=r"'optim\.lr' was 0\.003, now 0\.001"):
        train(changed, resume=True, progress=False)
    # Settings outside the budget (here: logging cadence) may change on resume; a finished run just re-finishes.
    train(cfg.model_copy(update={"eval_every": 5}), resume=True, progress=False)


def test_selection_never_reads_the_test_split(uninterrupted):
    reads = uninterrupted["reads"]
    assert any("train-images" in r for r in reads)
    assert not any("t10k" in r for r in reads), reads
    m = json.loads((uninterrupted["out"] / "metrics.json").read_text())
    assert m["selected_by"] == "validation" and "held out from 'fashion_mnist_train'" in m["validation"]
    note = json.loads((uninterrupted["out"] / "model" / "config.json").read_text())["training"]
    assert note["selected_by"] == "validation" and note["step"] == m["best_step"]


def test_model_folder_reproduces_in_memory_model(uninterrupted):
    live = uninterrupted["live"].eval()
    loaded = load_model(uninterrupted["out"] / "model_last")
    assert loaded.label_space == live.label_space and loaded.input_size == (1, 28, 28)
    x = load_fashion_mnist("train").per_class_subset(5, seed=3).batch(slice(None))[0]
    with torch.no_grad():
        ref = live(x.contiguous(memory_format=torch.channels_last))
        got = loaded(x)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), ref.argmax(1))


# --- data mixing and selection --------------------------------------------------------------------------

def test_ratio_mix_batches_and_disjoint_validation(folders, tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = tiny_cfg(tmp_path / "r", data={"real": str(folders["real"]), "synthetic": str(folders["syn"]),
                                         "real_per_class": None, "mix": "ratio", "synthetic_ratio": 0.25,
                                         "real_loss_weight": 0.75},
                   optim={"steps": 12, "batch_size": 20}, eval_every=4)
    train(cfg, progress=False)
    assert len(rec.batches) == 12
    for b in rec.batches:
        src = [m for m, _ in decode(b)]
        assert src == [REAL] * 15 + [SYN] * 5  # round(20 * 0.25) synthetic, real first (loss weighting)
    seen = {p for b in rec.batches for p in decode(b)}
    val = {p for p in decode(rec.val_sets[0].images)}
    assert all(set(decode(v.images)) == val for v in rec.val_sets)  # one fixed validation split
    assert not seen & val
    # 1 of 12 images per class held out from each source; 12 steps x 15 real cover every other real image.
    assert Counter(m for m, _ in val) == {REAL: 10, SYN: 10}
    assert {p for p in seen if p[0] == REAL} | {p for p in val if p[0] == REAL} == {(REAL, i) for i in range(120)}

    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["selected_by"] == "validation"
    assert m["best_val_acc"] == max(h["val_acc"] for h in m["history"])
    assert m["best_step"] == max(m["history"], key=lambda h: (h["val_acc"], -h["val_loss"]))["step"]
    # The selected model folder scores on the validation split exactly what selected it.
    val_set = rec.val_sets[0]
    acc = float((predict(load_model(tmp_path / "r" / "model"), val_set).argmax(1) == val_set.labels).float().mean())
    assert acc == pytest.approx(m["best_val_acc"], abs=1e-6)


def test_accuracy_ties_go_to_the_lower_validation_loss(folders, tmp_path, monkeypatch):
    """On a saturated validation split (every check at 100%, common for synthetic images) the model is the
    one with the lowest validation loss, not the first to reach 100%."""
    losses = iter([0.9, 0.5, 0.2, 0.4, 0.3])
    monkeypatch.setattr(loop, "_validate", lambda model, data, device: (1.0, next(losses)))
    cfg = tiny_cfg(tmp_path / "t", data={"real": str(folders["real"]), "real_per_class": None},
                   optim={"steps": 10, "batch_size": 20}, eval_every=2)
    train(cfg, progress=False)
    m = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert [h["step"] for h in m["history"]] == [2, 4, 6, 8, 10]
    assert m["best_step"] == 6 and m["best_val_loss"] == 0.2 and m["best_val_acc"] == 1.0
    note = json.loads((tmp_path / "t" / "model" / "config.json").read_text())["training"]
    assert note["step"] == 6  # the saved model is the selected one


def test_concat_shows_each_image_of_both_sources_once_per_epoch(folders, tmp_path, monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = tiny_cfg(tmp_path / "c", data={"real": str(folders["real"]), "synthetic": str(folders["syn"]),
                                         "real_per_class": None, "mix": "concat"},
                   optim={"steps": 11, "batch_size": 20})
    train(cfg, progress=False)
    seen = Counter(p for b in rec.batches for p in decode(b))
    src = load_sources(cfg)
    expected = Counter(decode(src.real.images) + decode(src.synthetic.images))  # 110 + 110 = 11 batches of 20
    assert seen == expected and set(seen.values()) == {1}
    assert Counter(m for m, _ in seen) == {REAL: 110, SYN: 110}
    # Sources are shuffled together, not taken one after the other.
    assert all({m for m, _ in decode(b)} == {REAL, SYN} for b in rec.batches[:3])


def test_streamed_folders_train_at_image_size(folders, tmp_path, monkeypatch):
    """data.image_size streams folders from disk (ImageNet-sized data): every image once per epoch, decoded
    at the asked size, validation held out as for in-memory sets, the model built for that size."""
    rec = Recorder(monkeypatch)
    cfg = tiny_cfg(tmp_path / "s", data={"real": str(folders["real"]), "synthetic": str(folders["syn"]),
                                         "real_per_class": None, "mix": "concat", "image_size": 20},
                   optim={"steps": 11, "batch_size": 20})
    train(cfg, progress=False)
    src = load_sources(cfg)
    assert all(isinstance(s, FileImageSet) for s in (src.real, src.synthetic, src.val))
    assert len(src.val) == 20 and not set(src.val.paths) & set(src.real.paths + src.synthetic.paths)
    pre = Preprocess()
    by_pixels = {pre(p, (3, 20, 20)).numpy().tobytes(): p for s in (src.real, src.synthetic) for p in s.paths}
    seen = Counter(by_pixels[(x * 255).round().to(torch.uint8).numpy().tobytes()] for b in rec.batches for x in b)
    assert set(seen) == set(by_pixels.values()) and set(seen.values()) == {1}  # 220 images = 11 batches of 20
    assert tuple(load_model(tmp_path / "s" / "model").input_size) == (3, 20, 20)
    with pytest.raises(UserError, match="image_size applies to folders"):
        load_sources(tiny_cfg(tmp_path / "b", data={"image_size": 20}))


@pytest.mark.parametrize("size,per_step", [(10, 3), (7, 7), (5, 12)])
def test_cycling_sampler_passes_are_permutations(size, per_step):
    s = CyclingSampler(size, per_step, seed=4, source_id=0)
    flat = torch.cat([s.indices(k) for k in range(6)])
    for start in range(0, len(flat) - size + 1, size):
        assert sorted(flat[start:start + size].tolist()) == list(range(size))
    again = CyclingSampler(size, per_step, seed=4, source_id=0)
    assert all(torch.equal(s.indices(k), again.indices(k)) for k in (5, 0, 3))  # a pure function of the step
    other = torch.cat([CyclingSampler(size, per_step, seed=5, source_id=0).indices(k) for k in range(6)])
    assert not torch.equal(flat, other)


# --- failures --------------------------------------------------------------------------------------------

def test_nan_batch_stops_and_keeps_last_good_checkpoint(folders, tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path / "n", data={"real": str(folders["real"]), "real_per_class": None},
                   optim={"steps": 20, "batch_size": 20}, checkpoint_every=3, eval_every=100)
    Recorder(monkeypatch, poison_step=8)
    with pytest.raises(UserError, match=r"loss became nan at step 8.*last good checkpoint is .*last\.pt"):
        train(cfg, progress=False)
    state = torch.load(tmp_path / "n" / CKPT, map_location="cpu", weights_only=True)
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    monkeypatch.undo()
    train(cfg, resume=True, progress=False)  # the kept checkpoint is usable
    assert json.loads((tmp_path / "n" / "metrics.json").read_text())["total_steps"] == 20


def test_diverging_lr_stops_without_saving_nonfinite_weights(tmp_path):
    cfg = tiny_cfg(tmp_path / "d", optim={"lr": 1e6, "warmup_steps": 0}, checkpoint_every=1)
    with pytest.raises(UserError, match="non-finite|loss became") as err:
        train(cfg, progress=False)
    ckpt = tmp_path / "d" / CKPT
    assert ("last good checkpoint" in str(err.value)) == ckpt.is_file()
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_label_space_mismatch_names_both(folders, tmp_path):
    pets = write_folder(tmp_path / "pets", LabelSpace.from_names(["cat", "dog"], name="pets"), 3, SYN)
    cfg = tiny_cfg(tmp_path / "m", data={"synthetic": str(pets)})
    with pytest.raises(UserError, match=r"real data 'fashion_mnist' vs synthetic data 'pets'"):
        train(cfg, progress=False)
    assert not (tmp_path / "m").exists()  # stopped before anything was written


def test_bad_inputs_fail_before_training(tmp_path):
    with pytest.raises(UserError, match="synthetic_ratio must be in"):
        load_config(TrainConfig, overrides=["data.synthetic_ratio=1.5"])
    with pytest.raises(UserError, match="real_loss_weight needs mix=ratio"):
        load_config(TrainConfig, overrides=["data.synthetic=x", "data.real_loss_weight=0.5"])
    holes = write_folder(tmp_path / "holes", FASHION_MNIST, 3, SYN, empty=(3,))
    cfg = tiny_cfg(tmp_path / "e", data={"synthetic": str(holes)})
    with pytest.raises(UserError, match="synthetic data 'holes' has no images of class.*'Dress'"):
        train(cfg, progress=False)
    assert not (tmp_path / "e").exists()


def test_threads_setting_is_restored(folders, tmp_path):
    before = torch.get_num_threads()
    train(tiny_cfg(tmp_path / "t", data={"real": str(folders["real"]), "real_per_class": None},
                   optim={"steps": 2, "batch_size": 20}, threads=1), progress=False)
    assert torch.get_num_threads() == before


# --- few-shot --------------------------------------------------------------------------------------------

def test_fewshot_over_seeds(folders, tmp_path, monkeypatch):
    events = []
    real_read, real_train = fm.read_idx, fewshot_mod.train

    def read_idx(path):
        events.append(("read", str(path)))
        return real_read(path)

    def train_spy(cfg, **kw):
        events.append(("train", "start"))
        try:
            return real_train(cfg, **kw)
        finally:
            events.append(("train", "end"))

    monkeypatch.setattr(fm, "read_idx", read_idx)
    monkeypatch.setattr(fewshot_mod, "train", train_spy)
    cfg = tiny_cfg(tmp_path / "fs", data={"synthetic": str(folders["syn"]), "mix": "ratio", "synthetic_ratio": 0.5,
                                          "real_loss_weight": 0.5, "val_max": 100},
                   optim={"steps": 20, "batch_size": 20})
    res = fewshot(cfg, shots=5, seeds=[0, 1])

    stored = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    assert stored == json.loads(json.dumps(res))
    accs = np.array(res["accuracies"])
    assert res["n"] == 2 and res["mean"] == pytest.approx(accs.mean()) and res["std"] == pytest.approx(accs.std(ddof=1))
    assert res["conventions"]["mix"] == "ratio" and "ddof=1" in res["conventions"]["std"]
    s0, s1 = res["per_seed"]
    assert s0["real_images"] == s1["real_images"] == 50
    assert s0["real_fingerprint"] != s1["real_fingerprint"]  # each seed draws its own shots
    # The test set is read only between trainings, never during one.
    inside = False
    for kind, what in events:
        inside = {"start": True, "end": False}.get(what, inside) if kind == "train" else inside
        assert not (inside and "t10k" in what)
    assert any("t10k" in w for _, w in events)
    # Each reported number is the final model's top-1 on the full test set, recomputed independently.
    test = load_fashion_mnist("test")
    for seed, acc in zip([0, 1], accs, strict=True):
        model = load_model(tmp_path / "fs" / f"seed{seed}" / "model_last")
        assert acc == pytest.approx(float((predict(model, test).argmax(1) == test.labels).float().mean()), abs=1e-6)
        run_cfg = yaml.safe_load((tmp_path / "fs" / f"seed{seed}" / "config.yaml").read_text())
        assert (run_cfg["seed"], run_cfg["data"]["real_per_class"], run_cfg["data"]["mix"]) == (seed, 5, "ratio")

    # Re-running skips finished seeds (no training at all) and gives the same result.
    monkeypatch.setattr(fewshot_mod, "train", lambda *a, **k: pytest.fail("a finished seed was trained again"))
    assert fewshot(cfg, shots=5, seeds=[0, 1]) == res
    # The same output folder with another budget is refused, naming the key.
    with pytest.raises(UserError, match=r"'optim\.steps' was 20, now 30"):
        fewshot(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"steps": 30})}), shots=5, seeds=[0])


def test_fewshot_rejects_bad_arguments(tmp_path):
    cfg = tiny_cfg(tmp_path / "fx")
    with pytest.raises(UserError, match="shots must be at least 1"):
        fewshot(cfg, shots=0, seeds=[0])
    with pytest.raises(UserError, match="distinct"):
        fewshot(cfg, shots=1, seeds=[1, 1])
    # Without real data a few-shot entry is the synthetic-only baseline over the same seeds: no shots are asked for.
    from synclone.train.fewshot import seed_config

    no_real = tiny_cfg(tmp_path / "fy", data={"real": None, "synthetic": "x", "real_per_class": None})
    one = seed_config(no_real, 1, 3)
    assert one.seed == 3 and one.data.real is None and one.data.real_per_class is None and one.data.mix != "ratio"

