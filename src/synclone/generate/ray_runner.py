"""Generation on a Ray cluster (``executor.kind: ray``): the same dataset folder, byte for byte, as a local run.

How a run goes:

1. the driver (this process) validates the config, writes the plan and ``dataset.json`` exactly as
   :func:`synclone.generate.api.generate` does, and reads the ledgers to find the images already made
   (by any executor: a dataset started locally is finished on Ray, and the other way round);
2. the jobs still to make are streamed into ``ray_todo/part-*.jsonl`` in the output folder, so the
   driver never holds the plan (its memory stays flat as the plan grows) and Ray reads them as a
   Dataset of text rows, one block per part file;
3. ``map_batches`` runs :class:`GenerateWorker`, an actor per worker (``concurrency=workers``,
   ``num_gpus=gpus_per_worker``) that loads the pipeline once and, per batch of ``batch_size`` jobs,
   makes the images with the local code (:func:`synclone.generate.runner.run_shard`: one seeded
   generator per image, batches padded to ``batch_size``, safety retries) and writes them to the
   output folder with its own ledger (``ledger/ledger-<random>.jsonl``). Each batch is on disk,
   fsync'd, before the actor reports it done;
4. the driver assembles ``train/metadata.jsonl`` from every ledger (:func:`synclone.generate.writer.finalize`).

The output folder must be on storage every node sees at the same path (NFS, Lustre, a mounted bucket).
Faults: Ray restarts a dead worker and retries its batch (``executor.retries``); the retried images
get the same bytes and the duplicate ledger rows collapse in ``finalize``. A killed driver leaves
every finished image and ledger line on disk; running the same command again resumes.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from pathlib import Path

from synclone.config import write_run_info
from synclone.errors import UserError
from synclone.generate.config import GenerateConfig, GeneratorConfig
from synclone.generate.job import GenerationRun, check_same_generator
from synclone.generate.plan import Job, read_plan
from synclone.generate.writer import DATASET_JSON, DatasetWriter, done_ids, finalize, read_dataset_json
from synclone.util.executor import absolute, node_name, one_line_errors, preflight, ray_session, worker_threads
from synclone.util.files import write_json_atomic

TODO_DIR = "ray_todo"
# Part files per worker: enough blocks to balance the workers and to keep a retry small.
PARTS_PER_WORKER = 8
MAX_BATCHES_PER_PART = 64


class GenerateWorker:
    """A Ray actor: loads the generator once, then makes and writes one batch of jobs per call."""

    def __init__(self, generator: dict, labels: dict, out: str, row_base: dict, batch_size: int, cpus: float,
                 device: str):
        import torch

        from synclone.generate.backends import create_backend
        from synclone.labels import LabelSpace

        torch.set_num_threads(worker_threads(cpus))
        cfg = GeneratorConfig.model_validate(generator)
        device = cfg.device if cfg.device not in ("auto",) else device
        try:
            self.backend = create_backend(cfg, device)
            space = LabelSpace.from_dict(labels)
            self.backend.check_labels(space)  # as the driver did: sets up the generator's own label mapping
            self.backend.references(space)
            self.backend.load()
        except Exception as err:  # noqa: BLE001 - reported as one line naming the node
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"Ray worker on node {node_name()} cannot load the generator '{cfg.model}': {first}; "
                            f"make the model available on every node") from None
        self.out = Path(out)
        self.row_base = row_base
        self.batch_size = batch_size
        self.safety_retries = cfg.safety_retries
        # Its own ledger: a random rank, so workers on any node (and restarts) never share a file.
        self.rank = 10**6 + uuid.uuid4().int % (9 * 10**9)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from synclone.generate.runner import run_shard

        jobs = [Job.from_json(line) for line in batch["text"]]
        writer = DatasetWriter(self.out, self.rank, self.row_base)
        try:
            run_shard(jobs, self.backend, writer, self.batch_size, self.safety_retries)
        finally:
            writer.close()  # the batch is on disk before Ray hears it is done
        return {"id": np.asarray([j.id for j in jobs], dtype=np.int64)}


def write_todo(out: Path, plan_path: Path, done: bytearray, batch_size: int, workers: int) -> tuple[list[Path], int]:
    """Stream the jobs not made yet into part files of whole batches; returns the files and the job count."""
    todo = out / TODO_DIR
    shutil.rmtree(todo, ignore_errors=True)
    n = sum(1 for j in read_plan(plan_path) if not done[j.id])
    if n == 0:
        return [], 0
    todo.mkdir(parents=True)
    batches = -(-n // batch_size)
    per_part = batch_size * max(1, min(MAX_BATCHES_PER_PART, batches // (workers * PARTS_PER_WORKER)))
    files: list[Path] = []
    f = None
    count = 0
    try:
        for job in read_plan(plan_path):
            if done[job.id]:
                continue
            if count % per_part == 0:
                if f is not None:
                    f.close()
                files.append(todo / f"part-{len(files):06d}.jsonl")
                f = open(files[-1], "w", encoding="utf-8")  # noqa: SIM115 - closed when the part is full
            f.write(job.to_json() + "\n")
            count += 1
    finally:
        if f is not None:
            f.close()
    return files, count


def generate_on_ray(cfg: GenerateConfig) -> Path:
    """:func:`synclone.generate.api.generate` with the images made by Ray workers (``cfg.executor``)."""
    preflight(cfg.executor)  # a wrong address fails in seconds, before the model is loaded
    cfg = cfg.model_copy(update={"output": absolute(cfg.output)})
    run = GenerationRun(cfg, "cpu")  # validates everything here, before any worker starts
    info = run.existing()
    if info is None:
        summary, prompt_info = run.write_plan()
        run.backend.load()
        write_json_atomic(run.out / DATASET_JSON, run.dataset_info(summary, prompt_info))
    else:
        run.ensure_plan(info)
        run.backend.load()
    info = read_dataset_json(run.out)
    check_same_generator(info["generator"], run.backend.describe(), run.out)
    del run.backend  # the driver needs no model while the workers run
    n_jobs = int(info["plan"]["jobs"])
    id_end = int(info["plan"].get("id_end", n_jobs))
    done, n_done = done_ids(run.out, id_end, cfg.resume_verify)
    row_base = {k: info["generator"][k] for k in ("backend", "generator", "generator_revision", "scheduler", "steps",
                                                    "guidance_scale", "height", "width")}
    row_base["batch_size"] = cfg.batch_size
    ex = cfg.executor
    files, n_todo = write_todo(run.out, run.plan_path, done, cfg.batch_size, ex.workers)
    del done
    if n_todo:
        with ray_session(ex) as session, one_line_errors("generate"):
            import ray.data

            ds = ray.data.read_text([str(p) for p in files], num_cpus=0)  # reading costs no worker slot
            ds = ds.map_batches(
                GenerateWorker,
                batch_size=cfg.batch_size,
                fn_constructor_kwargs={"generator": cfg.generator.model_dump(mode="json"),
                                       "labels": info["label_space"], "out": str(run.out),
                                       "row_base": row_base, "batch_size": cfg.batch_size,
                                       "cpus": ex.cpus_per_worker, "device": session.device()},
                **session.map_args(),
            )
            bar = _progress(cfg.progress, n_done + n_todo, n_done, ex.workers)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    if bar is not None:
                        bar.update(len(batch["id"]))
            finally:
                if bar is not None:
                    bar.close()
    finalize(run.out, cfg.resume_verify)
    shutil.rmtree(run.out / TODO_DIR, ignore_errors=True)
    write_run_info(run.out, cfg)
    return run.out


def _progress(enabled: bool, total: int, initial: int, workers: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=f"generate [ray x{workers}]", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)

