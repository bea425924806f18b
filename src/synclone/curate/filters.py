"""Filters over scored images. Each is a pure function of arrays that names why it drops an image.

A filter sees only the images still kept (``active``) and returns, per image, a drop reason or None.
:func:`apply_filters` runs them in the configured order, so each image's ``drop_reason`` names the first
filter that removed it, and writes ``kept``, ``drop_reason`` and ``dup_of`` into the table.

Reasons: ``unreadable``; ``degenerate:nan|black|constant``; ``threshold:<score>``; ``quantile:<score>``;
``duplicate`` (with ``dup_of`` = id of the kept near-copy); ``he:below_chance``, ``he:not_top_k`` and
``he:not_sampled`` (``select: random``); ``real_centroid`` (the nearest real-shot centroid is another class's);
``keep_k``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from synclone.curate.config import FiltersConfig
from synclone.data.images import STAT_NAMES
from synclone.errors import UserError
from synclone.util.seeds import derive_seed

_NAN, _MAX, _STD = STAT_NAMES.index("px_nan"), STAT_NAMES.index("px_max"), STAT_NAMES.index("px_std")


def _reasons(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


def _stable_rank_order(values: np.ndarray, ids: np.ndarray | None, idx: np.ndarray) -> np.ndarray:
    """``idx`` sorted best first: value descending (NaN last), ties by id (or by position)."""
    v = values[idx]
    v = np.where(np.isnan(v), -np.inf, v)
    tie = ids[idx] if ids is not None else idx
    return idx[np.lexsort((tie, -v))]


def degenerate_reasons(stats: np.ndarray, active: np.ndarray, black_max: float, min_std: float) -> np.ndarray:
    """NaN pixels in the source, all-black (max grey level <= ``black_max``), or near-constant (std < ``min_std``)."""
    out = _reasons(len(stats))
    nan = active & (stats[:, _NAN] > 0)
    black = active & ~nan & (stats[:, _MAX] <= black_max)
    const = active & ~nan & ~black & (stats[:, _STD] < min_std)
    out[nan], out[black], out[const] = "degenerate:nan", "degenerate:black", "degenerate:constant"
    return out


def threshold_reasons(scores: dict[str, np.ndarray], minimums: dict[str, float], active: np.ndarray) -> np.ndarray:
    """Drop an image whose score is below its minimum (a missing score, NaN, fails too)."""
    out = _reasons(len(active))
    for name, lo in minimums.items():
        v = scores[name]
        fail = active & (out == None) & ~(v >= lo)  # noqa: E711  (elementwise test on an object array)
        out[fail] = f"threshold:{name}"
    return out


def quantile_reasons(values: np.ndarray, labels: np.ndarray, q: float, active: np.ndarray, score: str) -> np.ndarray:
    """Per class, drop the kept images whose value is below the class's ``q``-quantile (numpy's linear rule)."""
    out = _reasons(len(values))
    for c in np.unique(labels[active]):
        idx = np.nonzero(active & (labels == c))[0]
        v = values[idx]
        finite = np.isfinite(v)
        if not finite.any():
            out[idx] = f"quantile:{score}"
            continue
        cut = np.quantile(v[finite], q)
        out[idx[~finite | (v < cut)]] = f"quantile:{score}"
    return out


def top_k_reasons(values: np.ndarray, labels: np.ndarray, k: int, active: np.ndarray, reason: str,
                  ids: np.ndarray | None = None) -> np.ndarray:
    """Per class, keep the ``k`` best kept images by value (ties by id); drop the rest with ``reason``."""
    out = _reasons(len(values))
    for c in np.unique(labels[active]):
        idx = _stable_rank_order(values, ids, np.nonzero(active & (labels == c))[0])
        out[idx[k:]] = reason
    return out


def random_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """Each image's random sort key, ``derive_seed(seed, "he-random", id)``: a random k-subset of a class is its
    k smallest keys, so an image's draw depends only on (seed, its id), never on the other images or their order."""
    return np.array([derive_seed(seed, "he-random", str(i)) for i in ids], dtype=np.uint64)


def random_k_reasons(labels: np.ndarray, k: int, active: np.ndarray, reason: str, ids: np.ndarray,
                     seed: int) -> np.ndarray:
    """Per class, keep ``k`` of the active images at random (the ``k`` smallest :func:`random_keys`)."""
    out = _reasons(len(labels))
    keys = random_keys(ids, seed)
    for c in np.unique(labels[active]):
        idx = np.nonzero(active & (labels == c))[0]
        idx = idx[np.argsort(keys[idx], kind="stable")]
        out[idx[k:]] = reason
    return out


def he_rule_reasons(p_label: np.ndarray, labels: np.ndarray, num_classes: int, k: int | None,
                    active: np.ndarray, ids: np.ndarray | None = None, select: str = "top",
                    seed: int = 0) -> np.ndarray:
    """He et al. (2023), "Is synthetic data from generative models ready for image recognition?", Sec. 3.1:
    keep an image when the zero-shot probability of its label exceeds 1/C, then ``k`` per class of those: the
    top ``k`` by it (``select="top"``) or ``k`` at random (``"random"``, seeded by ``seed`` and the ids).
    """
    if num_classes < 1:
        raise UserError("He et al.'s rule needs at least one class")
    out = _reasons(len(p_label))
    below = active & ~(p_label > 1.0 / num_classes)
    out[below] = "he:below_chance"
    if k is not None:
        rest = active & ~below
        if select == "random":
            keys = ids if ids is not None else np.arange(len(p_label))
            top = random_k_reasons(labels, k, rest, "he:not_sampled", keys, seed)
        else:
            top = top_k_reasons(p_label, labels, k, rest, "he:not_top_k", ids)
        out[rest] = top[rest]
    return out


def class_centroids(emb: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, d) unit-norm class centroids: the mean of each class's unit-norm rows of ``emb``, normalised again."""
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    out = np.zeros((num_classes, emb.shape[1]), dtype=np.float64)
    for c in range(num_classes):
        rows = unit[labels == c]
        if len(rows) == 0:
            raise UserError(f"real-centroid filter: class {c} has no real image to build its centroid from")
        m = rows.astype(np.float64).mean(axis=0)
        out[c] = m / max(np.linalg.norm(m), 1e-12)
    return out


def real_centroid_reasons(emb: np.ndarray, labels: np.ndarray, centroids: np.ndarray,
                          active: np.ndarray) -> np.ndarray:
    """He et al. (2023), Sec. 3.2: drop an image whose nearest real-shot class centroid (cosine of its unit-norm
    embedding with each unit-norm centroid; ties to the lower class index) is not its own class."""
    out = _reasons(len(labels))
    if not active.any():
        return out
    sims = emb[active].astype(np.float64) @ centroids.T
    nearest = sims.argmax(axis=1)
    idx = np.nonzero(active)[0]
    out[idx[nearest != labels[active]]] = "real_centroid"
    return out


def near_duplicate_reasons(emb: np.ndarray, labels: np.ndarray, tau: float, active: np.ndarray,
                           prefer: np.ndarray | None = None, ids: np.ndarray | None = None,
                           block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Greedy near-duplicate removal within each class.

    Images are visited best first (``prefer`` descending, ties by id); an image is dropped when its cosine
    similarity with an already kept image of its class is >= ``tau``, and ``dup_of`` gets the index of the
    most similar such kept image. ``emb`` rows must be unit-norm. Returns (reasons, dup_of index or -1).
    """
    out = _reasons(len(labels))
    dup_of = np.full(len(labels), -1, dtype=np.int64)
    order_values = prefer if prefer is not None else np.zeros(len(labels))
    for c in np.unique(labels[active]):
        idx = _stable_rank_order(order_values, ids, np.nonzero(active & (labels == c))[0])
        e = emb[idx].astype(np.float32)
        keep = np.zeros(len(idx), dtype=bool)
        for s in range(0, len(idx), block):
            stop = min(s + block, len(idx))
            sims = e[s:stop] @ e[:stop].T  # each row only needs the images visited before it
            for i in range(s, stop):
                row = sims[i - s, :i]
                cand = np.nonzero((row >= tau) & keep[:i])[0]
                if len(cand):
                    j = cand[np.argmax(row[cand])]
                    out[idx[i]] = "duplicate"
                    dup_of[idx[i]] = idx[j]
                else:
                    keep[i] = True
    return out, dup_of


def apply_filters(table: pd.DataFrame, embeddings: np.ndarray, cfg: FiltersConfig, num_classes: int,
                  scorer_kind: str = "", centroids: np.ndarray | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Run the filters of ``cfg`` in ``cfg.order``; return the table with kept / drop_reason / dup_of, and a log.

    The log has one entry per filter that ran: its name, settings, and how many images it dropped.
    ``centroids``: the real shots' class centroids (C, d) in the embeddings' space, for ``real_centroid``.
    """
    t = table.copy()
    n = len(t)
    labels = t["label"].to_numpy()
    ids = t["id"].to_numpy().astype(str)
    scores = {s: t[s].to_numpy(dtype=np.float64) for s in ("p_label", "margin", "class_sim", "prompt_sim")}
    stats = t[list(STAT_NAMES)].to_numpy(dtype=np.float64)
    kept = t["readable"].to_numpy(dtype=bool).copy()
    _check_scores_available(cfg, scores, kept, scorer_kind)

    reason = _reasons(n)
    reason[~kept] = "unreadable"
    dup_of = np.full(n, None, dtype=object)
    log = [{"filter": "unreadable", "dropped": int((~kept).sum())}]

    for name in cfg.order:
        step: dict | None = None
        r: np.ndarray | None = None
        if name == "degenerate" and cfg.degenerate.enabled:
            r = degenerate_reasons(stats, kept, cfg.degenerate.black_max, cfg.degenerate.min_std)
            step = cfg.degenerate.model_dump()
        elif name == "threshold":
            mins = {k: v for k, v in cfg.threshold.model_dump().items() if v is not None}
            if mins:
                r, step = threshold_reasons(scores, mins, kept), dict(mins)
        elif name == "quantile" and cfg.quantile.score is not None:
            q = cfg.quantile
            r, step = quantile_reasons(scores[q.score], labels, q.q, kept, q.score), q.model_dump()
        elif name == "real_centroid" and cfg.real_centroid.references is not None:
            if centroids is None:
                raise UserError("filters.real_centroid.references is set but no real-shot centroids were computed")
            r = real_centroid_reasons(embeddings, labels, centroids, kept)
            step = {**cfg.real_centroid.model_dump(), "classes": int(len(centroids))}
        elif name == "dedup" and cfg.dedup.enabled:
            d = cfg.dedup
            prefer = None if d.prefer == "id" else scores[d.prefer]
            r, dup_idx = near_duplicate_reasons(embeddings, labels, d.tau, kept, prefer, ids)
            hit = dup_idx >= 0
            dup_of[hit] = ids[dup_idx[hit]]
            step = d.model_dump()
        elif name == "he" and cfg.he.enabled:
            r = he_rule_reasons(scores["p_label"], labels, num_classes, cfg.he.k, kept, ids, cfg.he.select,
                                cfg.he.seed)
            step = {**cfg.he.model_dump(), "num_classes": num_classes, "chance": 1.0 / num_classes}
        elif name == "keep_k" and cfg.keep_k.k is not None:
            kk = cfg.keep_k
            r, step = top_k_reasons(scores[kk.by], labels, kk.k, kept, "keep_k", ids), kk.model_dump()
        if r is None:
            continue
        drop = kept & (r != None)  # noqa: E711
        reason[drop] = r[drop]
        kept &= ~drop
        log.append({"filter": name, **(step or {}), "dropped": int(drop.sum()), "kept_after": int(kept.sum())})

    t["kept"] = kept
    t["drop_reason"] = reason
    t["dup_of"] = dup_of
    return t, log


def _check_scores_available(cfg: FiltersConfig, scores: dict[str, np.ndarray], readable: np.ndarray,
                            scorer_kind: str) -> None:
    """A filter on a score the scorer cannot give (a teacher's prompt_sim) is a config error, not 'drop all'."""
    wanted = {k for k, v in cfg.threshold.model_dump().items() if v is not None}
    if cfg.quantile.score:
        wanted.add(cfg.quantile.score)
    if cfg.dedup.enabled and cfg.dedup.prefer != "id":
        wanted.add(cfg.dedup.prefer)
    if cfg.keep_k.k is not None:
        wanted.add(cfg.keep_k.by)
    for s in sorted(wanted):
        v = scores[s][readable]
        if len(v) and not np.isfinite(v).any():
            why = (f"the '{scorer_kind}' scorer has no text side" if scorer_kind == "teacher" and s.endswith("_sim")
                   else "no image has it (prompt_sim needs a 'prompt' in the metadata)" if s == "prompt_sim"
                   else "no readable image has it")
            raise UserError(f"a filter uses score '{s}' but {why}; use p_label or margin instead")
