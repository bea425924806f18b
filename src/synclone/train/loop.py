"""One Accelerate loop for supervised training on real, synthetic or mixed data.

The loop runs on the CPU, one GPU or several (``accelerate launch``): each process takes its share of
every global batch, so the optimisation sees the same batches whatever the process count. Model
selection uses a validation split held out from the training sources, never a test set; the model
folder records which split chose it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from synclone.config import write_run_info
from synclone.data.imageset import ImageSet, TensorImageSet
from synclone.data.readable import SKIPPED_LIST, UnreadableImages, read_skips, readable_sets, readable_subset
from synclone.data.shards import ShardImageSet
from synclone.data.sources import resolve_dataset
from synclone.data.streaming import concat_sets
from synclone.errors import UserError
from synclone.models import create_classifier, load_model, save_model
from synclone.train import augment as augs
from synclone.train import loader as loaders
from synclone.train.batches import CyclingSampler, ShardLocalSampler, augment
from synclone.train.config import TrainConfig
from synclone.util.accuracy import top1
from synclone.util.checkpoints import UnreadableCheckpoint, load_tensors
from synclone.util.disk import expect_output
from synclone.util.files import atomic_path, write_text_atomic
from synclone.util.seeds import mix_seed

CKPT = "checkpoints/last.pt"
PREVIOUS = "previous.pt"  # the checkpoint before last.pt, beside it


@dataclass
class Sources:
    """The training sources after subsetting, and the validation split held out from them."""

    real: ImageSet | None
    synthetic: ImageSet | None
    val: ImageSet
    val_desc: str
    # Images the folder readers left out (empty, not a regular file, undecodable): key -> file and reason.
    read_skips: dict[str, str] = field(default_factory=dict)


def load_sources(cfg: TrainConfig, resolve=resolve_dataset) -> Sources:  # noqa: ANN001
    """Load, align, subset and split the training data; every problem is reported before training starts."""
    d = cfg.data
    real = resolve(d.real, "train", d.data_root, d.image_size) if d.real else None
    syn = resolve(d.synthetic, "train", d.data_root, d.image_size) if d.synthetic else None
    if real is not None and syn is not None:
        real.label_space.check_aligned(syn.label_space, "real data", "synthetic data")
        if real.image_shape != syn.image_shape:
            raise UserError(f"real images are {real.image_shape} but synthetic images are {syn.image_shape}; "
                            "resize one of them to match")
    skips = {f"{name} {k}": why for name, ds in (("real", real), ("synthetic", syn)) if ds is not None
             for k, why in read_skips(ds).items()}
    parts, vals, descs = [], [], []
    for name, ds, per_class in (("real", real, d.real_per_class), ("synthetic", syn, d.synthetic_per_class)):
        if ds is None:
            parts.append(None)
            continue
        empty = [ds.label_space.classes[i] for i, n in enumerate(ds.class_counts()) if n == 0]
        if empty:
            raise UserError(f"{name} data '{ds.name}' has no images of class(es) {', '.join(map(repr, empty))}")
        rest, val = ds.split(d.val_fraction, seed=cfg.seed)
        if per_class is not None:
            rest = rest.per_class_subset(per_class, seed=cfg.seed)
        parts.append(rest)
        vals.append(val)
        descs.append(f"{len(val)} {name} images held out from '{ds.name}'")
    val = concat_sets(vals, "val")
    if d.val_max is not None and len(val) > d.val_max:
        g = torch.Generator().manual_seed(cfg.seed)
        val = val.subset(torch.randperm(len(val), generator=g)[: d.val_max].sort().values, val.name)
    return Sources(parts[0], parts[1], val, "; ".join(descs) + f" (validation uses {len(val)})", skips)


@torch.no_grad()
def predict(model: torch.nn.Module, data: ImageSet, batch_size: int = 512,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of ``model`` on every image of ``data`` (eval mode, float32, on the CPU)."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        x, _ = data.batch(slice(start, start + batch_size))
        out.append(model(x.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, len(data.label_space))


def _validate(model: torch.nn.Module, data: ImageSet, device: torch.device) -> tuple[float, float]:
    """Top-1 accuracy and mean cross-entropy of ``model`` on ``data`` (one forward pass)."""
    if not len(data):
        return float("nan"), float("nan")
    logits = predict(model, data, device=device)
    acc = top1(logits, data.labels)
    return acc, float(F.cross_entropy(logits, data.labels))


def _atomic_torch_save(obj: dict, path: Path) -> None:
    """Save ``obj`` to ``path`` atomically; the checkpoint it replaces is kept as ``previous.pt``.

    Two checkpoints, so a ``last.pt`` damaged after it was written (a full disk, a bad copy) still leaves a
    good one to resume from (:func:`_load_resume_state`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch's zip writer reports a full disk as "enforce fail ... write failed"
            import errno
            import shutil

            if shutil.disk_usage(path.parent).free < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
            raise
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS))


def _load_resume_state(ckpt_path: Path) -> dict:
    """``last.pt``, or when it is unreadable (corrupt, truncated, empty) ``previous.pt`` with a warning."""
    prev = ckpt_path.with_name(PREVIOUS)
    try:
        state = load_tensors(ckpt_path)
        if not isinstance(state, dict) or "step" not in state:
            raise UnreadableCheckpoint(ckpt_path, "it is not a synclone training checkpoint")
        return state
    except UnreadableCheckpoint as err:
        if not prev.is_file():
            raise UserError(f"{err}; no previous checkpoint to fall back to: delete it and re-run with --resume to "
                            "start over from the saved model, or choose another output folder") from None
        first = err
    try:
        state = load_tensors(prev)
    except UnreadableCheckpoint as err:
        raise UserError(f"{first}; and {err}: start over in another output folder") from None
    print(f"warning: {first}; resuming from the previous checkpoint '{prev}' (step {state.get('step')})",
          file=sys.stderr, flush=True)
    return state


def _config_key(cfg: TrainConfig) -> str:
    return json.dumps(cfg.budget_key(), sort_keys=True)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, task=None) -> Path:  # noqa: ANN001
    """Train the model ``cfg`` describes; returns the model folder (``<output>/model``).

    With ``resume=True`` an interrupted run continues from its last checkpoint; on the CPU the
    result equals an uninterrupted run's weights (everything random is a function of seed and step).
    ``task`` (:class:`synclone.train.pretrain.SSLTask`) replaces the supervised module, batches, loss,
    validation and export by a self-supervised objective's; everything else is this loop.
    """
    # cfg.threads is process-wide in torch; put it back so a library caller (or a test) is not left changed.
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume, progress, task)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, resume: bool, progress: bool, task=None) -> Path:  # noqa: ANN001
    from accelerate import Accelerator

    out = Path(cfg.output)
    ckpt_path = out / CKPT
    state = None
    prev_path = ckpt_path.with_name(PREVIOUS)
    if ckpt_path.is_file() or prev_path.is_file() or (out / "model" / "config.json").is_file():
        if not resume:
            raise UserError(f"'{out}' already holds a training run; pass --resume to continue it, or choose "
                            "another output folder")
        if ckpt_path.is_file() or prev_path.is_file():
            # Our own checkpoint, still read weights_only (load_tensors): no pickled code ever runs.
            state = _load_resume_state(ckpt_path)
            if state.get("config_key") != _config_key(cfg):
                theirs = json.loads(state.get("config_key", "{}"))
                diff = _first_diff(theirs, cfg.budget_key())
                raise UserError(f"cannot resume from '{ckpt_path}': it was written with another config "
                                f"({diff}); use the same config or another output folder")

    src = load_sources(cfg) if task is None else load_sources(cfg, task.resolve)
    first = src.real if src.real is not None else src.synthetic
    assert first is not None
    label_space, input_size = first.label_space, first.image_shape

    # Without a GPU, cpu=True is what makes `accelerate launch --num_processes N` a real multi-CPU run
    # (otherwise every process would train alone on the whole batch).
    accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              log_with=None if cfg.log_with == "none" else cfg.log_with, project_dir=str(out))
    main = accelerator.is_main_process
    if main:
        write_run_info(out, cfg)
    if cfg.log_with != "none":
        accelerator.init_trackers("synclone")

    if task is not None:
        model = task.build_module(label_space, input_size)
    elif cfg.model.init and cfg.model.init_head == "new":
        from synclone.train.transfer import transfer_model

        model = transfer_model(cfg.model.init, label_space, input_size, mix_seed(cfg.seed, 0x1417))
    elif cfg.model.init:
        model = load_model(cfg.model.init)
        try:
            model.label_space.check_aligned(label_space, "initial model", "training data")
        except UserError as err:
            raise UserError(f"{err}; to fine-tune on another label space set model.init_head=new") from None
    else:
        # The initial weights are a function of the seed: a run (or a crashed and resumed one) is reproducible
        # from its config alone, and seeds of a few-shot sweep differ in their initialisation too.
        torch.manual_seed(mix_seed(cfg.seed, 0x1417))
        model = create_classifier(cfg.model.arch, label_space, input_size, cfg.model.mean, cfg.model.std,
                                  **cfg.model.arch_kwargs)
    model = model.to(memory_format=torch.channels_last)

    import timm.optim
    import timm.scheduler

    o = cfg.optim
    d = cfg.data
    n_train = sum(len(s) for s in (src.real, src.synthetic) if s is not None)
    steps_per_epoch = max(1, n_train // o.batch_size)
    total_steps = o.steps or o.epochs * steps_per_epoch
    # Once per epoch, but at most ~50 validations per run: a few-shot set smaller than one batch would
    # otherwise validate after every step.
    eval_every = cfg.eval_every or max(steps_per_epoch, total_steps // 50)
    if cfg.model.freeze_steps or o.layer_decay is not None:
        from synclone.train.transfer import transfer_param_groups

        params = transfer_param_groups(model, o.weight_decay, o.layer_decay, frozen=step_frozen(cfg, 0))
        optimizer = timm.optim.create_optimizer_v2(params, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay)
    else:
        optimizer = timm.optim.create_optimizer_v2(model, opt=o.opt, lr=o.lr, weight_decay=o.weight_decay)
    # Steps are the scheduler's "epochs": the schedule then depends on the step budget alone.
    if o.sched == "cyclic":
        # FFCV's (and Bansal & Grover's) "cyclic" schedule: linear from 1e-4 x lr to lr over the warm-up, then
        # linear to 0 at the last step; timm's poly schedule with power 1 is exactly that.
        warm = min(o.warmup_steps, total_steps // 2)
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched="poly", decay_rate=1.0, num_epochs=total_steps - warm, warmup_epochs=warm,
            warmup_prefix=True, warmup_lr=o.lr * 1e-4, min_lr=0.0)
    else:
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=o.sched, num_epochs=total_steps, warmup_epochs=min(o.warmup_steps, total_steps // 2),
            warmup_lr=o.lr * 0.01, min_lr=o.lr * 0.01)

    step, best_val, best_loss, best_step, history = 0, -1.0, float("inf"), -1, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_val, best_step = int(state["step"]), float(state["best_val"]), int(state["best_step"])
        best_loss = float(state.get("best_loss", float("inf")))
        history = json.loads(state["history"])
    if main:
        expect_output(out, train_output_bytes(model), "this training run")
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    raw_model = accelerator.unwrap_model(model)

    world, rank = accelerator.num_processes, accelerator.process_index

    def sampler(ds: ImageSet, per_step: int, source_id: int) -> CyclingSampler:
        # Shards are read in passes local to a few shards at a time; everything else in a plain permutation.
        if isinstance(ds, ShardImageSet):
            return ShardLocalSampler(ds.shard_ids, per_step, cfg.seed, source_id)
        return CyclingSampler(len(ds), per_step, cfg.seed, source_id)

    undecodable: list[str] = []  # training images a task's sources dropped (below)
    if task is not None:
        # A self-supervised task builds its own batches (groups of positives, split over processes), so an image
        # cannot drop out of one as below: streamed training images are decode-checked once, before training.
        parts, undecodable = readable_sets({"real": src.real, "synthetic": src.synthetic})
        src.real, src.synthetic = parts["real"], parts["synthetic"]
        task.prepare(src, world)
        samplers = []
    elif d.mix == "ratio":
        n_syn = round(o.batch_size * d.synthetic_ratio)
        samplers = [(src.real, sampler(src.real, o.batch_size - n_syn, 0)),
                    (src.synthetic, sampler(src.synthetic, n_syn, 1))]
    else:
        pool = [s for s in (src.real, src.synthetic) if s is not None]
        whole = concat_sets(pool, "train")
        samplers = [(whole, sampler(whole, o.batch_size, 0))]
    samplers = [(ds, s) for ds, s in samplers if s.per_step > 0]

    aug = augs.resolve(cfg.aug, o.label_smoothing)
    if aug.mixing and d.real_loss_weight is not None:
        raise UserError("mixup/cutmix mix real and synthetic images within a batch, so data.real_loss_weight "
                        "cannot weight them apart; turn one of them off")
    if aug.mixing and sum(len(s.indices(0)[rank::world]) for _, s in samplers) % 2:
        raise UserError(f"mixup/cutmix need an even batch per process; optim.batch_size={o.batch_size} over "
                        f"{world} process(es) is not")
    mixer = augs.BatchMix(aug, len(label_space)) if aug.mixing else None
    # Files, shards and per-image (timm) augmentation go through DataLoader workers; small in-memory sets with
    # the batched `simple` preset slice their tensors directly (the fast path of the demo).
    streamed = aug.per_image or not all(isinstance(ds, TensorImageSet) for ds, _ in samplers)
    # Every unreadable image (left out when a folder was read, failing to decode in the validation split or in a
    # batch) is listed in skipped_images.txt; past data.max_unreadable of the images read, training stops.
    n_read = n_train + len(src.val) + len(src.read_skips)
    skipped = UnreadableImages(d.max_unreadable, out / SKIPPED_LIST if main else None, "data.max_unreadable")
    if state is not None and (out / SKIPPED_LIST).is_file():  # a resumed run keeps the skips of the steps before
        skipped.entries += [ln for ln in (out / SKIPPED_LIST).read_text(encoding="utf-8").splitlines()
                            if ln.startswith("step ") and ln.split()[1].isdigit() and int(ln.split()[1]) < step]
        skipped.counts["training images"] = len(skipped.entries)
    skipped.add([f"read\t{k}: {why}" for k, why in src.read_skips.items()] + undecodable, n_read, "training images")
    src.val, bad_val = readable_subset(src.val)
    skipped.add([f"validation\t{e}" for e in bad_val], n_read, "training images")
    bad_seen: set[tuple[int, int]] = set()  # (source, index) of the training images already listed
    batches = None
    if streamed:
        workers = loaders.clamp_workers(d.workers) if d.workers is not None else loaders.default_workers(world)
        items = loaders.TrainItems([ds for ds, _ in samplers], aug, cfg.seed, int(input_size[1]), total_steps,
                                   d.decoder, int(input_size[0]))
        batches = iter(loaders.make_loader(items, loaders.StepBatches([s for _, s in samplers], step, total_steps,
                                                                      rank, world),
                                           workers, d.prefetch, pin_memory=device.type == "cuda"))

    def save_checkpoint() -> None:
        if not main:
            return
        _atomic_torch_save({
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": step, "best_val": best_val, "best_loss": best_loss,
            "best_step": best_step,
            "history": json.dumps(history), "config_key": _config_key(cfg),
        }, ckpt_path)

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {out.name}", disable=not (progress and main),
               dynamic_ncols=True)
    t0 = time.time()
    loss_value = float("nan")
    while step < total_steps:
        # Everything random in this step derives from (seed, step): resume replays it exactly.
        step_seed = mix_seed(cfg.seed, step)
        if batches is not None:
            x, y, keys, missing = next(batches)
            if x is None:
                raise UserError(f"no image of step {step}'s batch could be read (e.g. {missing[0][1]}); check the data")
            # Each unreadable file is listed and counted once (a later epoch draws it again and drops it again).
            new = [(key, why) for key, why in missing if (key[2], key[3]) not in bad_seen]
            bad_seen.update((key[2], key[3]) for key, _ in new)
            skipped.add([f"step {key[0]}\t{why}" for key, why in new], n_read, "training images")
            parts = [sum(1 for k in keys if k[2] == sid) for sid in range(len(samplers))]
            if mixer is not None and len(y) % 2:
                x, y, parts[-1] = x[:-1], y[:-1], parts[-1] - 1  # a skipped image left the batch odd
            x = x if x.is_floating_point() else x.float().div_(255.0)
        torch.manual_seed(step_seed)
        if task is not None:
            batch = task.batch(step, rank, world)
            x = batch["x"] = batch["x"].to(device).contiguous(memory_format=torch.channels_last)
            target = None
        else:
            if batches is None:
                xs, ys, parts = [], [], []
                for ds, sampler_ in samplers:
                    idx = sampler_.indices(step)[rank::world]
                    xb, yb = ds.batch(idx)
                    xs.append(xb)
                    ys.append(yb)
                    parts.append(len(yb))
                x, y = torch.cat(xs), torch.cat(ys)
            if not aug.per_image:
                x = augment(x, mix_seed(step_seed, 1), cfg.aug.hflip, cfg.aug.crop_pad)
            target = None
            if mixer is not None:
                x, target = mixer(x, y, mix_seed(step_seed, 2))
                target = target.to(device)
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
        with accelerator.autocast():
            if task is not None:
                loss = task.loss(model, raw_model, batch, accelerator)
            else:
                logits = model(x)
            if task is not None:
                pass
            elif target is not None:
                loss = augs.soft_target_loss(logits, target)
            elif d.real_loss_weight is not None and len(parts) == 2:
                lr_, ls_ = F.cross_entropy(logits[: parts[0]], y[: parts[0]], label_smoothing=aug.label_smoothing), \
                    F.cross_entropy(logits[parts[0]:], y[parts[0]:], label_smoothing=aug.label_smoothing)
                loss = d.real_loss_weight * lr_ + (1 - d.real_loss_weight) * ls_
            else:
                loss = F.cross_entropy(logits, y, label_smoothing=aug.label_smoothing)
        if not torch.isfinite(loss):
            bar.close()
            kept = f"the last good checkpoint is '{ckpt_path}'" if ckpt_path.is_file() else "no checkpoint was written"
            raise UserError(f"loss became {loss.item()} at step {step}; training stopped and {kept}. "
                            "Lower optim.lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if o.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        if task is not None:
            task.after_step(raw_model)
        step += 1
        if cfg.model.freeze_steps:
            from synclone.train.transfer import set_frozen

            set_frozen(optimizer, step_frozen(cfg, step))  # before the scheduler sets the next step's rates
        scheduler.step(step)
        loss_value = loss.item()
        bar.update(1)
        if step % 20 == 0 or step == total_steps:
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        saving = step % eval_every == 0 or step == total_steps or step % cfg.checkpoint_every == 0
        if saving and (bad := _first_nonfinite(raw_model)) is not None:
            # A finite loss can still be followed by an update that overflows the weights; checking before
            # every save keeps the last checkpoint (and the selected model) good.
            bar.close()
            kept = f"the last good checkpoint is '{ckpt_path}'" if ckpt_path.is_file() else "no checkpoint was written"
            raise UserError(f"weights became non-finite ('{bad}') at step {step}; training stopped and {kept}. "
                            "Lower optim.lr or check the data")
        if step % eval_every == 0 or step == total_steps:
            val_acc, val_loss = (_validate(raw_model, src.val, device) if task is None
                                 else task.validate(raw_model, src.val, device))
            history.append({"step": step, "loss": loss_value, "val_acc": val_acc, "val_loss": val_loss,
                            "time_s": time.time() - t0})
            accelerator.log({"loss": loss_value, "val_acc": val_acc, "val_loss": val_loss}, step=step)
            # Ties on accuracy go to the lower validation loss: on an easy validation split (synthetic images
            # are often classified perfectly) the first step to reach 100% is a noisy early peak, not the model
            # the rest of training makes.
            if task is not None and main:  # self-supervised: no labels choose, the end of the budget is the model
                best_val, best_loss, best_step = val_acc, val_loss, step
                save_model(task.export(raw_model), out / "model", extra=task.model_note(cfg, src, step, val_acc))
            elif (val_acc > best_val or (val_acc == best_val and val_loss < best_loss)) and main:
                best_val, best_loss, best_step = val_acc, val_loss, step
                save_model(raw_model, out / "model", extra=_model_note(cfg, src, best_step, best_val))
            model.train()
            save_checkpoint()
        elif step % cfg.checkpoint_every == 0:
            save_checkpoint()
    bar.close()
    accelerator.wait_for_everyone()
    if main:
        if task is None:
            save_model(raw_model, out / "model_last", extra=_model_note(cfg, src, step, history[-1]["val_acc"]))
        summary = {"best_val_acc": best_val, "best_val_loss": best_loss, "best_step": best_step,
                   "total_steps": total_steps, "selected_by": "validation" if task is None else "last",
                   "selection_rule": "highest validation top-1; ties broken by the lower validation loss"
                   if task is None else "the last step (val_acc is a kNN monitor, never used to choose)",
                   "validation": src.val_desc, "history": history,
                   "train_images": n_train, "data": _data_record(src), "processes": world,
                   "skipped_images": len(skipped)}
        write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    accelerator.end_training()
    return out / "model"


def train_output_bytes(model: torch.nn.Module) -> float:
    """Bytes a run writes, about: the weights twice (``model``, ``model_last``) and two checkpoints (``last.pt``,
    ``previous.pt``) of weights plus optimizer state (at most two tensors per weight: Adam's moments), plus 1 MB
    of records."""
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 2 * weights + 2 * 3 * weights + 1e6


def step_frozen(cfg: TrainConfig, step: int) -> bool:
    """Whether the backbone is frozen at ``step`` (fine-tuning's warm-up of the new head)."""
    return step < cfg.model.freeze_steps


def _data_record(src: Sources) -> dict:
    """Size and content hash of each split the run used: provenance, and a check that seeds differ."""
    return {name: {"images": len(ds), "fingerprint": ds.fingerprint()}
            for name, ds in (("real", src.real), ("synthetic", src.synthetic), ("val", src.val)) if ds is not None}


def _first_nonfinite(model: torch.nn.Module) -> str | None:
    """Name of the first parameter or float buffer holding NaN/inf, or None."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _model_note(cfg: TrainConfig, src: Sources, step: int, val_acc: float) -> dict:
    return {"selected_by": "validation", "validation": src.val_desc, "step": step, "val_acc": val_acc,
            "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed}


def _first_diff(a: object, b: object, prefix: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"'{prefix.rstrip('.')}' was {a!r}, now {b!r}"


def epochs_to_steps(n_images: int, epochs: float, batch_size: int) -> int:
    return max(1, math.floor(n_images * epochs / batch_size))
