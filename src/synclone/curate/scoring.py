"""Score every image of a dataset once (through the cache) into one table of per-image numbers.

For each image: ``p_label`` (softmax probability of its intended class), ``top1`` (the argmax class),
``margin`` (p_label minus the best other class's probability), ``class_sim`` (CLIP: cosine with its class's
zero-shot embedding), ``prompt_sim`` (CLIP: cosine with the text embedding of its own generation prompt;
NaN without a prompt), pixel statistics, and a unit-norm embedding for de-duplication and diversity.
A teacher has no text side, so its ``class_sim`` and ``prompt_sim`` are NaN.

The softmax runs over the dataset's classes (``restrict_to_dataset``, default) or over all classes of the
scorer's label space; He et al.'s 1/C rule uses that C.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from synclone.curate.cache import ScorerCache, sha1_text
from synclone.curate.scorers import Scorer, encode_files, resolve_templates, templates_key
from synclone.data.folder import ImageRecord
from synclone.data.images import STAT_NAMES
from synclone.errors import UserError
from synclone.labels import LabelSpace, get_label_space

TEXT_BATCH = 256


@dataclass
class ScoreResult:
    """One row per record (in record order) and the matching unit-norm embeddings (zeros if unreadable)."""

    table: pd.DataFrame
    embeddings: np.ndarray
    classes: tuple[str, ...]  # the classes of the softmax; C = len(classes)
    counts: dict = field(default_factory=dict)


def normalise_rows(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    return np.divide(a, n, out=np.zeros_like(a), where=n > 0).astype(np.float32)


def _map_classes(space: LabelSpace, own: LabelSpace, what: str, hint: str) -> np.ndarray:
    """Column of each dataset class in the scorer's space (by name, then slug); UserError naming what is missing."""
    cols, missing = [], []
    for name, slug in zip(space.classes, space.slugs, strict=True):
        if name in own.classes:
            cols.append(own.classes.index(name))
        elif slug in own.slugs:
            cols.append(own.slugs.index(slug))
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"dataset class(es) {shown} not in the {what} label space '{own.name}' ({own.describe()}); "
                        f"{hint}")
    return np.asarray(cols, dtype=np.int64)


def _content_keys(records: list[ImageRecord], cache: ScorerCache) -> tuple[list[str | None], dict[int, str]]:
    """sha1 of every file (from the stat index when unchanged); read errors by row."""
    keys: list[str | None] = []
    errors: dict[int, str] = {}
    for i, r in enumerate(records):
        k = cache.files.lookup(r.path)
        if k is None:
            try:
                data = r.path.read_bytes()
            except OSError as err:
                keys.append(None)
                errors[i] = f"{type(err).__name__}: {err.strerror or err}"
                continue
            k = cache.files.remember(r.path, data)
        keys.append(k)
    return keys, errors


def _encode_missing(records: list[ImageRecord], keys: list[str | None], scorer: Scorer, cache: ScorerCache,
                    progress: bool, executor=None) -> int:
    """Decode and encode the images whose content is not cached yet; one cache shard per chunk.

    With a Ray ``executor`` the chunks are encoded by Ray workers (:mod:`synclone.curate.ray_scoring`).
    """
    path_of: dict[str, str] = {}
    for r, k in zip(records, keys, strict=True):
        if k is not None:
            path_of.setdefault(k, str(r.path))
    missing = cache.images.missing(list(path_of))
    if not missing:
        return 0
    if executor is not None and executor.is_ray:
        from synclone.curate.ray_scoring import encode_missing_on_ray

        path_of = {k: str(Path(p).resolve()) for k, p in path_of.items()}
        return encode_missing_on_ray(path_of, missing, scorer.cfg, scorer.alpha_background, cache, executor,
                                     progress)
    bs = scorer.cfg.batch_size
    # A shard per chunk: an interrupted run keeps every finished chunk.
    chunk = max(bs * 8, 512)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"scoring ({scorer.kind})", unit="img")
    for start in range(0, len(missing), chunk):
        ks = missing[start : start + chunk]
        ok_keys, arrays, errors = encode_files(scorer, ks, [path_of[k] for k in ks],
                                               bar.update if bar is not None else None)
        cache.images.add(ok_keys, arrays, errors)
        if bar is not None and errors:
            bar.update(len(errors))
    if bar is not None:
        bar.close()
    return len(missing)


def _text_embeddings(texts: list[str], scorer: Scorer, cache: ScorerCache) -> dict[str, np.ndarray]:
    """Unit-norm embeddings of distinct texts, through the text cache."""
    keys = {t: sha1_text(t) for t in texts}
    missing = cache.texts.missing(list(keys.values()))
    if missing:
        by_key = {k: t for t, k in keys.items()}
        todo = [by_key[k] for k in missing]
        for s in range(0, len(todo), TEXT_BATCH):
            part = todo[s : s + TEXT_BATCH]
            cache.texts.add([keys[t] for t in part], {"embedding": scorer.encode_texts(part)})
    return {t: cache.texts.get([k], "embedding")[0] for t, k in keys.items()}


def _class_embeddings(names: list[str], scorer: Scorer, cache: ScorerCache) -> np.ndarray:
    """Zero-shot class embeddings (C, d), each class cached under (name, templates)."""
    templates = resolve_templates(scorer.cfg.templates)
    tkey = templates_key(templates)
    keys = [sha1_text(json.dumps({"class": n, "templates": tkey})) for n in names]
    missing = set(cache.classes.missing(keys))
    todo = [n for n, k in zip(names, keys, strict=True) if k in missing]
    if todo:
        w = scorer.zero_shot_weights(todo, templates)
        cache.classes.add([k for n, k in zip(names, keys, strict=True) if k in missing], {"embedding": w})
    return cache.classes.get(keys, "embedding")


def _logit_scale(scorer: Scorer, cache: ScorerCache) -> float:
    if scorer.cfg.logit_scale is not None:
        return float(scorer.cfg.logit_scale)
    if "logit_scale" not in cache.meta:
        cache.set_meta(logit_scale=scorer.logit_scale())
    return float(cache.meta["logit_scale"])


def score_records(records: list[ImageRecord], space: LabelSpace, scorer: Scorer, cache: ScorerCache,
                  progress: bool = False, executor=None) -> ScoreResult:
    """Scores of every record (see the module docstring); computes only what the cache lacks.

    ``executor`` (:class:`synclone.util.executor.ExecutorConfig`): where the missing images are encoded.
    """
    cfg = scorer.cfg
    n = len(records)
    keys, read_errors = _content_keys(records, cache)
    encoded = _encode_missing(records, keys, scorer, cache, progress, executor)
    cache.files.save()
    cache.images.compact()

    ok = np.array([k is not None and k in cache.images.index for k in keys], dtype=bool)
    errors = [read_errors.get(i) or (cache.images.errors.get(k, "not scored") if not ok[i] else None)
              for i, k in enumerate(keys)]
    ok_idx = np.nonzero(ok)[0]
    ok_keys = [keys[i] for i in ok_idx]
    labels = np.array([r.label for r in records], dtype=np.int64)

    # Which classes the softmax runs over, and where each dataset label sits among them.
    if cfg.kind == "teacher":
        own = scorer.label_space()
        what, hint = "teacher's", "score with a teacher trained on these classes, or with a CLIP scorer"
    else:
        own = get_label_space(cfg.label_space) if cfg.label_space else space
        what, hint = "scorer's", "add them to scorer.label_space or leave scorer.label_space unset"
    own_cols = _map_classes(space, own, what, hint)
    if cfg.restrict_to_dataset:
        cols, classes, label_col = own_cols, tuple(space.classes), labels
    else:
        cols, classes, label_col = np.arange(len(own)), tuple(own.classes), own_cols[labels]

    stats = np.full((n, len(STAT_NAMES)), np.nan, dtype=np.float32)
    class_sim = np.full(n, np.nan)
    prompt_sim = np.full(n, np.nan)
    p_label = np.full(n, np.nan)
    margin = np.full(n, np.nan)
    top1 = np.full(n, None, dtype=object)
    dim = 1
    emb = np.zeros((n, dim), dtype=np.float32)
    if len(ok_idx):
        raw = cache.images.get(ok_keys, "embedding")
        dim = raw.shape[1]
        emb = np.zeros((n, dim), dtype=np.float32)
        emb[ok_idx] = normalise_rows(raw)
        stats[ok_idx] = cache.images.get(ok_keys, "stats")
        if cfg.kind == "teacher":
            logits = cache.images.get(ok_keys, "logits")[:, cols].astype(np.float64)
        else:
            names = [own.classes[c] for c in cols]
            weights = _class_embeddings(names, scorer, cache)
            logits = _logit_scale(scorer, cache) * (emb[ok_idx].astype(np.float64) @ weights.T.astype(np.float64))
            class_sim[ok_idx] = np.einsum("nd,nd->n", emb[ok_idx], weights[label_col[ok_idx]])
            prompts = [records[i].prompt for i in ok_idx]
            distinct = sorted({p for p in prompts if p})
            if distinct:
                tx = _text_embeddings(distinct, scorer, cache)
                row_of = {p: j for j, p in enumerate(distinct)}
                has = np.array([p is not None for p in prompts], dtype=bool)
                which = np.array([row_of[p] for p in prompts if p is not None], dtype=np.int64)
                texts = np.stack([tx[p] for p in distinct])
                rows_with = ok_idx[has]
                prompt_sim[rows_with] = np.einsum("nd,nd->n", emb[rows_with], texts[which])
        probs = _softmax(logits)
        rows = np.arange(len(ok_idx))
        lc = label_col[ok_idx]
        p_label[ok_idx] = probs[rows, lc]
        top1[ok_idx] = [classes[j] for j in probs.argmax(axis=1)]
        if probs.shape[1] > 1:
            other = probs.copy()
            other[rows, lc] = -np.inf
            margin[ok_idx] = probs[rows, lc] - other.max(axis=1)
        else:
            margin[ok_idx] = probs[rows, lc]

    table = pd.DataFrame({
        "id": [r.id for r in records],
        "label": labels,
        "class_name": [r.class_name for r in records],
        "file_name": [r.file_name for r in records],
        "path": [str(r.path) for r in records],
        "content_key": keys,
        "readable": ok,
        "error": errors,
        "p_label": p_label,
        "top1": top1,
        "margin": margin,
        "class_sim": class_sim,
        "prompt_sim": prompt_sim,
        **{name: stats[:, j] for j, name in enumerate(STAT_NAMES)},
    })
    counts = {"images": n, "readable": int(ok.sum()), "encoded_now": encoded, "model_loaded": scorer.loaded,
              "image_batches": scorer.image_batches, "text_batches": scorer.text_batches}
    return ScoreResult(table, emb, classes, counts)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def real_shot_centroids(folder: str | Path, space: LabelSpace, scorer: Scorer, cache: ScorerCache,
                        progress: bool = False) -> np.ndarray:
    """(C, d) class centroids of the real images in ``folder`` (one sub-folder per class, by the dataset's class
    names or slugs), embedded by ``scorer`` through ``cache``; rows in the order of ``space``'s classes."""
    from synclone.curate.filters import class_centroids
    from synclone.data.folder import read_dataset_folder

    records, real_space = read_dataset_folder(folder)
    cols = _map_classes(real_space, space, "dataset's",
                        "name the real class folders by the dataset's classes (filters.real_centroid.references)")
    keys, errors = _content_keys(records, cache)
    _encode_missing(records, keys, scorer, cache, progress)
    cache.files.save()
    bad = [r.file_name for r, k in zip(records, keys, strict=True) if k is None or k not in cache.images.index]
    if bad:
        raise UserError(f"real-centroid filter: {len(bad)} image(s) of '{folder}' cannot be read (first: {bad[0]}): "
                        "remove or replace them")
    labels = cols[np.array([r.label for r in records], dtype=np.int64)]
    missing = [space.classes[c] for c in range(len(space)) if not (labels == c).any()]
    if missing:
        raise UserError(f"real-centroid filter: '{folder}' has no real image of class(es) "
                        f"{', '.join(map(repr, missing[:5]))}: add at least one per class")
    emb = normalise_rows(cache.images.get(keys, "embedding"))
    return class_centroids(emb, labels, len(space))
