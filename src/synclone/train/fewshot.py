"""Few-shot training: k real images per class plus synthetic data, repeated over seeds.

Each seed trains one run (``<output>/seed<s>``) through :func:`synclone.train.loop.train` with
``data.real_per_class = shots`` (without ``data.real``: the synthetic data alone, over the same seeds); with a
synthetic source the batches mix both at ``data.synthetic_ratio``
and the two losses are weighted by ``data.real_loss_weight``. The test set is read only after a
seed's training has finished, and only for the reported number: it never chooses a model.
``<output>/fewshot.json`` holds the accuracy of every seed, their mean, sample std and count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np

from synclone.config import validate
from synclone.data.imageset import TensorImageSet
from synclone.data.readable import SKIPPED_LIST, UnreadableImages, read_skips
from synclone.data.sources import resolve_dataset
from synclone.errors import UserError
from synclone.models import load_model
from synclone.train.config import TrainConfig
from synclone.train.loop import _first_diff, predict, train
from synclone.util.accuracy import top1
from synclone.util.files import write_text_atomic

RESULT = "fewshot.json"
SEED_RESULT = "fewshot_eval.json"


def seed_config(cfg: TrainConfig, shots: int | None, seed: int) -> TrainConfig:
    """The config of one few-shot run: ``cfg`` with the seed, the shot count and the mixing filled in."""
    d = cfg.model_dump(mode="json")
    d["seed"] = int(seed)
    d["output"] = str(Path(cfg.output) / f"seed{seed}")
    if cfg.data.real is None:  # a synthetic-only baseline, trained and scored over the same seeds
        return validate(TrainConfig, d, source=f"few-shot config (seed {seed})")
    # shots None: the real source already is the shots (e.g. a folder of 10 per class); use every image of it
    # that the validation split leaves, since a per-class count could exceed what the split left of a class.
    d["data"]["real_per_class"] = int(shots) if shots is not None else None
    if cfg.data.synthetic is not None:
        # A fixed share per batch: with 5 shots per class and thousands of synthetic images, concatenation
        # would show the real images in almost no batch.
        d["data"]["mix"] = "ratio"
    return validate(TrainConfig, d, source=f"few-shot config (seed {seed})")


def fewshot(cfg: TrainConfig, shots: int | None, seeds: list[int], eval_data: str = "fashion_mnist:test",
            resume: bool = True, progress: bool = False,
            select: Literal["last", "validation"] = "last") -> dict:
    """Train ``shots`` real images per class (+ ``cfg.data.synthetic``) once per seed; report test top-1.

    ``select="last"`` (default) reports the model at the end of the fixed step budget: a few-shot learner
    has no large labelled validation set, so choosing by one would use far more labels than the k shots.
    ``select="validation"`` reports the model the loop chose on its validation split instead. Either way
    the test set (``eval_data``) is read after training and never chooses anything.
    ``resume=True`` skips seeds already evaluated with the same config and continues interrupted ones.
    Writes and returns ``<cfg.output>/fewshot.json``.
    """
    if shots is not None and shots < 1:
        raise UserError(f"shots must be at least 1, got {shots}")
    if not seeds:
        raise UserError("give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be distinct, got {seeds}")
    if select not in ("last", "validation"):
        raise UserError(f"select must be 'last' or 'validation', got {select!r}")
    out = Path(cfg.output)
    test: TensorImageSet | None = None
    per_seed = []
    for seed in seeds:
        scfg = seed_config(cfg, shots, seed)
        run = Path(scfg.output)
        done = _finished(run, scfg, eval_data, select)
        if done is not None and resume:
            per_seed.append(done)
            continue
        train(scfg, resume=resume, progress=progress)
        # Training is over for this seed: from here on the test set may be read.
        if test is None:
            test = _read_test(eval_data, cfg, out)
        per_seed.append(_evaluate(run, scfg, test, eval_data, select, shots))
    accs = np.array([r["accuracy"] for r in per_seed], dtype=np.float64)
    result = {
        "shots": shots,
        "seeds": list(seeds),
        "accuracies": accs.tolist(),
        "mean": float(accs.mean()),
        "std": float(accs.std(ddof=1)) if len(accs) > 1 else None,
        "n": len(accs),
        "per_seed": per_seed,
        "conventions": {
            "metric": f"top-1 accuracy on '{eval_data}', a fraction in [0, 1]",
            "std": "sample standard deviation over seeds (ddof=1); null for a single seed",
            "model": ("the model at the end of the fixed step budget (no selection)" if select == "last"
                      else "the model chosen on the validation split held out from the training sources"),
            "test_use": "read only after each seed's training finished; used for this number, never for selection",
            "seed": "changes the real shots, the synthetic subset, the validation split, the initialisation and "
                    "the batch order",
            "real_per_class": (shots if shots is not None else "all") if cfg.data.real is not None else 0,
            "synthetic": cfg.data.synthetic,
            "mix": "real only" if cfg.data.synthetic is None else "synthetic only" if cfg.data.real is None
            else "ratio",
            "synthetic_ratio": cfg.data.synthetic_ratio if cfg.data.synthetic is not None else 0.0,
            "real_loss_weight": cfg.data.real_loss_weight,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RESULT, json.dumps(result, indent=2) + "\n")
    return result


def _read_test(eval_data: str, cfg: TrainConfig, out: Path) -> TensorImageSet:
    """The evaluation set; the images a folder reader left out are listed in ``<output>/skipped_images.txt``, and
    past ``data.max_unreadable`` of them the run stops (a largely unreadable test folder is not a smaller test)."""
    test = resolve_dataset(eval_data, "test", cfg.data.data_root)
    left_out = read_skips(test)
    UnreadableImages(cfg.data.max_unreadable, out / SKIPPED_LIST, "data.max_unreadable").add(
        [f"evaluation read\t{k}: {why}" for k, why in left_out.items()], len(test) + len(left_out),
        "evaluation images")
    return test


def _finished(run: Path, scfg: TrainConfig, eval_data: str, select: str) -> dict | None:
    """The stored evaluation of a seed when it was made with this config, test set and selection."""
    path = run / SEED_RESULT
    if not path.is_file():
        return None
    rec = json.loads(path.read_text(encoding="utf-8"))
    if rec.get("budget_key") != scfg.budget_key():
        diff = _first_diff(rec.get("budget_key", {}), scfg.budget_key())
        raise UserError(f"'{run}' holds a few-shot run made with another config ({diff}); use the same config "
                        "or another output folder")
    if rec.get("eval_data") != eval_data or rec.get("select") != select:
        return None
    return rec["result"]


def _evaluate(run: Path, scfg: TrainConfig, test: TensorImageSet, eval_data: str, select: str,
              shots: int | None) -> dict:
    folder = run / ("model_last" if select == "last" else "model")
    model = load_model(folder)
    model.label_space.check_aligned(test.label_space, "few-shot model", f"evaluation data '{eval_data}'")
    logits = predict(model, test)
    acc = top1(logits, test.labels)
    if not math.isfinite(acc):
        raise UserError(f"evaluation data '{eval_data}' is empty")
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    result = {
        "seed": scfg.seed, "accuracy": acc, "n_test": len(test), "model": str(folder), "shots": shots,
        # The shots actually trained on (size + content hash), so seeds can be checked to differ.
        "real_images": (metrics["data"].get("real") or {}).get("images", 0),
        "real_fingerprint": (metrics["data"].get("real") or {}).get("fingerprint"),
        "best_val_acc": metrics["best_val_acc"], "best_step": metrics["best_step"],
        "total_steps": metrics["total_steps"],
    }
    rec = {"budget_key": scfg.budget_key(), "eval_data": eval_data, "select": select, "result": result}
    write_text_atomic(run / SEED_RESULT, json.dumps(rec, indent=2) + "\n")
    return result
