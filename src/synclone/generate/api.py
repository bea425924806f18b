"""``generate(config)``: label space + prompts + generator -> a dataset folder; resumable and shardable.

Order of work, so that bad input fails before any image is made:

1. validate: generator backend and model (offline: must be a folder or cached), labels, prompt
   strategy (e.g. a prompt file covering every class), reference images;
2. main process: check the output folder (a resume needs the same config), write the plan;
3. every process: load the model, make its share of the plan (``i % n == rank``), skipping ids its
   or any earlier run's ledgers record with a verified file;
4. main process, after all finish: assemble ``train/metadata.jsonl`` sorted by id.

Under ``accelerate launch`` each process takes its share; rerunning the same command after any
interruption finishes the dataset with the same bytes as an uninterrupted run. With ``extend`` the
plan is a top-up (some images of some classes, ids not from 0; see :mod:`synclone.generate.plan`).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

from synclone.config import write_run_info
from synclone.errors import UserError
from synclone.generate.config import GenerateConfig
from synclone.generate.job import DRY_RUN_JSON, GenerationRun, check_same_generator, estimated_bytes
from synclone.generate.plan import Job, PlanSummary, read_plan, shard
from synclone.generate.runner import generate_padded, run_shard
from synclone.generate.writer import (
    DATASET_JSON,
    DatasetWriter,
    done_ids,
    finalize,
    read_dataset_json,
)
from synclone.util.disk import expect_output
from synclone.util.files import write_json_atomic

# Files a dry run leaves in the output folder; a real run may start there.


def _has_accelerator() -> bool:
    import torch

    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def _distributed_state(device: str):
    """accelerate's process state (rank, world size, device); one process when not launched."""
    import os

    from accelerate import PartialState

    # Without cpu=True, accelerate ignores a torchrun launch on a machine without accelerators.
    state = PartialState(cpu=device == "cpu" or (device == "auto" and not _has_accelerator()))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and state.num_processes != world:
        raise UserError(
            f"launched as {world} processes but accelerate set up {state.num_processes}: set generator.device "
            f"to the device each process should use (e.g. 'cpu' or 'cuda')"
        )
    return state


def generate(config: GenerateConfig, dry_run: bool = False) -> Path:
    """Make (or finish) the dataset ``config`` describes and return its folder.

    With ``dry_run`` nothing is generated into the dataset: the plan is written, one batch is timed
    (after one warm-up batch) and ``dry_run.json`` reports images per class and the estimated time
    and disk space; a summary is printed.
    """
    cfg = config
    if cfg.executor.is_ray and not dry_run:  # the images are made by Ray workers (synclone.generate.ray_runner)
        from synclone.generate.ray_runner import generate_on_ray

        return generate_on_ray(cfg)
    state = _distributed_state(cfg.generator.device)
    device = str(state.device) if cfg.generator.device == "auto" else cfg.generator.device
    run = GenerationRun(cfg, device)
    main = state.is_main_process
    if not dry_run:  # before the plan is written: a disk too small for the plan already gets the estimate
        planned = sum(n for _, n in run.ranges.values()) if run.ranges else cfg.images_per_class * len(run.labels)
        expect_output(run.out, estimated_bytes(cfg, planned, run.out), "this generate run")

    if dry_run:
        if main:
            info = run.existing()
            if info is None:
                summary, _ = run.write_plan()
            else:  # a dry run over a started dataset: report on its plan
                run.ensure_plan(info)
                summary = PlanSummary(**{k: info["plan"][k] for k in ("jobs", "per_class", "sha256")})
            report = _dry_run(run, summary, state.num_processes)
            write_json_atomic(run.out / DRY_RUN_JSON, report)
            print(format_dry_run(report), file=sys.stdout)
        state.wait_for_everyone()
        return run.out

    if main:
        info = run.existing()
        if info is None:
            summary, prompt_info = run.write_plan()
            run.backend.load()
            info = run.dataset_info(summary, prompt_info)
            write_json_atomic(run.out / DATASET_JSON, info)
        else:
            run.ensure_plan(info)
            run.backend.load()
    state.wait_for_everyone()
    if not main:
        run.backend.load()
    info = read_dataset_json(run.out)
    check_same_generator(info["generator"], run.backend.describe(), run.out)
    n_jobs = int(info["plan"]["jobs"])
    rank, world = state.process_index, state.num_processes

    id_end = int(info["plan"].get("id_end", n_jobs))  # a top-up plan's ids don't start at 0
    done, _ = done_ids(run.out, id_end, cfg.resume_verify)
    if id_end == n_jobs:  # ids 0..n-1 in plan order: a process's share is the ids rank, rank + world, ...
        share_size = len(range(rank, n_jobs, world))
        already = sum(done[i] for i in range(rank, n_jobs, world))
    else:
        share_size = already = 0
        for job in shard(read_plan(run.plan_path), rank, world):
            share_size += 1
            already += done[job.id]
    row_base = {k: info["generator"][k] for k in ("backend", "generator", "generator_revision", "scheduler", "steps",
                                                    "guidance_scale", "height", "width")}
    row_base["batch_size"] = cfg.batch_size
    jobs = (j for j in shard(read_plan(run.plan_path), rank, world) if not done[j.id])
    writer = DatasetWriter(run.out, rank, row_base)
    bar = _progress(cfg.progress, share_size, already, rank, world)
    try:
        run_shard(jobs, run.backend, writer, cfg.batch_size, cfg.generator.safety_retries, bar)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    state.wait_for_everyone()
    if main:
        finalize(run.out, cfg.resume_verify)
        write_run_info(run.out, cfg)
    state.wait_for_everyone()
    return run.out


def _progress(enabled: bool, total: int, initial: int, rank: int, world: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    desc = "generate" if world == 1 else f"generate [{rank}/{world}]"
    return tqdm(total=total, initial=initial, unit="img", desc=desc, position=rank, dynamic_ncols=True,
                smoothing=0.1)


def _dry_run(run: GenerationRun, plan: PlanSummary, processes: int) -> dict:
    """Time one batch of the plan's first jobs (after a warm-up batch) and extrapolate."""
    cfg = run.cfg
    run.backend.load()
    head: list[Job] = []
    for job in read_plan(run.plan_path):
        head.append(job)
        if len(head) == cfg.batch_size:
            break
    seeds = [j.seed for j in head]
    generate_padded(run.backend, head, seeds, cfg.batch_size)  # warm-up: first calls allocate and tune
    t0 = time.perf_counter()
    results = generate_padded(run.backend, head, seeds, cfg.batch_size)
    seconds = time.perf_counter() - t0
    sizes = []
    for r in results:
        if r.image is not None:
            buf = io.BytesIO()
            r.image.save(buf, format="PNG")
            sizes.append(len(buf.getvalue()))
    per_second = cfg.batch_size / seconds if seconds > 0 else float("inf")
    bytes_per_image = sum(sizes) / len(sizes) if sizes else 0.0
    return {
        "images": plan.jobs,
        "per_class": plan.per_class,
        "batch_size": cfg.batch_size,
        "processes": processes,
        "measured_batch_seconds": seconds,
        "images_per_second_per_process": per_second,
        "estimated_seconds": plan.jobs / (per_second * processes),
        "bytes_per_image": bytes_per_image,
        "estimated_bytes": bytes_per_image * plan.jobs,
        "flagged_in_measured_batch": sum(r.image is None for r in results),
        "generator": run.backend.describe(),
    }


def format_dry_run(report: dict) -> str:
    """The dry run's summary as a few lines of text."""
    per_class = report["per_class"]
    counts = sorted(set(per_class.values()))
    count_text = f"{counts[0]} each" if len(counts) == 1 else ", ".join(f"{c}: {n}" for c, n in per_class.items())
    hours = report["estimated_seconds"] / 3600
    return "\n".join([
        f"plan: {report['images']} images, {len(per_class)} classes ({count_text})",
        f"measured: {report['images_per_second_per_process']:.2f} images/s per process "
        f"(batch {report['batch_size']}, {report['processes']} process(es))",
        f"estimated time: {report['estimated_seconds']:.0f} s ({hours:.2f} h)",
        f"estimated disk: {report['estimated_bytes'] / 1e6:.1f} MB "
        f"({report['bytes_per_image'] / 1e3:.1f} kB per image)",
    ])
