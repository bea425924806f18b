"""Curation scoring on a Ray cluster (``executor.kind: ray``): image embeddings / logits into the same cache.

The images the cache lacks are cut into the chunks the local path uses (:func:`synclone.curate.scoring.
_encode_missing`: ``max(8 x batch_size, 512)`` images, in the same order); each chunk is one row of a Ray
Dataset. :class:`ScoreWorker`, one actor per worker, builds the scorer once (the model loads on its first
batch), decodes its chunk's files and encodes them in batches of ``scorer.batch_size`` exactly as the local
loop does, and returns the arrays; the driver adds each chunk to the cache as one shard, keyed by content
hash. So the cache after a Ray run holds the same rows as after a local run (equal bit for bit when the
workers run the same number of torch threads as the local process), and a re-filter or a new filter after
a Ray run loads no model. Text and class embeddings (CLIP) stay on the driver: a few hundred texts.

Image files are read by the workers, so the dataset must be on storage every node sees at the same path.
"""

from __future__ import annotations

import json

import numpy as np

from synclone.curate.cache import ScorerCache
from synclone.curate.config import ScorerConfig
from synclone.curate.scorers import encode_files
from synclone.errors import UserError
from synclone.util.executor import ExecutorConfig, node_name, one_line_errors, ray_session, worker_threads


def chunk_size(batch_size: int) -> int:
    """Images per cache shard, as in the local path: an interrupted run keeps every finished chunk."""
    return max(batch_size * 8, 512)


class ScoreWorker:
    """A Ray actor: one scorer per worker; each call decodes and encodes one chunk of images."""

    def __init__(self, scorer: dict, alpha_background: int, cpus: float):
        import torch

        from synclone.curate.scorers import create_scorer

        torch.set_num_threads(worker_threads(cpus))
        self.scorer = create_scorer(ScorerConfig.model_validate(scorer), alpha_background)

    def __call__(self, batch: dict) -> dict:
        chunk, keys, paths = int(batch["chunk"][0]), json.loads(batch["keys"][0]), json.loads(batch["paths"][0])
        try:
            ok_keys, arrays, errors = encode_files(self.scorer, keys, paths)
        except UserError as err:
            raise UserError(f"Ray worker on node {node_name()}: {err}") from None
        from safetensors.numpy import save

        payload = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}) if arrays else b""
        meta = json.dumps({"keys": ok_keys, "errors": errors})
        return {"chunk": np.asarray([chunk]), "payload": np.asarray([payload], dtype=object),
                "meta": np.asarray([meta], dtype=object)}


def encode_missing_on_ray(path_of: dict[str, str], missing: list[str], scorer_cfg: ScorerConfig,
                          alpha_background: int, cache: ScorerCache, executor: ExecutorConfig,
                          progress: bool) -> int:
    """Encode the ``missing`` content keys (files at ``path_of[key]``) on Ray into ``cache``; returns the count."""
    from safetensors.numpy import load

    step = chunk_size(scorer_cfg.batch_size)
    rows = [{"chunk": i, "keys": json.dumps(missing[s : s + step]),
             "paths": json.dumps([path_of[k] for k in missing[s : s + step]])}
            for i, s in enumerate(range(0, len(missing), step))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"scoring ({scorer_cfg.kind}, ray x{executor.workers})", unit="img")
    with ray_session(executor) as session, one_line_errors("curate"):
        import ray.data

        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(ScoreWorker, batch_size=1,
                            fn_constructor_kwargs={"scorer": scorer_cfg.model_dump(mode="json"),
                                                   "alpha_background": alpha_background,
                                                   "cpus": executor.cpus_per_worker},
                            **session.map_args())
        for out in ds.iter_rows():
            meta = json.loads(out["meta"])
            arrays = load(bytes(out["payload"])) if out["payload"] else {}
            cache.images.add(meta["keys"], arrays, meta["errors"])
            if bar is not None:
                bar.update(len(meta["keys"]) + len(meta["errors"]))
    if bar is not None:
        bar.close()
    return len(missing)
