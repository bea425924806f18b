"""``inspect_dataset``: a synthetic dataset against a real reference set -> a long table, CSVs and picture grids.

Output folder (``InspectConfig.output``; default ``<dataset>/inspect`` for a synclone dataset folder)::

    results.parquet / results.csv   one row per number: dataset, reference, features, class, metric, value, n,
                                    convention (class "all" = every class pooled)
    confusion.csv                   the classifier's confusion on synthetic and on real images (long format)
    worst_covered.csv               per class, the real images farthest from any synthetic one
    grid.png, grids/<class>.png     synthetic next to real, all classes and one image per class
    worst_covered.png               those real images above their nearest synthetic image
    inspect.json                    what was compared, fingerprints, settings, cache hits, timings
    config.yaml, run.json           the resolved config and provenance

Metrics per class and overall (definitions in :mod:`synclone.inspect.metrics`): ``frechet_distance``, ``kid``
(+ ``kid_std``), ``precision``, ``recall``, ``density``, ``coverage``; ``diversity_synthetic`` /
``diversity_real`` (mean pairwise feature distance) and their ratio; ``near_duplicate_rate`` (synthetic images
whose nearest synthetic neighbour is closer than the ``near_duplicate_quantile`` of the real images'
nearest-neighbour distances, measured on as many real images as there are synthetic ones, so a real set scores
about that quantile) with ``near_duplicate_rate_real``, and ``exact_duplicate_rate`` (identical pixels);
``classifiability`` (the classifier's top-1 on the synthetic images) with ``classifier_top1_real``; for a
curated folder the funnel ``funnel_generated``, ``funnel_kept``, ``funnel_dropped:<reason>``.
Ideal values for a synthetic set indistinguishable from the real one: distances 0, precision / recall /
coverage near 1, density near 1, diversity ratio near 1, duplicate rates at the real set's.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from synclone.config import StrictModel, write_run_info
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.inspect import metrics as M
from synclone.inspect.features import Extractor, FeatureCache, create_extractor
from synclone.inspect.grids import class_grid, overview_grid, worst_covered_grid
from synclone.util.files import atomic_path, write_json_atomic

COLUMNS = ("dataset", "reference", "features", "class", "metric", "value", "n", "convention")
RESULTS = "results.parquet"
ALL = "all"


class InspectConfig(StrictModel):
    """A synthetic dataset, the real set it should resemble, and the feature space they are compared in."""

    dataset: str = Field(description="dataset folder (generated, curated or class folders) or a built-in name:split")
    reference: str = Field(description="the real set: a built-in (fashion_mnist:test) or a folder, same classes")
    features: str | None = Field(None, description="feature extractor (see synclone.inspect.features)")
    classifier: str | None = Field(None, description="model folder for classifiability; default the features' "
                                                      "model when it is a classifier")
    output: str | None = None
    cache_dir: str | None = Field(None, description="feature cache (default <output>/cache)")
    data_root: str | None = None
    k: int = Field(5, ge=1, description="neighbours of the precision/recall/density/coverage balls")
    max_per_class: int = Field(1000, ge=2, description="seeded subsample per class of each set")
    kid_subsets: int = Field(100, ge=1)
    kid_subset_size: int = Field(1000, ge=2)
    near_duplicate_quantile: float = Field(0.01, gt=0, lt=1)
    worst_covered: int = Field(8, ge=0, description="worst-covered real images listed per class")
    grid_examples: int = Field(12, ge=0, description="images per side in each class's grid")
    batch_size: int = Field(256, ge=1)
    seed: int = 0


def default_output(dataset: str) -> Path:
    p = Path(dataset)
    if p.is_dir() and (p / "dataset.json").is_file():
        return p / "inspect"
    return Path("runs/inspect") / (p.name if p.is_dir() else dataset.replace(":", "_"))


def _load(spec: str, split: str, data_root: str | None) -> tuple[TensorImageSet, list[str]]:
    """An in-memory labelled set and an id per image (folder ids, or name[index] for built-ins)."""
    from synclone.data.sources import resolve_dataset

    data = resolve_dataset(spec, split=split, data_root=data_root)
    if not isinstance(data, TensorImageSet):
        raise UserError(f"'{spec}' is streamed from disk; synclone inspect reads small in-memory sets (folders of "
                        "small images or built-ins): point it at such a folder")
    path = Path(spec)
    if path.is_dir():
        from synclone.data.folder import read_dataset_folder

        records, _ = read_dataset_folder(path)  # the split the folder loader read
        skipped = set(data.extra.get("skipped", ()))
        ids = [r.id for r in records if r.id not in skipped]
    else:
        ids = [f"{data.name}[{i}]" for i in range(len(data))]
    if len(ids) != len(data):  # cannot happen with the readers above; a mismatch would mislabel every id
        raise UserError(f"'{spec}': {len(ids)} ids for {len(data)} images")
    return data, ids


def _into_space(syn: TensorImageSet, space) -> TensorImageSet:
    """``syn`` with labels in the reference's label space: the same classes, or a subset of them (a dataset
    generated for some classes only); any other difference is an error naming it."""
    if syn.label_space.classes == space.classes or not set(syn.label_space.classes) < set(space.classes):
        syn.label_space.check_aligned(space, "dataset", "reference")
        return syn
    remap = torch.tensor([space.index(c) for c in syn.label_space.classes], dtype=torch.int64)
    return TensorImageSet(syn.images, remap[syn.labels], space, syn.name, syn.source, syn.extra)


def _cap(labels: np.ndarray, classes: int, per_class: int, seed: int) -> np.ndarray:
    """Indices of a seeded subsample of at most ``per_class`` images of every class, in original order."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(classes):
        idx = np.nonzero(labels == c)[0]
        keep.append(np.sort(rng.choice(idx, per_class, replace=False)) if len(idx) > per_class else idx)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


def _funnel(spec: str) -> pd.DataFrame | None:
    """Per class: generated, kept, and dropped per reason of a curated folder (None for other sets)."""
    p = Path(spec)
    if not (p.is_dir() and (p / "dataset.json").is_file()):
        return None
    from synclone.data.folder import load_curated, read_dataset_json

    if "curation" not in read_dataset_json(p):
        return None
    records, space = load_curated(p, include_dropped=True)
    df = pd.DataFrame({"label": [r.label for r in records], "kept": [bool(r.meta.get("kept")) for r in records],
                       "reason": [None if r.meta.get("kept") else str(r.meta.get("drop_reason") or "dropped")
                                  for r in records]})
    return df


def _class_stats(fs: np.ndarray, fr: np.ndarray, cfg: InspectConfig, seed: int) -> tuple[dict, M.PRDC]:
    """Every feature-space number of one class (or of the pooled set)."""
    out: dict[str, tuple[float, int, str]] = {}
    n_s, n_r = len(fs), len(fr)
    out["frechet_distance"] = (M.frechet_distance(fr, fs), n_s, f"n_real={n_r}")
    kid, kid_std, size = M.kernel_inception_distance(fr, fs, cfg.kid_subsets, cfg.kid_subset_size, seed)
    conv = f"poly3 unbiased MMD2, {cfg.kid_subsets} subsets of {size}"
    out["kid"] = (kid, n_s, conv)
    out["kid_std"] = (kid_std, n_s, conv)
    # One pass over each set's own distances gives its k-NN radii, nearest-neighbour distances and diversity.
    rad_s, div_s = M.self_distances(fs, (1, cfg.k))
    rad_r, div_r = M.self_distances(fr, (1, cfg.k))
    p = M.prdc(fr, fs, cfg.k, real_radii=rad_r[cfg.k], fake_radii=rad_s[cfg.k])
    for name in ("precision", "recall", "density", "coverage"):
        out[name] = (getattr(p, name), n_s, f"k={cfg.k}, n_real={n_r}")
    out["diversity_synthetic"] = (div_s, n_s, "mean pairwise Euclidean distance")
    out["diversity_real"] = (div_r, n_r, "mean pairwise Euclidean distance")
    out["diversity_ratio"] = (div_s / div_r if div_r > 0 else float("nan"), n_s, "synthetic / real")
    # Near duplicates, judged against real images at the synthetic set's density: nearest-neighbour distances
    # shrink as a set grows, so the real threshold is measured on as many real images as there are synthetic.
    if n_r > n_s:
        rng = np.random.default_rng(seed)
        fr_eq = fr[np.sort(rng.choice(n_r, n_s, replace=False))]
        nn_r = M.nearest_neighbour_distances(fr_eq)
    else:
        fr_eq, nn_r = fr, rad_r[1].numpy()
    conv = f"nn distance < q{cfg.near_duplicate_quantile:g} of real nn distances (n_real={len(fr_eq)})"
    if len(fr_eq) >= 2 and n_s >= 2:
        thr = float(np.quantile(nn_r, cfg.near_duplicate_quantile))
        out["near_duplicate_rate"] = (float((rad_s[1].numpy() < thr).mean()), n_s, conv)
        out["near_duplicate_rate_real"] = (float((nn_r < thr).mean()), len(fr_eq), conv)
    return out, p


def _exact_duplicates(images: torch.Tensor) -> np.ndarray:
    """True for every image whose pixels equal an earlier image's."""
    seen: set[bytes] = set()
    out = np.zeros(len(images), dtype=bool)
    for i, im in enumerate(images):
        key = im.numpy().tobytes()
        out[i] = key in seen
        seen.add(key)
    return out


def inspect_dataset(cfg: InspectConfig, progress: bool = False) -> pd.DataFrame:
    """Compare ``cfg.dataset`` with ``cfg.reference`` per class and overall; write the files; return the table."""
    t0 = time.perf_counter()
    extractor = create_extractor(cfg.features)
    syn, syn_ids = _load(cfg.dataset, "train", cfg.data_root)
    ref, ref_ids = _load(cfg.reference, "test", cfg.data_root)
    syn = _into_space(syn, ref.label_space)
    space = ref.label_space
    classifier: Extractor | None = extractor if extractor.label_space() is not None else None
    if cfg.classifier:
        classifier = create_extractor(cfg.classifier if Path(cfg.classifier).is_dir() else f"model:{cfg.classifier}")
        if classifier.label_space() is None:
            raise UserError(f"--classifier '{cfg.classifier}' is not a classifier: give a synclone model folder")
    if classifier is not None:
        classifier.label_space().check_aligned(space, f"classifier '{classifier.name}'", "dataset")
    out = Path(cfg.output) if cfg.output else default_output(cfg.dataset)
    cache = FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else out / "cache")

    si = _cap(syn.labels.numpy(), len(space), cfg.max_per_class, cfg.seed)
    ri = _cap(ref.labels.numpy(), len(space), cfg.max_per_class, cfg.seed + 1)
    syn_c = syn.subset(torch.from_numpy(si), syn.name)
    ref_c = ref.subset(torch.from_numpy(ri), ref.name)
    arr_s = cache.get(extractor, syn_c, cfg.batch_size)
    arr_r = cache.get(extractor, ref_c, cfg.batch_size)
    fs_all, fr_all = arr_s["features"].astype(np.float64), arr_r["features"].astype(np.float64)
    logits_s = logits_r = None
    if classifier is not None:
        cs = arr_s if classifier is extractor else cache.get(classifier, syn_c, cfg.batch_size)
        cr = arr_r if classifier is extractor else cache.get(classifier, ref_c, cfg.batch_size)
        logits_s, logits_r = cs.get("logits"), cr.get("logits")
    ls, lr = syn_c.labels.numpy(), ref_c.labels.numpy()
    dup = _exact_duplicates(syn_c.images)

    base = {"dataset": Path(cfg.dataset).name if Path(cfg.dataset).is_dir() else cfg.dataset,
            "reference": cfg.reference, "features": extractor.name}
    rows: list[dict] = []

    def add(cls: str, metric: str, value: float, n: int | None, convention: str = "") -> None:
        rows.append({**base, "class": cls, "metric": metric, "value": float(value), "n": n, "convention": convention})

    worst: list[dict] = []
    groups = [(c, space.classes[c], ls == c, lr == c) for c in range(len(space))]
    groups.append((-1, ALL, np.ones(len(ls), bool), np.ones(len(lr), bool)))
    for c, name, ms, mr in groups:
        if not ms.any() or not mr.any():
            add(name, "n_synthetic", int(ms.sum()), int(ms.sum()), "no images in one of the sets")
            continue
        stats, p = _class_stats(fs_all[ms], fr_all[mr], cfg, cfg.seed + max(c, 0))
        add(name, "n_synthetic", int(ms.sum()), int(ms.sum()))
        add(name, "n_real", int(mr.sum()), int(mr.sum()))
        for metric, (v, n, conv) in stats.items():
            add(name, metric, v, n, conv)
        add(name, "exact_duplicate_rate", float(dup[ms].mean()), int(ms.sum()), "identical pixels")
        if logits_s is not None:
            add(name, "classifiability", float((logits_s[ms].argmax(1) == ls[ms]).mean()), int(ms.sum()),
                f"top-1 of {classifier.name} on synthetic images")
            add(name, "classifier_top1_real", float((logits_r[mr].argmax(1) == lr[mr]).mean()), int(mr.sum()),
                f"top-1 of {classifier.name} on real images")
        if c >= 0 and cfg.worst_covered and np.isfinite(p.real_gap).any():
            ref_idx = np.nonzero(mr)[0]
            syn_idx = np.nonzero(ms)[0]
            order = np.argsort(-np.nan_to_num(p.real_gap, nan=-np.inf), kind="stable")[: cfg.worst_covered]
            for rank, j in enumerate(order, 1):
                worst.append({"class": name, "rank": rank, "real_id": ref_ids[ri[ref_idx[j]]],
                              "real_index": int(ri[ref_idx[j]]), "gap": float(p.real_gap[j]),
                              "radius": float(p.real_radius[j]),
                              "nearest_synthetic_id": syn_ids[si[syn_idx[p.nearest_fake[j]]]],
                              "nearest_synthetic_index": int(si[syn_idx[p.nearest_fake[j]]]),
                              "_pos": (int(ref_idx[j]), int(syn_idx[p.nearest_fake[j]]))})

    funnel = _funnel(cfg.dataset)
    if funnel is not None:
        for c, name in [(c, space.classes[c]) for c in range(len(space))] + [(-1, ALL)]:
            g = funnel if c < 0 else funnel[funnel["label"] == c]
            add(name, "funnel_generated", len(g), len(g), "images the curation scored")
            add(name, "funnel_kept", int(g["kept"].sum()), len(g))
            for reason, count in g["reason"].dropna().value_counts().sort_index().items():
                add(name, f"funnel_dropped:{reason}", int(count), len(g))

    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["n"] = df["n"].astype("Int64")
    write_run_info(out, cfg)
    with atomic_path(out / RESULTS) as tmp:
        df.to_parquet(tmp, index=False)
    df.to_csv(out / "results.csv", index=False)
    _write_confusion(out, space, ls, lr, logits_s, logits_r)
    pd.DataFrame([{k: v for k, v in w.items() if k != "_pos"} for w in worst],
                 columns=["class", "rank", "real_id", "real_index", "gap", "radius", "nearest_synthetic_id",
                          "nearest_synthetic_index"]).to_csv(out / "worst_covered.csv", index=False)
    figures = _write_grids(out, space, syn_c, ref_c, worst, cfg)
    info = {"dataset": cfg.dataset, "reference": cfg.reference, "features": extractor.name,
            "extractor_id": extractor.id(), "classifier": classifier.name if classifier else None,
            "fingerprints": {"dataset": syn_c.fingerprint(), "reference": ref_c.fingerprint()},
            "images": {"dataset": len(syn), "reference": len(ref), "dataset_used": len(syn_c),
                       "reference_used": len(ref_c)},
            "cache": {"hits": cache.hits, "misses": cache.misses,
                      "forward_batches": extractor.batches + (classifier.batches if classifier and
                                                              classifier is not extractor else 0)},
            "figures": figures, "seconds": round(time.perf_counter() - t0, 2)}
    write_json_atomic(out / "inspect.json", info)
    return df


def _write_confusion(out: Path, space, ls, lr, logits_s, logits_r) -> None:
    rows = []
    for which, labels, logits in (("synthetic", ls, logits_s), ("real", lr, logits_r)):
        if logits is None:
            continue
        pred = logits.argmax(1)
        cm = np.zeros((len(space), len(space)), dtype=np.int64)
        np.add.at(cm, (labels, pred), 1)
        for t in range(len(space)):
            total = int(cm[t].sum())
            for p in range(len(space)):
                if cm[t, p]:
                    rows.append({"set": which, "true": space.classes[t], "predicted": space.classes[p],
                                 "count": int(cm[t, p]), "fraction": cm[t, p] / total})
    pd.DataFrame(rows, columns=["set", "true", "predicted", "count", "fraction"]).to_csv(out / "confusion.csv",
                                                                                         index=False)


def _write_grids(out: Path, space, syn: TensorImageSet, ref: TensorImageSet, worst: list[dict],
                 cfg: InspectConfig) -> list[dict]:
    """The PNG grids; returns [{file, caption}] for the report."""
    figures = []
    if cfg.grid_examples <= 0:
        return figures
    rng = np.random.default_rng(cfg.seed)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    rows = []
    for c, name in enumerate(space.classes):
        picks = []
        for data in (syn, ref):
            idx = np.nonzero(data.labels.numpy() == c)[0]
            idx = np.sort(rng.choice(idx, min(cfg.grid_examples, len(idx)), replace=False))
            picks.append([data.images[i] for i in idx])
        cols = max(1, (cfg.grid_examples + 1) // 2)
        class_grid(picks[0], picks[1], name, out / "grids" / f"{space.slugs[c]}.png", cols=cols, rows=2)
        rows.append((name, picks[0][:6], picks[1][:6]))
    overview_grid(rows, out / "grid.png")
    figures.append({"file": "grid.png", "caption": "Synthetic (left) next to real (right) images, one row per class."})
    by_class: dict[str, list] = {}
    for w in worst:
        by_class.setdefault(w["class"], []).append(w)
    wrows = [(name, [ref.images[w["_pos"][0]] for w in ws], [syn.images[w["_pos"][1]] for w in ws],
              [w["gap"] for w in ws]) for name, ws in by_class.items()]
    if worst_covered_grid(wrows, out / "worst_covered.png"):
        figures.append({"file": "worst_covered.png",
                        "caption": "Worst-covered real images per class (top) above their nearest synthetic image; "
                                   "the number is the distance over the real image's k-NN radius (> 1: uncovered)."})
    return figures
