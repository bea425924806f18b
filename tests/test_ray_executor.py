"""The Ray executor on a real two-node Ray cluster started in this process (``ray.cluster_utils.Cluster``).

Each node has one CPU, so two workers land on two nodes. Every test compares with the local executor:
PNG bytes and ``metadata.jsonl`` identical, curation scores and logits equal. The cluster starts once for
the module (~20 s on two cores) and is torn down after; all tests here are slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from _tiny_pipelines import file_hashes, gen_config, tiny_sd, torch_threads  # noqa: E402
from synclone.generate import GenerateConfig, generate  # noqa: E402

pytestmark = pytest.mark.slow

CLASSCOND = {"backend": "classcond", "model": "builtin:fashion_mnist", "steps": 2, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each, no dashboard; the driver connects once for the module."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _ray(**kw) -> dict:
    return {"kind": "ray", "workers": 2, "cpus_per_worker": 1, **kw}


def _classcond_cfg(out: Path, **kw) -> GenerateConfig:
    base = dict(generator=CLASSCOND, images_per_class=4, batch_size=4, seed=3, output=str(out), progress=False)
    base.update(kw)
    return GenerateConfig(**base)


def _same_dataset(a: Path, b: Path) -> None:
    ha, hb = file_hashes(a), file_hashes(b)
    assert ha and ha == hb
    assert (a / "train/metadata.jsonl").read_bytes() == (b / "train/metadata.jsonl").read_bytes()
    assert (a / "skipped.jsonl").read_bytes() == (b / "skipped.jsonl").read_bytes()


def test_classcond_on_ray_is_byte_identical_to_local(cluster, tmp_path):
    with torch_threads(1):  # a Ray worker with one CPU runs one torch thread
        local = generate(_classcond_cfg(tmp_path / "local"))
    ray_out = generate(_classcond_cfg(tmp_path / "ray", executor=_ray()))
    _same_dataset(local, ray_out)
    # One ledger per worker that got batches (a worker starting late may get none of these 10 batches).
    assert 1 <= len(list((ray_out / "ledger").glob("ledger-*.jsonl"))) <= 2
    assert not (ray_out / "ray_todo").exists()
    assert len((ray_out / "train/metadata.jsonl").read_text().splitlines()) == 40


def test_tiny_stable_diffusion_on_ray_is_byte_identical(cluster, tmp_path):
    model = tiny_sd()
    with torch_threads(1):
        local = generate(gen_config(model, tmp_path / "local"))
    ray_out = generate(gen_config(model, tmp_path / "ray", executor=_ray()))
    _same_dataset(local, ray_out)


def test_resume_across_executors(cluster, tmp_path):
    """Half made locally (a top-up of the first images), finished on Ray; and a Ray run finished locally."""
    with torch_threads(1):
        ref = generate(_classcond_cfg(tmp_path / "ref"))
        # local, interrupted: keep half the ledger rows and their files, as after a kill
        part = generate(_classcond_cfg(tmp_path / "mixed"))
    _truncate(part, keep=17)
    generate(_classcond_cfg(tmp_path / "mixed", executor=_ray()))
    _same_dataset(ref, part)

    back = generate(_classcond_cfg(tmp_path / "back", executor=_ray()))
    _truncate(back, keep=9)
    with torch_threads(1):
        generate(_classcond_cfg(tmp_path / "back"))
    _same_dataset(ref, back)


def _truncate(out: Path, keep: int) -> None:
    """Forget all but the first ``keep`` images: their ledger rows and files, and the final metadata."""
    rows = []
    for ledger in sorted((out / "ledger").glob("ledger-*.jsonl")):
        rows += [json.loads(x) for x in ledger.read_text().splitlines()]
        ledger.unlink()
    rows.sort(key=lambda r: r["id"])
    for r in rows[keep:]:
        (out / "train" / r["file_name"]).unlink()
    (out / "ledger" / "ledger-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:keep]))
    (out / "train/metadata.jsonl").unlink()


def _worker_pids(name: str) -> list[int]:
    """Processes of Ray actors running ``name`` (Ray sets their title to ``ray::...``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if cmd.startswith("ray::") and name in cmd:
                pids.append(int(d.name))
    return pids


def test_worker_killed_mid_run_gives_identical_dataset(cluster, tmp_path):
    cfg = dict(images_per_class=12, batch_size=4)
    with torch_threads(1):
        ref = generate(_classcond_cfg(tmp_path / "ref", **cfg))
    out = tmp_path / "ray"
    killed: list[int] = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            ledgers = list((out / "ledger").glob("ledger-*.jsonl")) if (out / "ledger").is_dir() else []
            if sum(len(p.read_bytes().splitlines()) for p in ledgers) >= 12:
                pids = _worker_pids("GenerateWorker")
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    generate(_classcond_cfg(out, executor=_ray(), **cfg))
    t.join()
    assert killed, "no worker was killed: the run ended first"
    _same_dataset(ref, out)


def test_driver_kill9_then_rerun_resumes(cluster, tmp_path):
    """A driver process (own Ray connection) killed with SIGKILL mid-run; running it again finishes the dataset."""
    cfg = dict(images_per_class=12, batch_size=4)
    with torch_threads(1):
        ref = generate(_classcond_cfg(tmp_path / "ref", **cfg))
    out = tmp_path / "ray"
    conf = tmp_path / "gen.yaml"
    conf.write_text(json.dumps({**_classcond_cfg(out, **cfg).model_dump(mode="json"),
                                "executor": _ray(address=cluster.address)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "synclone.cli", "generate", str(conf)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    made = 0
    while time.time() < deadline and proc.poll() is None:
        ledgers = list((out / "ledger").glob("ledger-*.jsonl")) if (out / "ledger").is_dir() else []
        made = sum(len(p.read_bytes().splitlines()) for p in ledgers)
        if made >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert made >= 8 and proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "train/metadata.jsonl").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    _same_dataset(ref, out)


def test_too_many_workers_is_refused_with_numbers(cluster, tmp_path):
    from synclone.errors import UserError

    with pytest.raises(UserError, match=r"executor.workers=3 needs 3 CPU\(s\).*has 2 CPU\(s\).*workers=2"):
        generate(_classcond_cfg(tmp_path / "x", executor=_ray(workers=3)))


# --- curation scoring ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["teacher", "openclip"])
def test_curation_scores_on_ray_equal_local_and_fill_the_same_cache(cluster, tmp_path, kind, monkeypatch):
    import numpy as np
    import pandas as pd

    from _tiny_clip import fashion_mnist_mixture, shared_openclip, shared_teacher
    from synclone.curate import CurateConfig, curate
    from synclone.curate import scorers as scorers_mod

    dataset, _ = fashion_mnist_mixture(tmp_path / "generated")
    scorer = {"kind": "teacher", "model": str(shared_teacher())} if kind == "teacher" else \
        {"kind": "openclip", "model": str(shared_openclip()), "templates": "simple"}

    def cfg(name, **kw):
        return CurateConfig.model_validate({"input": str(dataset), "output": str(tmp_path / name), "progress": False,
                                            "cache_dir": str(tmp_path / f"cache-{name}"), "scorer": scorer,
                                            "stats": {"enabled": False}, **kw})

    with torch_threads(1):
        local = pd.read_parquet(curate(cfg("local")) / "curation.parquet")
        ray_out = curate(cfg("ray", executor=_ray()))
    remote = pd.read_parquet(ray_out / "curation.parquet")
    info = json.loads((ray_out / "dataset.json").read_text())["curation"]["scoring"]
    assert info["encoded_now"] == len(remote) == len(local)
    cols = ["p_label", "margin", "class_sim", "prompt_sim", "mean", "std"]
    cols = [c for c in cols if c in local]
    # Same chunks, same batches, one torch thread on both sides: the same floats.
    np.testing.assert_array_equal(local[cols].to_numpy(), remote[cols].to_numpy())
    assert list(local["kept"]) == list(remote["kept"])

    # The Ray run filled the cache: a re-filter (here on the local executor) loads no model.
    def boom(*_a, **_k):
        raise AssertionError("a model was used although everything is cached")

    for c in scorers_mod.SCORERS.values():
        monkeypatch.setattr(c, "_encode_images", boom)
    again = curate(cfg("ray", overwrite=True, filters={"threshold": {"p_label": 0.5}}))
    assert json.loads((again / "dataset.json").read_text())["curation"]["scoring"]["encoded_now"] == 0


# --- evaluation logits -------------------------------------------------------------------------------------


def test_evaluation_logits_on_ray_equal_local_in_the_same_cache(cluster, tmp_path):
    """Through ``evaluate`` (in-memory sets: Fashion-MNIST in 4 batches, a small folder), then a set streamed
    from files (:class:`FileImageSet`, what ImageNet-sized folders become) through the context directly."""
    import pandas as pd
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from synclone.data.fashion_mnist import load_fashion_mnist
    from synclone.evaluate import EvaluateConfig, evaluate
    from synclone.labels import FASHION_MNIST
    from synclone.models import create_classifier, save_model

    models = {}
    for seed in range(2):
        torch.manual_seed(seed)
        m = create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28), [0.286], [0.353])
        models[f"m{seed}"] = str(save_model(m, tmp_path / f"m{seed}"))
    test = load_fashion_mnist("test")
    shifted = tmp_path / "shifted"
    for i in range(70):
        folder = shifted / FASHION_MNIST.slugs[int(test.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - test.images[i, 0].numpy()).save(folder / f"{i}.png")

    def cfg(name, probes=("clean", "calibration", "shift"), **kw):
        settings = {"clean": {}, "calibration": {}, "shift": {"datasets": [str(shifted)]}}
        return EvaluateConfig(output=str(tmp_path / name), models=models, max_images=1000, batch_size=256,
                              probes={p: settings[p] for p in probes}, **kw)

    with torch_threads(1):
        local = evaluate(cfg("local"), progress=False)
    remote = evaluate(cfg("ray", executor=_ray()), progress=False)
    assert json.loads((tmp_path / "ray/timings.json").read_text())["forward_passes"] == 4
    pd.testing.assert_frame_equal(local, remote)
    a = {p.name: load_file(str(p))["logits"] for p in (tmp_path / "local/cache/logits").glob("*.safetensors")}
    b = {p.name: load_file(str(p))["logits"] for p in (tmp_path / "ray/cache/logits").glob("*.safetensors")}
    assert len(a) == 4 and a.keys() == b.keys()  # same cache keys: 2 models x (clean, shifted)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)  # same batches, one thread: the same floats
    # A new probe after the Ray run reads the cache: no forward pass.
    evaluate(cfg("ray", probes=("calibration", "shift"), executor=_ray()), progress=False)
    assert json.loads((tmp_path / "ray/timings.json").read_text())["forward_passes"] == 0

    from synclone.data.streaming import FileImageSet
    from synclone.evaluate.runner import load_entry
    from synclone.probes.base import EvalContext

    paths = sorted(shifted.glob("*/*.png"))
    labels = [FASHION_MNIST.slugs.index(p.parent.name) for p in paths]
    files = FileImageSet(paths, labels, FASHION_MNIST, "shifted-files", input_size=(1, 28, 28))
    entries = {"m0": load_entry("m0", models["m0"])}
    with torch_threads(1):
        here = EvalContext(entries, files, tmp_path / "s-local", batch_size=32, progress=False).logits("m0", files)
    there = EvalContext(entries, files, tmp_path / "s-ray", batch_size=32, progress=False,
                        executor=EvaluateConfig(executor=_ray()).executor).logits("m0", files)
    assert here.shape == (70, 10)
    torch.testing.assert_close(here, there, rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "s-local/cache/logits").iterdir()] == \
        [p.name for p in (tmp_path / "s-ray/cache/logits").iterdir()]


def test_worker_that_cannot_load_the_model_fails_in_one_line_naming_the_node(cluster, tmp_path):
    """The model folder is readable where the driver runs but not where the workers run (here: it is gone)."""
    import torch

    from synclone.data.imageset import TensorImageSet
    from synclone.errors import UserError
    from synclone.evaluate import EvaluateConfig
    from synclone.labels import FASHION_MNIST
    from synclone.models import create_classifier
    from synclone.probes.base import EvalContext, ModelEntry

    module = create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28), [0.286], [0.353])
    entry = ModelEntry("m", tmp_path / "not-on-this-node", module, "0" * 16)
    data = TensorImageSet(torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.zeros(8, dtype=torch.long),
                          FASHION_MNIST, "zeros")
    ctx = EvalContext({"m": entry}, data, tmp_path / "e", batch_size=4, progress=False,
                      executor=EvaluateConfig(executor=_ray()).executor)
    t0 = time.time()
    with pytest.raises(UserError) as err:
        ctx.logits("m", data)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("Ray worker on node ") and "not-on-this-node" in msg, msg
    assert time.time() - t0 < 90
