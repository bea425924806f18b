"""Pre-training: the contrastive losses against their formulas and ``lightly``, the batched SSL views,
and the pre-training loop (resume, bad input, transfer)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from synclone.errors import UserError
from synclone.labels import FASHION_MNIST, LabelSpace
from synclone.models import load_model
from synclone.train.loop import CKPT
from synclone.train.pretrain import PretrainConfig, SSLTask, pretrain
from synclone.train.ssl_losses import KeyQueue, moco_loss, momentum_update, multi_positive, nt_xent
from synclone.train.ssl_views import ViewConfig, ViewParams, ViewSpec, apply_views, sample_params, ssl_views

# --- losses --------------------------------------------------------------------------------------------


def _nt_xent_direct(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """SimCLR's loss written as in the paper (Chen et al., 2020, Alg. 1): l(i, j) summed over all 2N anchors."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z1, z2]).double()]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        num = math.exp(float(z[i] @ z[p]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(num / den)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_the_papers_formula_and_lightly(t):
    from lightly.loss import NTXentLoss

    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    ours = float(nt_xent(z1, z2, t))
    assert ours == pytest.approx(_nt_xent_direct(z1, z2, t), rel=1e-5)
    assert ours == pytest.approx(float(NTXentLoss(temperature=t)(z1, z2)), rel=1e-5)
    # Identical views of orthogonal vectors: the loss is the log of the 2N - 2 equally weighted negatives
    # plus the positive at exp(1/t) -- a golden value away from any implementation.
    e = torch.eye(8)
    assert float(nt_xent(e, e, 0.5)) == pytest.approx(math.log(math.exp(2.0) + 14) - 2.0, rel=1e-6)


def test_multi_positive_with_one_positive_per_anchor_is_nt_xent():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)
    groups = torch.arange(10).repeat(2)
    assert float(multi_positive(torch.cat([z1, z2]), groups, 0.2)) == pytest.approx(float(nt_xent(z1, z2, 0.2)),
                                                                                     rel=1e-6)
    # Group ids are labels, not positions: relabelling and shuffling the rows changes nothing.
    perm = torch.randperm(20, generator=g)
    z = torch.cat([z1, z2])[perm]
    assert float(multi_positive(z, (groups * 7 + 3)[perm], 0.2)) == pytest.approx(float(nt_xent(z1, z2, 0.2)),
                                                                                  rel=1e-6)


def test_multi_positive_matches_stablerep_formula():
    """Three images per prompt: target uniform over the two other members, softmax over all j != i."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(12, 6, generator=g)
    groups = torch.arange(4).repeat_interleave(3)
    zn = F.normalize(z.double(), dim=1)
    total = 0.0
    for i in range(12):
        logits = [float(zn[i] @ zn[j]) / 0.1 for j in range(12) if j != i]
        lse = math.log(sum(math.exp(v) for v in logits))
        pos = [float(zn[i] @ zn[j]) / 0.1 - lse for j in range(12) if j != i and groups[j] == groups[i]]
        total += -sum(pos) / len(pos)
    assert float(multi_positive(z, groups, 0.1)) == pytest.approx(total / 12, rel=1e-5)
    with pytest.raises(ValueError, match="no positive"):
        multi_positive(z[:3], torch.tensor([0, 1, 1]), 0.1)


def test_moco_loss_and_queue_match_lightly_and_a_hand_written_step():
    from lightly.loss import NTXentLoss

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 8, generator=g, requires_grad=True), torch.randn(4, 8, generator=g)
    queue = KeyQueue(16, 8, seed=5)
    ref = NTXentLoss(temperature=0.2, memory_bank_size=(16, 8))
    ref.memory_bank.bank = queue.keys.clone()
    ours = moco_loss(q, k, queue.keys, 0.2)
    assert float(ours.detach()) == pytest.approx(float(ref(q, k).detach()), rel=1e-5)
    # The hand-written step: logits [q.k+, q.queue] / t, positive first.
    qn, kn = F.normalize(q.detach(), dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.keys.T], 1) / 0.2
    assert float(ours.detach()) == pytest.approx(float(-logits.log_softmax(1)[:, 0].mean()), rel=1e-5)
    # Enqueue: the oldest keys are replaced in FIFO order, like lightly's memory bank.
    before = queue.keys.clone()
    queue.enqueue(k)
    assert torch.allclose(queue.keys, ref.memory_bank.bank, atol=1e-6)
    assert torch.equal(queue.keys[4:], before[4:]) and int(queue.ptr) == 4
    for _ in range(3):
        queue.enqueue(k * 2)
    assert int(queue.ptr) == 0 and torch.allclose(queue.keys[12:], kn, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        queue.enqueue(torch.randn(3, 8))


def test_momentum_update_is_the_ema_of_parameters_and_matches_lightly():
    from lightly.models.utils import update_momentum

    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5))
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        online[1].running_mean.fill_(3.0)
    ref = copy.deepcopy(target)
    expected = [0.99 * pt + 0.01 * po for pt, po in zip(target.parameters(), online.parameters(), strict=True)]
    momentum_update(online, target, 0.99)
    update_momentum(online, ref, 0.99)
    for p, e, r in zip(target.parameters(), expected, ref.parameters(), strict=True):
        assert torch.allclose(p, e, atol=1e-7) and torch.allclose(p, r, atol=1e-7)
    assert float(target[1].running_mean.abs().max()) == 0.0  # buffers are the key encoder's own


# --- views ---------------------------------------------------------------------------------------------


def _images(n: int, c: int, side: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g)


def _params(n: int, crop=(1.0, 1.0, 0.5, 0.5), flip=False, jitter=(1.0, 1.0, 1.0, 0.0), grey=False, sigma=0.0):
    return ViewParams(torch.tensor([crop] * n), torch.tensor([flip] * n), torch.tensor([jitter] * n),
                      torch.tensor([grey] * n), torch.tensor([sigma] * n))


def test_views_are_a_function_of_key_and_position_only():
    spec = ViewSpec.resolve(ViewConfig(), (3, 32, 32))
    x = _images(8, 3, 32)
    full = ssl_views(x, spec, key=11)
    # A process holding positions 1, 3, 5, 7 of the same global batch makes the same views.
    part = ssl_views(x[1::2], spec, key=11, positions=torch.arange(1, 8, 2), total=8)
    assert torch.equal(full[1::2], part)
    assert torch.equal(full, ssl_views(x, spec, key=11))
    assert not torch.allclose(full, ssl_views(x, spec, key=12))
    assert full.shape == x.shape and float(full.min()) >= 0 and float(full.max()) <= 1


def test_view_defaults_follow_the_image_size():
    small, large = ViewSpec.resolve(ViewConfig(), (1, 28, 28)), ViewSpec.resolve(ViewConfig(), (3, 224, 224))
    assert small.crop_scale == (0.2, 1.0) and small.blur_p == 0 and small.saturation == 0 and small.grey_p == 0
    assert large.crop_scale == (0.08, 1.0) and large.blur_p == 0.5 and large.blur_kernel == 23
    p = sample_params(large, 4000, key=3)
    assert 0.45 < float(p.flip.float().mean()) < 0.55 and 0.17 < float(p.grey.float().mean()) < 0.23
    assert 0.77 < float((p.jitter[:, 0] != 1).float().mean()) < 0.83


def test_view_ops_match_torchvision():
    spec = ViewSpec.resolve(ViewConfig(blur_p=0.5), (3, 28, 28))
    x = _images(2, 3, 28, seed=4)
    assert torch.allclose(apply_views(x, _params(2), spec), x, atol=1e-5)  # identity choices
    assert torch.allclose(apply_views(x, _params(2, flip=True), spec), x.flip(-1), atol=1e-5)
    # A centred half-size crop scaled back up equals torchvision's bilinear resized crop away from its border
    # (there torchvision clamps to the crop while grid_sample reads the neighbouring pixel).
    ours = apply_views(x, _params(2, crop=(0.5, 0.5, 0.5, 0.5)), spec)
    ref = TF.resized_crop(x, 7, 7, 14, 14, [28, 28], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    assert torch.allclose(ours[..., 2:-2, 2:-2], ref[..., 2:-2, 2:-2], atol=1e-5)
    # Brightness, contrast and saturation as torchvision applies them, one after the other (torchvision's
    # luma weights are 0.2989/0.587/0.114 against PIL's 0.299: differences of ~3e-5).
    ours = apply_views(x, _params(2, jitter=(1.2, 0.7, 1.3, 0.0)), spec)
    ref = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 1.2), 0.7), 1.3)
    assert torch.allclose(ours, ref, atol=1e-4)
    ref_grey = TF.rgb_to_grayscale(x, num_output_channels=3)
    assert torch.allclose(apply_views(x, _params(2, grey=True), spec), ref_grey, atol=1e-4)
    ours = apply_views(x, _params(2, sigma=1.3), spec)
    ref = TF.gaussian_blur(x, [spec.blur_kernel] * 2, [1.3, 1.3])
    assert torch.allclose(ours, ref, atol=1e-5)
    # A hue shift keeps luma and turns a full turn back into the identity.
    shifted = apply_views(x * 0.5 + 0.25, _params(2, jitter=(1.0, 1.0, 1.0, 0.1)), spec)
    assert torch.allclose(TF.rgb_to_grayscale(shifted), TF.rgb_to_grayscale(x * 0.5 + 0.25), atol=1e-4)
    assert not torch.allclose(shifted, x * 0.5 + 0.25, atol=1e-2)


# --- the pre-training loop -------------------------------------------------------------------------------

def write_prompted(root: Path, space: LabelSpace, prompts_per_class: int, per_prompt: int, seed: int = 0) -> Path:
    """A generated-style dataset folder of 28x28 grey images with a ``prompt`` per image: images of one prompt
    share a class bar and a prompt-specific blob (what several generations of one prompt share)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    rows, iid = [], 0
    for c, slug in enumerate(space.slugs):
        (root / "train" / slug).mkdir()
        for p in range(prompts_per_class):
            cy, cx = rng.integers(6, 22, 2)
            for _ in range(per_prompt):
                a = rng.integers(0, 50, (28, 28), dtype=np.uint8)
                a[2 + 2 * c: 4 + 2 * c, 4:24] = 200
                a[cy - 3:cy + 3, cx - 3:cx + 3] = 255
                name = f"{slug}/{iid:05d}.png"
                Image.fromarray(a, mode="L").save(root / "train" / name)
                rows.append({"file_name": name, "id": f"{iid:05d}", "label": c, "class_name": space.classes[c],
                             "prompt": f"a photo of a {space.classes[c]}, variant {p}"})
                iid += 1
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "dataset.json").write_text(json.dumps({"label_space": space.to_dict()}), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    base = tmp_path_factory.mktemp("prompted")
    return {"multi": write_prompted(base / "multi", FASHION_MNIST, 3, 4),
            "single": write_prompted(base / "single", FASHION_MNIST, 6, 1, seed=1)}


def pt_cfg(out: Path, data: str, method: str = "simclr", **over) -> PretrainConfig:
    d = {"output": str(out), "threads": 1, "method": method, "model": {"arch": "synclone_cnn_tiny"},
         "data": {"real": None, "synthetic": data, "val_fraction": 0.2, "val_max": 40},
         "optim": {"steps": 8, "batch_size": 16, "warmup_steps": 2}, "ssl": {"queue_size": 64, "knn_k": 5}}
    for key, value in over.items():
        d.setdefault(key, {}).update(value) if isinstance(value, dict) else d.__setitem__(key, value)
    return PretrainConfig.model_validate(d)


def _prepared(cfg: PretrainConfig) -> SSLTask:
    from synclone.train.loop import load_sources

    task = SSLTask(cfg)
    task.prepare(load_sources(cfg, task.resolve), world=1)
    return task


def test_multipositive_batches_hold_groups_of_one_prompt(prompted):
    cfg = pt_cfg(Path("unused"), str(prompted["multi"]), "multipositive", optim={"batch_size": 12},
                 ssl={"group_size": 3})
    task = _prepared(cfg)
    prompt_of = task.groups
    seen = set()
    for step in range(4):
        idx, groups = task.items(step)
        assert len(idx) == 12 and len(groups.unique()) == 4 and torch.equal(groups[::3].repeat_interleave(3), groups)
        for g in groups.unique():
            members = idx[groups == g]
            assert len(set(prompt_of[members].tolist())) == 1  # one prompt per group
            # distinct images while the prompt has enough (the validation split took some of them)
            assert len(set(members.tolist())) == min(3, int(task.counts[prompt_of[members[0]]]))
        assert torch.equal(prompt_of[idx], groups)
        seen.update(prompt_of[idx].tolist())
        assert torch.equal(idx, task.items(step)[0])  # a pure function of the step
    assert len(seen) == 16  # 4 steps x 4 groups cycle through 16 distinct prompts before repeating


def test_pretrain_resumes_exactly_with_momentum_encoder_and_queue(prompted, tmp_path, monkeypatch):
    cfg_a = pt_cfg(tmp_path / "a", str(prompted["multi"]), "moco_v2", checkpoint_every=3, eval_every=4)
    pretrain(cfg_a, progress=False)
    state_a = torch.load(tmp_path / "a" / CKPT, map_location="cpu", weights_only=True)
    assert {"key_encoder.net.head.weight", "queue.keys", "queue.ptr"} <= set(state_a["model"])
    assert int(state_a["model"]["queue.ptr"]) == (8 * 16) % 64

    cfg_b = cfg_a.model_copy(update={"output": str(tmp_path / "b")})
    real_batch, calls = SSLTask.batch, [0]

    def crash(self, step, rank, world):
        if calls[0] == 5:
            raise KeyboardInterrupt  # killed in step 5; the last checkpoint is step 3's
        calls[0] += 1
        return real_batch(self, step, rank, world)

    monkeypatch.setattr(SSLTask, "batch", crash)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg_b, progress=False)
    monkeypatch.undo()
    assert torch.load(tmp_path / "b" / CKPT, map_location="cpu", weights_only=True)["step"] == 4
    pretrain(cfg_b, resume=True, progress=False)
    state_b = torch.load(tmp_path / "b" / CKPT, map_location="cpu", weights_only=True)
    for k, v in state_a["model"].items():
        assert torch.equal(v, state_b["model"][k]), k
    ha, hb = (json.loads((tmp_path / o / "metrics.json").read_text())["history"] for o in "ab")
    assert [(h["step"], h["loss"], h["val_acc"]) for h in ha] == [(h["step"], h["loss"], h["val_acc"]) for h in hb]


@pytest.mark.parametrize("method", ["simclr", "multipositive"])
def test_pretrain_writes_a_backbone_that_probes_and_fine_tuning_read(prompted, tmp_path, method):
    from synclone.train import TrainConfig, train
    from synclone.train.knn import KnnConfig, knn_classifier
    from synclone.train.probe import LinearProbeConfig, linear_probe

    cfg = pt_cfg(tmp_path / "pt", str(prompted["multi"]), method, ssl={"group_size": 4})
    folder = pretrain(cfg, progress=False)
    conf = json.loads((folder / "config.json").read_text())
    assert conf["training"]["backbone_only"] and conf["training"]["pretraining"]["method"] == method
    hist = json.loads((tmp_path / "pt" / "metrics.json").read_text())["history"]
    assert all(math.isfinite(h["loss"]) and 0 <= h["val_acc"] <= 1 for h in hist)
    with pytest.raises(UserError, match="without a trained classifier head.*init_head=new"):
        load_model(folder)
    data = {"train": str(prompted["multi"]), "test": str(prompted["single"]), "val_fraction": 0.25}
    probe = linear_probe(LinearProbeConfig.model_validate({
        "backbone": {"kind": "synclone", "name": str(folder)}, "data": data, "output": str(tmp_path / "lp"),
        "cache_dir": None, "heads": {"epochs": 3}}))
    assert 0 <= probe.metrics["test_top1"] <= 1
    knn = knn_classifier(KnnConfig.model_validate({
        "backbone": {"kind": "synclone", "name": str(folder)}, "data": data, "output": str(tmp_path / "knn"),
        "cache_dir": None, "knn": {"k": 3}}))
    km = load_model(knn)
    x = _images(6, 1, 28)
    assert km(x).shape == (6, 10) and torch.allclose(km(x).exp().sum(1), torch.ones(6), atol=1e-5)
    res = json.loads((knn / "results.json").read_text())["metrics"]
    assert 0 <= res["test_top1"] <= 1
    # Fine-tuning on another label space: a new head, the pre-trained backbone underneath; with the backbone
    # frozen for the whole budget only the head (and BatchNorm statistics) move.
    pets = write_prompted(tmp_path / "pets", LabelSpace.from_names(["cat", "dog"], name="pets"), 2, 3, seed=4)
    ft = {"output": str(tmp_path / "ft"), "threads": 1,
          "model": {"arch": "synclone_cnn_tiny", "init": str(folder), "init_head": "new", "freeze_steps": 4},
          "data": {"real": str(pets), "val_fraction": 0.3}, "optim": {"steps": 4, "batch_size": 8, "warmup_steps": 0}}
    out = train(TrainConfig.model_validate(ft), progress=False)
    tuned, base = load_model(tmp_path / "ft" / "model_last"), load_model(folder, allow_backbone=True)
    assert len(tuned.label_space) == 2
    tb, bb = tuned.state_dict(), base.state_dict()
    for k in bb:
        if k.startswith("net.head"):
            continue
        if "running" in k or "num_batches" in k:
            continue
        assert torch.equal(tb[k], bb[k]), k
    assert out.is_dir()
    keep = {**ft, "output": str(tmp_path / "ft2"), "model": {**ft["model"], "init_head": "keep", "freeze_steps": 0}}
    with pytest.raises(UserError, match="init_head=new"):
        train(TrainConfig.model_validate(keep), progress=False)


@pytest.mark.parametrize("image_size", [None, 28])  # read into memory, or streamed
def test_pretrain_skips_unreadable_images_keeping_the_prompt_groups(prompted, tmp_path, image_size):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prompted["multi"], data)
    bad = sorted((data / "train").rglob("*.png"))[5:7]
    for path in bad:  # a valid PNG header, the pixel data cut off
        path.write_bytes(path.read_bytes()[:60])

    def config(out: str, limit: float) -> PretrainConfig:
        d = pt_cfg(tmp_path / out, str(data), "multipositive", optim={"batch_size": 12},
                   ssl={"group_size": 3}).model_dump(mode="json")
        d["data"].update(image_size=image_size, max_unreadable=limit)
        return PretrainConfig.model_validate(d)

    cfg = config("ok", 2)
    task = SSLTask(cfg)
    from synclone.train.loop import load_sources

    task.prepare(load_sources(cfg, task.resolve), world=1)
    assert task.n_groups < len(task.groups)  # grouped by prompt, not one group per image
    if image_size is None:
        # read into memory without the two, the images still carry their own prompt's group: every image of a
        # group has that prompt's blob (the only 255 pixels) in the same place
        blobs = (task.data.images == 255).flatten(1)
        for g in task.groups.unique():
            members = blobs[task.groups == g]
            assert (members == members[0]).all()
    pretrain(cfg, progress=False)
    listed = (tmp_path / "ok" / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 2 and all(any(p.name in ln for ln in listed) for p in bad)
    with pytest.raises(UserError, match=r"2 of \d+ training images could not be read.*data.max_unreadable=0.001"):
        pretrain(config("strict", 0.001), progress=False)


def test_pretrain_refuses_bad_input_with_numbers(prompted, tmp_path):
    with pytest.raises(UserError, match=r"multipositive needs several images per prompt.*50 images and 50 distinct.*"
                                        r"method: simclr"):
        pretrain(pt_cfg(tmp_path / "a", str(prompted["single"]), "multipositive"), progress=False)
    with pytest.raises(UserError, match=r"batch_size 1 is too small for simclr"):
        pretrain(pt_cfg(tmp_path / "b", str(prompted["multi"]), optim={"batch_size": 1}), progress=False)
    with pytest.raises(UserError, match=r"batch_size 6 must be a multiple of ssl.group_size 4.*at least 8"):
        pretrain(pt_cfg(tmp_path / "c", str(prompted["multi"]), "multipositive", optim={"batch_size": 6}),
                 progress=False)
    with pytest.raises(UserError, match=r"queue_size 64 must be a multiple of optim.batch_size 24"):
        pretrain(pt_cfg(tmp_path / "d", str(prompted["multi"]), "moco_v2", optim={"batch_size": 24}), progress=False)
    with pytest.raises(UserError, match=r"batch_size 8 is smaller than the 10 classes"):
        pretrain(pt_cfg(tmp_path / "e", str(prompted["multi"]), "supervised", optim={"batch_size": 8}),
                 progress=False)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(prompted, tmp_path, monkeypatch):
    cfg = pt_cfg(tmp_path / "n", str(prompted["multi"]), "simclr", checkpoint_every=2, eval_every=100)
    real_batch = SSLTask.batch

    def poisoned(self, step, rank, world):
        b = real_batch(self, step, rank, world)
        if step == 5:
            b["x"] = b["x"] * float("nan")
        return b

    monkeypatch.setattr(SSLTask, "batch", poisoned)
    with pytest.raises(UserError, match=r"loss became nan at step 5.*last good checkpoint is .*last\.pt"):
        pretrain(cfg, progress=False)
    state = torch.load(tmp_path / "n" / CKPT, map_location="cpu", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
