"""Transfer of pre-trained encoders to a downstream task: linear probe, kNN and fine-tuning, k shots x seeds.

The measure of He et al.'s (2023, Section 5) question at small scale: each encoder (a model folder from
``synclone train --kind pretrain``, or ``null`` for a random initialisation of ``arch``) is transferred
to the downstream data with ``shots`` labelled images per class, once per seed (the seed picks the
shots, the validation images and the new head's initialisation):

- ``linear_probe``: the linear-probe head grid over frozen features (selected on a validation split as
  large as the shots, so selection does not use far more labels than the learner);
- ``knn``: the weighted kNN vote over the shots' features (no selection);
- ``finetune``: the whole network under a new head, a fixed step budget, the last model (no selection).

Every job's result is written as soon as it finishes (``jobs/<encoder>__<measure>__<shots>__<seed>.json``),
so an interrupted run continues with the missing jobs. ``results.json`` holds every job; ``table.md`` the
mean and sample std over seeds per (encoder, measure, shots); ``transfer.png`` the same as a plot.
The test set is read only to score a finished job, never to choose anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from synclone.config import StrictModel, validate, write_run_info
from synclone.errors import UserError
from synclone.util.accuracy import top1

MEASURES = ("linear_probe", "knn", "finetune")


class FinetuneSettings(StrictModel):
    """The fine-tuning budget (the supervised loop's settings; fixed steps, last model)."""

    steps: int = Field(200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    freeze_steps: int = Field(0, ge=0, description="steps with the backbone frozen at the start (head warm-up)")
    layer_decay: float | None = Field(None, gt=0, le=1)


class TransferConfig(StrictModel):
    """``kind: transfer`` in a recipe: encoders x measures x shots x seeds on one downstream dataset."""

    encoders: dict[str, str | None] = Field(description="name -> pre-trained model folder, or null for random init")
    arch: str = Field("synclone_cnn_small", description="architecture of the random-init encoder")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    measures: list[Literal["linear_probe", "knn", "finetune"]] = Field(default_factory=lambda: list(MEASURES))
    shots: list[int] = Field(default_factory=lambda: [10, 100])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    data: str = "fashion_mnist"
    test: str = "fashion_mnist:test"
    test_per_class: int | None = Field(None, ge=1)
    data_root: str | None = None
    knn_k: int = Field(20, ge=1)
    probe_epochs: int = Field(30, ge=1)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    output: str = "runs/transfer"


def run_transfer(cfg: TransferConfig, progress: bool = False) -> dict:
    """Run every job that has no result yet; write results.json, table.md and transfer.png; return the results."""
    out = Path(cfg.output)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    write_run_info(out, cfg, command="synclone.train.transfer_eval.run_transfer")
    if not cfg.encoders:
        raise UserError("transfer: give at least one encoder (name: model folder, or name: null for random init)")
    rows = []
    for name, folder in cfg.encoders.items():
        enc = Path(folder) if folder else _random_encoder(cfg, out / "random_init" / name)
        for measure in cfg.measures:
            for shots in cfg.shots:
                for seed in cfg.seeds:
                    path = out / "jobs" / f"{name}__{measure}__{shots}__{seed}.json"
                    key = {"encoder": str(enc), "measure": measure, "shots": shots, "seed": seed,
                           "settings": _settings(cfg, measure)}
                    if path.is_file():
                        rec = json.loads(path.read_text(encoding="utf-8"))
                        if rec.get("key") == key:
                            rows.append(rec["row"])
                            continue
                    top1 = _job(cfg, enc, measure, shots, seed, out / "work" / f"{name}__{measure}__{shots}__{seed}",
                                progress)
                    row = {"encoder": name, "measure": measure, "shots": shots, "seed": seed, "test_top1": top1}
                    path.write_text(json.dumps({"key": key, "row": row}, indent=2) + "\n", encoding="utf-8")
                    rows.append(row)
    summary = summarise(rows)
    result = {"rows": rows, "summary": summary, "test": cfg.test,
              "conventions": {"metric": "top-1 on the test data, fraction in [0, 1]",
                              "std": "sample standard deviation over seeds (ddof=1)",
                              "seed": "picks the shots, the validation images and the new head's initialisation"}}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "table.md").write_text(table_markdown(summary, cfg), encoding="utf-8")
    plot_transfer(summary, out / "transfer.png")
    return result


def _settings(cfg: TransferConfig, measure: str) -> dict:
    base = {"data": cfg.data, "test": cfg.test, "test_per_class": cfg.test_per_class}
    if measure == "knn":
        return {**base, "k": cfg.knn_k}
    if measure == "linear_probe":
        return {**base, "epochs": cfg.probe_epochs}
    return {**base, **cfg.finetune.model_dump(mode="json")}


def _random_encoder(cfg: TransferConfig, folder: Path) -> Path:
    """A randomly initialised encoder of ``cfg.arch`` saved as a backbone folder (the 'no pre-training' row)."""
    import torch

    from synclone.data.sources import resolve_dataset
    from synclone.models import create_classifier, save_model
    from synclone.util.seeds import mix_seed

    if (folder / "config.json").is_file():
        return folder
    ds = resolve_dataset(cfg.data, "train", cfg.data_root)
    torch.manual_seed(mix_seed(0, 0x1417))
    model = create_classifier(cfg.arch, ds.label_space, ds.image_shape, **cfg.arch_kwargs)
    save_model(model, folder, extra={"backbone_only": True, "pretraining": {"method": "none (random init)"}})
    return folder


def _job(cfg: TransferConfig, enc: Path, measure: str, shots: int, seed: int, work: Path, progress: bool) -> float:
    n_classes = _n_classes(cfg)
    data = {"train": cfg.data, "test": cfg.test, "train_per_class": shots, "seed": seed, "data_root": cfg.data_root,
            "test_per_class": cfg.test_per_class, "val_max": max(shots * n_classes, n_classes)}
    backbone = {"kind": "synclone", "name": str(enc)}
    cache = str(Path(cfg.output) / "feature_cache")
    if measure == "linear_probe":
        from synclone.train.probe import LinearProbeConfig, linear_probe

        res = linear_probe(validate(LinearProbeConfig, {"backbone": backbone, "data": data, "output": str(work),
                                                         "cache_dir": cache, "heads": {"epochs": cfg.probe_epochs}},
                                    "transfer linear probe"))
        return float(res.metrics["test_top1"])
    if measure == "knn":
        from synclone.train.knn import KnnConfig, knn_classifier

        folder = knn_classifier(validate(KnnConfig, {"backbone": backbone, "data": data, "output": str(work),
                                                      "cache_dir": cache, "knn": {"k": cfg.knn_k}}, "transfer knn"))
        return float(json.loads((folder / "results.json").read_text(encoding="utf-8"))["metrics"]["test_top1"])
    from synclone.data.sources import resolve_dataset
    from synclone.models import load_model
    from synclone.train.config import TrainConfig
    from synclone.train.fewshot import seed_config
    from synclone.train.loop import predict, train

    f = cfg.finetune
    arch = json.loads((enc / "config.json").read_text(encoding="utf-8"))["arch"]
    tcfg = validate(TrainConfig, {
        "output": str(work), "seed": seed,
        "model": {"arch": arch, "init": str(enc), "init_head": "new", "freeze_steps": f.freeze_steps},
        "data": {"real": cfg.data, "data_root": cfg.data_root, "val_max": max(shots * n_classes, n_classes)},
        "optim": {"steps": f.steps, "batch_size": f.batch_size, "lr": f.lr, "weight_decay": f.weight_decay,
                  "warmup_steps": f.warmup_steps, "layer_decay": f.layer_decay},
        # The last model is scored (no selection), so one validation at the end is enough.
        "checkpoint_every": max(f.steps // 2, 1), "eval_every": f.steps}, "transfer fine-tuning")
    scfg = seed_config(tcfg, shots, seed)  # the few-shot loop's own derivation: k real images per class, this seed
    train(scfg, resume=(Path(scfg.output) / "checkpoints").is_dir(), progress=progress)
    # Training is over: only now is the test set read, to score the last model (no selection).
    test = resolve_dataset(cfg.test, "test", cfg.data_root)
    if cfg.test_per_class is not None:
        test = test.per_class_subset(cfg.test_per_class, seed=seed)
    model = load_model(Path(scfg.output) / "model_last")
    return top1(predict(model, test), test.labels)


def _n_classes(cfg: TransferConfig) -> int:
    from synclone.data.sources import resolve_dataset

    return len(resolve_dataset(cfg.data, "train", cfg.data_root).label_space)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds per (encoder, measure, shots), in first-seen order."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["encoder"], r["measure"], r["shots"]), []).append(r["test_top1"])
    out = []
    for (enc, measure, shots), vals in groups.items():
        a = np.array(vals, dtype=np.float64)
        out.append({"encoder": enc, "measure": measure, "shots": shots, "mean": float(a.mean()),
                    "std": float(a.std(ddof=1)) if len(a) > 1 else None, "n": len(a)})
    return out


def table_markdown(summary: list[dict], cfg: TransferConfig) -> str:
    """One row per encoder, one column per (measure, shots): test top-1 mean +- std over seeds, in %."""
    cols = [(m, s) for m in cfg.measures for s in cfg.shots]
    by = {(r["encoder"], r["measure"], r["shots"]): r for r in summary}
    head = "| encoder | " + " | ".join(f"{m.replace('_', ' ')} {s}-shot" for m, s in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for enc in cfg.encoders:
        cells = []
        for m, s in cols:
            r = by.get((enc, m, s))
            if r is None:
                cells.append("")
            else:
                sd = "" if r["std"] is None else f" ± {100 * r['std']:.1f}"
                cells.append(f"{100 * r['mean']:.1f}{sd}")
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    n = max((r["n"] for r in summary), default=0)
    lines.append("")
    lines.append(f"Test top-1 (%) on '{cfg.test}', mean ± sample std over {n} seed(s).")
    return "\n".join(lines) + "\n"


def plot_transfer(summary: list[dict], path: Path) -> None:
    """Grouped bars: one panel per measure, shots on the x axis, one bar per encoder with the seed spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = list(dict.fromkeys(r["measure"] for r in summary))
    encoders = list(dict.fromkeys(r["encoder"] for r in summary))
    shots = sorted({r["shots"] for r in summary})
    if not measures:
        return
    fig, axes = plt.subplots(1, len(measures), figsize=(3.6 * len(measures) + 1.8, 3.2), squeeze=False,
                             sharey=True)
    width = 0.8 / max(1, len(encoders))
    by = {(r["encoder"], r["measure"], r["shots"]): r for r in summary}
    for ax, m in zip(axes[0], measures, strict=True):
        for i, enc in enumerate(encoders):
            xs, ys, es = [], [], []
            for j, s in enumerate(shots):
                r = by.get((enc, m, s))
                if r is not None:
                    xs.append(j + (i - (len(encoders) - 1) / 2) * width)
                    ys.append(100 * r["mean"])
                    es.append(100 * (r["std"] or 0.0))
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=enc)
        ax.set_xticks(range(len(shots)), [f"{s}-shot" for s in shots])
        ax.set_title(m.replace("_", " "))
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("test top-1 (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
