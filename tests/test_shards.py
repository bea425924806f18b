"""Sharded tar datasets: `synclone shard` writes webdataset shards that hold the folder's files byte for byte,
read back (by synclone and by webdataset itself) with the same images and labels, in seeded passes that see
every image once per epoch; a shard cut short is reported by name; training reads shards like folders."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from _imagenet_standin import write_standin
from synclone.cli import main
from synclone.data.shards import ShardImageSet, iter_webdataset, parse_size
from synclone.data.sources import resolve_dataset, shard_dataset
from synclone.errors import UserError
from synclone.train import TrainConfig, train
from synclone.train.batches import ShardLocalSampler


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("standin") / "imgs", classes=3, per_class=8, size=(64, 48))


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    return shard_dataset(folder, tmp_path_factory.mktemp("sh") / "shards", shard_size="20kB")


def test_shards_round_trip_byte_identically(folder, shards):
    files = resolve_dataset(str(folder), image_size=32)
    sset = resolve_dataset(str(shards), image_size=32)
    assert isinstance(sset, ShardImageSet) and len(sset) == len(files) == 24
    meta = json.loads((shards / "shards.json").read_text())
    assert len(meta["shards"]) > 2 and sum(e["images"] for e in meta["shards"]) == 24  # 20 kB shards
    assert sset.label_space.classes == files.label_space.classes and torch.equal(sset.labels, files.labels)
    for i, p in enumerate(files.paths):
        assert sset.read_bytes(i) == p.read_bytes()
    # webdataset's own reader sees the same bytes and labels, in the written order
    samples = list(iter_webdataset(shards))
    assert [s["jpg"] for s in samples] == [p.read_bytes() for p in files.paths]
    assert [int(s["cls"]) for s in samples] == files.labels.tolist()
    assert json.loads(samples[5]["json"])["id"] == files.paths[5].relative_to(folder).as_posix()
    # decoded at a size, a shard image is the folder image (same evaluation preprocessing)
    x_s, y_s = sset.batch(torch.tensor([0, 7, 23]))
    x_f, y_f = files.batch(torch.tensor([0, 7, 23]))
    assert torch.equal(y_s, y_f) and (x_s - x_f).abs().max() <= 2 / 255  # libjpeg builds may differ by a level


def test_shard_passes_are_seeded_permutations_local_to_shards(shards):
    sset = ShardImageSet(shards, (3, 32, 32))
    s = ShardLocalSampler(sset.shard_ids, per_step=6, seed=1, source_id=0, window=2)
    n = len(sset)
    epochs = [torch.cat([s.indices(k) for k in range(e * 4, e * 4 + 4)]) for e in range(2)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))  # every image once per epoch
    assert not torch.equal(epochs[0], epochs[1])
    again = ShardLocalSampler(sset.shard_ids, per_step=6, seed=1, source_id=0, window=2)
    assert torch.equal(torch.cat([again.indices(k) for k in range(4)]), epochs[0])
    # the first images of a pass come from at most `window` shards
    first = sset.shard_ids[epochs[0][: Counter(sset.shard_ids.tolist()).most_common()[-1][1]]]
    assert len(first.unique()) <= 2


def test_cut_short_shard_is_named(shards, tmp_path):
    import shutil

    copy = tmp_path / "cut"
    shutil.copytree(shards, copy)
    victim = sorted(copy.glob("shard-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:-3000])
    with pytest.raises(UserError, match=f"shard '.*{victim.name}' is cut short"):
        resolve_dataset(str(copy), image_size=32)


def test_shard_command_and_training_on_shards(folder, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["shard", str(folder), "--output", str(out), "--shard-size", "1GB"]) == 0
    assert len(list(out.glob("shard-*.tar"))) == 1
    assert main(["shard", str(folder), "--output", str(out)]) == 2  # never overwrites
    assert "already holds shards" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a size"):
        parse_size("1 parsec")
    cfg = TrainConfig.model_validate({
        "output": str(tmp_path / "run"), "threads": 1, "model": {"arch": "synclone_cnn_tiny"},
        "data": {"real": str(out), "image_size": 24, "workers": 1},
        "optim": {"steps": 4, "batch_size": 8, "warmup_steps": 1}, "aug": {"preset": "ffcv_rn50",
                                                                            "progressive": False}})
    train(cfg, progress=False)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["train_images"] + m["data"]["val"]["images"] == 24 and m["skipped_images"] == 0
