"""``curate(cfg)``: score a dataset folder through the cache, filter it, and write the curated folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from synclone.config import write_run_info
from synclone.curate.cache import FileKeys, ScorerCache
from synclone.curate.config import CurateConfig
from synclone.curate.filters import apply_filters
from synclone.curate.output import prepare_output, write_curated
from synclone.curate.refill import Refill
from synclone.curate.scorers import create_scorer
from synclone.curate.scoring import real_shot_centroids, score_records
from synclone.curate.stats import write_stats
from synclone.data.folder import read_dataset_folder
from synclone.data.readable import SKIPPED_LIST, UnreadableImages
from synclone.errors import UserError
from synclone.util.disk import expect_output
from synclone.util.executor import preflight

log = logging.getLogger(__name__)
CACHE_DIR_NAME = ".curate_cache"


def default_cache_dir(input_folder: str | Path) -> Path:
    """``<input>/.curate_cache``: beside the images it describes, gone when the dataset is deleted."""
    return Path(input_folder) / CACHE_DIR_NAME


def curate(cfg: CurateConfig) -> Path:
    """Curate ``cfg.input`` into ``cfg.output`` and return the output folder.

    Embeddings, logits and text embeddings come from the cache when present, so a re-run with other
    filter settings loads no model. ``<output>/dataset.json`` records what ran (``curation.scoring``
    says how many images were encoded and whether a model was loaded).

    With ``cfg.refill``, short classes are topped up with freshly generated images until each holds
    ``refill.target_per_class`` (see :mod:`synclone.curate.refill`); ``curation.refill`` records every round.
    """
    preflight(cfg.executor)
    source, out = Path(cfg.input), Path(cfg.output)
    records, space = read_dataset_folder(source)
    if not records:
        raise UserError(f"dataset folder '{source}' lists no images; nothing to curate")
    refill = Refill(cfg, records, space) if cfg.refill is not None else None  # checks it before any work
    filters = refill.filters if refill is not None else cfg.filters
    prepare_output(out, source, cfg.overwrite)
    expect_output(out, _output_bytes(cfg, records), "this curate run")
    scorer = create_scorer(cfg.scorer, cfg.alpha_background)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir(source)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the embedding cache '{cache_root}' ({err.strerror}); set cache_dir to a "
                        "writable folder") from None
    scorer_id = scorer.cache_id(FileKeys(cache_root))
    cache = ScorerCache(cache_root, scorer_id)
    cache.set_meta(kind=cfg.scorer.kind, model=cfg.scorer.model, pretrained=cfg.scorer.pretrained)
    encoded = 0
    centroids = None
    if filters.real_centroid.references is not None:
        centroids = real_shot_centroids(filters.real_centroid.references, space, scorer, cache, cfg.progress)

    def evaluate(recs):
        nonlocal encoded
        res = score_records(recs, space, scorer, cache, progress=cfg.progress, executor=cfg.executor)
        encoded += res.counts["encoded_now"]
        return (res, *apply_filters(res.table, res.embeddings, filters, len(res.classes), cfg.scorer.kind,
                                    centroids))

    extra = {}
    if refill is None:
        result, table, steps = evaluate(records)
    else:
        records, result, table, steps, extra["refill"] = refill.run(out, evaluate)
    counts = {**result.counts, "encoded_now": encoded}  # over every round's scoring
    # Unreadable images are dropped ("unreadable" in the all-images table) and listed; past max_unreadable, an error.
    bad = table.loc[~table["readable"].astype(bool)]
    UnreadableImages(cfg.max_unreadable, out / SKIPPED_LIST).add(
        [f"curate\t{r.path}: {r.error}" for r in bad.itertuples()], len(table), f"images of '{source}'")
    write_curated(out, cfg, records, table, space, scorer_id, result.classes, steps, counts, filters=filters,
                  extra=extra)
    if cfg.stats.enabled:
        write_stats(out / "stats", table, result.embeddings, space, cfg.stats, steps)
    write_run_info(out, cfg, command="synclone curate")
    kept = int(table["kept"].sum())
    log.info("curated %s: kept %d of %d images -> %s", source, kept, len(table), out)
    return out


def _output_bytes(cfg: CurateConfig, records: list) -> float:
    """Bytes a curate run writes, about: a metadata and an all-images row per image (~1 kB), each image again
    with ``materialize: copy`` (the mean size of up to 64 sampled files), and 5 MB of statistics and figures."""
    per_image = 1000.0
    if cfg.materialize == "copy":
        sizes = [os.path.getsize(r.path) for r in records[:: max(1, len(records) // 64)][:64] if os.path.isfile(r.path)]
        per_image += sum(sizes) / len(sizes) if sizes else 0.0
    return len(records) * per_image + 5e6
