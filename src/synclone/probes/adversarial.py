"""Adversarial attacks on pixels, and robust accuracy over a list of perturbation budgets.

The model is any ``nn.Module`` that maps images in [0, 1] to logits and normalises inside (what
``synclone.load_model`` returns), so budgets are in pixel units: eps 8/255 means 8 grey levels.

Attacks (each returns the adversarial images, same shape and dtype as the input):

- :func:`fgsm`: one signed-gradient step of size eps (Goodfellow et al., 2015).
- :func:`pgd`: projected gradient descent (Madry et al., 2018) in the L-inf or L2 ball, with
  step size ``alpha``, ``steps`` iterations, optional random start and restarts.
- :func:`autoattack`: the AutoAttack ensemble (Croce & Hein, 2020) through ``pyautoattack``,
  with eps always passed explicitly (the package's default is 0.3, far above any common budget).

Arithmetic conventions, chosen so that without random start the results equal torchattacks'
(``FGSM``, ``PGD``, ``PGDL2``) bit for bit, and foolbox's ``FGSM`` / ``LinfPGD`` too:

- loss: mean cross-entropy over the batch; step: ``x + alpha * sign(grad)`` (L-inf) or
  ``x + alpha * grad / (||grad||_2 + 1e-10)`` (L2);
- projection: ``delta = clamp(x - x0, -eps, eps)`` (L-inf) or ``delta * min(1, eps / ||delta||_2)``
  (L2), then ``x = clamp(x0 + delta, 0, 1)``;
- random start: uniform in [-eps, eps] per pixel (L-inf); for L2, a Gaussian direction scaled to a
  radius drawn uniformly from [0, eps] (torchattacks' convention, not uniform in the ball), each
  clamped to [0, 1]. The default step size is ``alpha = 2.5 * eps / steps`` (Madry et al.).

Model mode: attacks need the model in eval mode (batch-norm statistics frozen, dropout off). A model
in train mode is switched to eval for the attack, a warning is logged, and every submodule's mode
is restored afterwards.

The suite's probe ``adversarial``: robust top-1 accuracy per eps under FGSM, PGD (L-inf or L2) or AutoAttack, from
:func:`synclone.probes.adversarial.robust_flags`; clean predictions come from the shared clean logits, and
images the model already gets wrong are not attacked, so robust <= clean by construction. Per-image outcomes
are cached on disk per (model weights, data, attack settings, eps, attack source), so re-runs are free.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, ValidationError, field_validator, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from synclone.config import StrictModel, format_validation_error
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.probes.base import EvalContext, Row, check_models, progress, register_probe, source_hash
from synclone.util.accuracy import top1
from synclone.util.files import atomic_path
from synclone.util.seeds import attack_seeds

logger = logging.getLogger(__name__)

NORMS = ("linf", "l2")
ITERATES = ("last", "first_fooling")
AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "custom")
AUTOATTACK_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")

# Per-image random-start seeds are drawn from a SeedSequence of (seed, image index), so image i
# gets the same start whatever the batch size and whichever other images are skipped.
Seed = int | Sequence[int] | None

# The L2 gradient normaliser and the slack allowed when checking an attack's output against its
# budget (float32 rounding in x0 + delta can exceed eps by an ulp of the pixel value).
_L2_DIV_EPS = 1e-10
_BUDGET_SLACK = 1e-5


# --------------------------------------------------------------------------- input checks


def _check_eps(eps: float) -> float:
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise UserError(f"eps must be a number, got {eps!r}.") from None
    if not math.isfinite(eps) or eps < 0:
        raise UserError(f"eps must be a finite number >= 0 (a budget in pixel units, e.g. 8/255), got {eps}.")
    return eps


def _check_norm(norm: str) -> str:
    key = str(norm).lower().replace("_", "").replace("-", "")
    key = {"inf": "linf", "linf": "linf", "l2": "l2", "2": "l2"}.get(key, key)
    if key not in NORMS:
        raise UserError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}.")
    return key


def _check_images(images: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise UserError("images must be a floating-point torch tensor of pixels in [0, 1].")
    if images.ndim < 2 or images.shape[0] == 0:
        raise UserError(f"images must be a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}.")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 1 or math.isnan(lo) or math.isnan(hi):
        raise UserError(
            f"images must be pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; pass un-normalised images "
            "(the model normalises inside) and divide 8-bit pixels by 255."
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype in (torch.bool,) or labels.is_floating_point():
        raise UserError("labels must be an integer torch tensor of class indices.")
    if labels.shape != images.shape[:1]:
        raise UserError(f"labels must have shape ({images.shape[0]},) to match images, got {tuple(labels.shape)}.")


def _check_label_range(labels: torch.Tensor, n_classes: int) -> None:
    if labels.numel() and (labels.min().item() < 0 or labels.max().item() >= n_classes):
        raise UserError(
            f"labels must be class indices in [0, {n_classes - 1}] for a model with {n_classes} outputs, got values "
            f"in [{labels.min().item()}, {labels.max().item()}]."
        )


def _check_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with ``model`` in eval mode, restoring each submodule's own mode afterwards.

    A model (or any submodule) in train mode makes attacks attack a moving target (batch-norm
    statistics, dropout masks); it is switched to eval with a logged warning, not silently.
    """
    modes = {m: m.training for m in model.modules()}
    if any(modes.values()):
        logger.warning(
            "model is in train mode; attacking it in eval mode (batch-norm statistics frozen, dropout off) "
            "and restoring train mode afterwards. Call model.eval() to silence this."
        )
        model.eval()
    try:
        yield model
    finally:
        for module, training in modes.items():
            module.training = training


def _as_autograd_leaf(images: torch.Tensor) -> torch.Tensor:
    # Tensors made under torch.inference_mode cannot enter autograd; a clone outside it can.
    return images.clone() if images.is_inference() else images.detach()


# --------------------------------------------------------------------------- random starts


class _Starts:
    """Source of random starts: the global RNG (seed None), one generator for the batch (an int), or
    one generator per image (a sequence of ints, one per image)."""

    def __init__(self, seed: Seed, n: int, device: torch.device):
        self.per_image = seed is not None and not isinstance(seed, int | np.integer)
        if seed is None:
            self.gen = None
        elif not self.per_image:
            self.gen = torch.Generator(device=device).manual_seed(int(seed))
        else:
            seeds = list(seed)
            if len(seeds) != n:
                raise UserError(f"seed must be an int or one int per image ({n}), got {len(seeds)} seeds.")
            self.gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def linf(self, x0: torch.Tensor, eps: float, rows: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            noise = torch.stack([self._empty(x0).uniform_(-eps, eps, generator=self.gens[i]) for i in rows.tolist()])
        else:
            noise = torch.empty_like(x0).uniform_(-eps, eps, generator=self.gen)
        return torch.clamp(x0 + noise, min=0, max=1)

    def l2(self, x0: torch.Tensor, eps: float, rows: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            pairs = [self._l2_one(x0, i) for i in rows.tolist()]
            delta = torch.stack([d for d, _ in pairs])
            r = torch.stack([r for _, r in pairs]).view(-1, *[1] * (x0.ndim - 1))
        else:
            delta = torch.empty_like(x0).normal_(generator=self.gen)
            r = None
        n = delta.flatten(1).norm(p=2, dim=1).view(-1, *[1] * (x0.ndim - 1))
        if r is None:
            r = torch.zeros_like(n).uniform_(0, 1, generator=self.gen)
        delta *= r / n * eps
        return torch.clamp(x0 + delta, min=0, max=1)

    def _l2_one(self, x0: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gens[i]
        direction = self._empty(x0).normal_(generator=g)
        radius = torch.empty((), dtype=x0.dtype, device=x0.device).uniform_(0, 1, generator=g)
        return direction, radius

    @staticmethod
    def _empty(x0: torch.Tensor) -> torch.Tensor:
        return torch.empty(x0.shape[1:], dtype=x0.dtype, device=x0.device)


# --------------------------------------------------------------------------- attacks


def _projected_steps(
    model: nn.Module,
    x0: torch.Tensor,
    labels: torch.Tensor,
    start: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    first_fooling: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``steps`` projected gradient steps from ``start``; returns (images, fooled flags or None).

    With ``first_fooling`` each image keeps the first iterate the model misclassifies (checked on
    the logits the gradient step computes anyway, plus one forward pass on the last iterate).
    """
    x = start
    kept = found = None
    view = (-1, *[1] * (x0.ndim - 1))
    checked_labels = False
    for _ in range(steps):
        # A detached alias, so the caller's tensor (the start may be the clean images) never requires grad.
        x = x.detach().requires_grad_(True)
        logits = model(x)
        if not checked_labels:
            _check_label_range(labels, logits.shape[1])
            checked_labels = True
        if first_fooling:
            fooled = logits.detach().argmax(1) != labels
            if found is None:
                kept, found = x.detach().clone(), fooled
            else:
                new = fooled & ~found
                kept[new] = x.detach()[new]
                found |= new
        loss = F.cross_entropy(logits, labels)
        (grad,) = torch.autograd.grad(loss, x)
        x = x.detach()
        # Same operations in the same order as torchattacks/foolbox, so results agree bit for bit.
        if norm == "linf":
            x = x + alpha * grad.sign()
            delta = torch.clamp(x - x0, min=-eps, max=eps)
        else:
            grad_norms = torch.norm(grad.flatten(1), p=2, dim=1) + _L2_DIV_EPS
            x = x + alpha * (grad / grad_norms.view(view))
            delta = x - x0
            factor = torch.clamp(eps / torch.norm(delta.flatten(1), p=2, dim=1), max=1.0)
            delta = delta * factor.view(view)
        x = torch.clamp(x0 + delta, min=0, max=1)
    if not first_fooling:
        return x, None
    with torch.no_grad():
        fooled = model(x).argmax(1) != labels
    keep_last = ~found
    kept[keep_last] = x[keep_last]
    return kept, found | fooled


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    norm: Literal["linf", "l2"] = "linf",
    alpha: float | None = None,
    steps: int = 10,
    random_start: bool = True,
    restarts: int = 1,
    iterate: Literal["last", "first_fooling"] = "last",
    seed: Seed = None,
) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy loss; returns the adversarial images.

    ``eps`` is the radius of the L-inf or L2 ball around each image (pixel units); ``alpha`` the
    step size (default ``2.5 * eps / steps``). By default each image's last iterate is returned;
    ``iterate="first_fooling"`` returns instead the first iterate that fools the model (the last
    one if none does). With ``restarts > 1`` (needs ``random_start``), restart r attacks only the
    images no earlier restart fooled, and each image keeps the result of the first restart that
    fools the model (or the last restart's). ``seed``: None uses torch's global RNG (as
    torchattacks does), an int seeds one generator for the batch, a sequence of ints seeds one
    generator per image (see :func:`synclone.util.seeds.attack_seeds`).
    """
    norm = _check_norm(norm)
    eps = _check_eps(eps)
    steps = _check_int(steps, "steps")
    restarts = _check_int(restarts, "restarts")
    if iterate not in ITERATES:
        raise UserError(f"unknown iterate {iterate!r}; choose one of {', '.join(ITERATES)}.")
    if restarts > 1 and not random_start:
        raise UserError("restarts > 1 needs random_start=True (without it every restart is the same attack).")
    if alpha is None:
        alpha = 2.5 * eps / steps
    elif not (isinstance(alpha, numbers.Real) and math.isfinite(alpha) and alpha > 0):
        raise UserError(f"alpha (the step size) must be a number > 0, got {alpha!r}.")
    _check_images(images, labels)
    x0 = _as_autograd_leaf(images)
    labels = labels.detach().to(x0.device)
    if eps == 0:
        return x0.clone()
    starts = _Starts(seed, len(x0), x0.device) if random_start else None
    adv = x0.clone()
    rows = torch.arange(len(x0), device=x0.device)
    with eval_mode(model), torch.enable_grad():
        for restart in range(restarts):
            xs, ys = x0[rows], labels[rows]
            if starts is None:
                start = xs
            else:
                start = starts.linf(xs, eps, rows) if norm == "linf" else starts.l2(xs, eps, rows)
            last_restart = restart == restarts - 1
            out, fooled = _projected_steps(
                model, xs, ys, start, eps=eps, alpha=alpha, steps=steps, norm=norm,
                first_fooling=iterate == "first_fooling",
            )
            adv[rows] = out
            if last_restart:
                break
            if fooled is None:
                with torch.no_grad():
                    fooled = model(out).argmax(1) != ys
            rows = rows[~fooled]
            if len(rows) == 0:
                break
    return adv


def pgd_linf(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, **kwargs) -> torch.Tensor:
    """:func:`pgd` in the L-inf ball."""
    return pgd(model, images, labels, eps, norm="linf", **kwargs)


def pgd_l2(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, **kwargs) -> torch.Tensor:
    """:func:`pgd` in the L2 ball."""
    return pgd(model, images, labels, eps, norm="l2", **kwargs)


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``clamp(x + eps * sign(grad), 0, 1)``; returns the adversarial images."""
    eps = _check_eps(eps)
    return pgd(model, images, labels, eps, norm="linf", alpha=eps or None, steps=1, random_start=False)


def autoattack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    norm: Literal["linf", "l2"] = "linf",
    version: Literal["standard", "plus", "rand", "custom"] = "standard",
    attacks: Sequence[str] | None = None,
    n_iter: int | None = None,
    n_restarts: int | None = None,
    n_queries: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """AutoAttack (``pyautoattack``) with an explicit eps; returns the adversarial images.

    ``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square as published; ``"custom"`` runs
    the ``attacks`` listed (from :data:`AUTOATTACK_ATTACKS`). ``n_iter`` (APGD and FAB iterations,
    100 by default), ``n_restarts`` and ``n_queries`` (Square, 5000 by default) trade strength for
    speed: a small n gives a quick, weaker estimate. The number of target classes of APGD-T and
    FAB-T is capped at (classes - 1) so small label spaces work. AutoAttack seeds torch's global
    RNG; it is restored afterwards.
    """
    from pyautoattack import AutoAttack  # optional dependency (the `robust` extra)

    norm = _check_norm(norm)
    eps = _check_eps(eps)
    if version not in AUTOATTACK_VERSIONS:
        raise UserError(f"unknown AutoAttack version {version!r}; choose one of {', '.join(AUTOATTACK_VERSIONS)}.")
    if version == "custom":
        if not attacks:
            raise UserError(f"version='custom' needs a list of attacks from {', '.join(AUTOATTACK_ATTACKS)}.")
        unknown = [a for a in attacks if a not in AUTOATTACK_ATTACKS]
        if unknown:
            raise UserError(f"unknown AutoAttack attacks {unknown}; choose from {', '.join(AUTOATTACK_ATTACKS)}.")
    elif attacks is not None:
        raise UserError(f"attacks are chosen by version={version!r}; use version='custom' to list your own.")
    _check_images(images, labels)
    x0 = _as_autograd_leaf(images)
    labels = labels.detach().to(x0.device)
    if eps == 0:
        return x0.clone()
    devices = [x0.device] if x0.device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=devices):
        with torch.no_grad():
            n_classes = model(x0[:1]).shape[1]
        _check_label_range(labels, n_classes)
        aa = AutoAttack(
            model, attacks=list(attacks) if attacks else None, device=x0.device, eps=eps,
            norm={"linf": "Linf", "l2": "L2"}[norm], seed=int(seed), version=version,
        )
        for attack in (aa.apgd, aa.apgd_targeted, aa.fab):
            if n_iter is not None:
                attack.n_iter = _check_int(n_iter, "n_iter")
            if n_restarts is not None:
                attack.n_restarts = _check_int(n_restarts, "n_restarts")
        if n_queries is not None:
            aa.square.n_queries = _check_int(n_queries, "n_queries")
        aa.apgd_targeted.n_target_classes = min(aa.apgd_targeted.n_target_classes, n_classes - 1)
        aa.fab.n_target_classes = min(aa.fab.n_target_classes, n_classes - 1)
        adv, _ = aa.run_standard_evaluation(x0, labels, batch_size=len(x0))
    return adv.detach()


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "pgd_linf": pgd_linf,
    "pgd_l2": pgd_l2,
    "autoattack": autoattack,
}
_SEEDED = {"pgd": "per_image", "pgd_linf": "per_image", "pgd_l2": "per_image", "autoattack": "per_batch"}


# --------------------------------------------------------------------------- robust accuracy


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _batches(images, labels, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(images, torch.Tensor):
        if labels is None or not isinstance(labels, torch.Tensor) or len(labels) != len(images):
            raise UserError("labels must be a tensor with one class index per image.")
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size], labels[i : i + batch_size]
    elif isinstance(images, Iterable):
        if labels is not None:
            raise UserError("pass labels=None when images is an iterable of (images, labels) batches.")
        for batch in images:
            yield batch[0], batch[1]
    else:
        raise UserError("images must be a tensor (N, C, H, W) or an iterable of (images, labels) batches.")


def _clean_predictions(clean: torch.Tensor | None, n_seen: int, n: int) -> torch.Tensor | None:
    if clean is None:
        return None
    part = clean[n_seen : n_seen + n]
    if len(part) != n:
        raise UserError(f"clean has {len(clean)} entries but there are more images; give one per image.")
    return part.argmax(1) if part.ndim == 2 else part


def robust_flags(
    model: nn.Module,
    images,
    labels: torch.Tensor | None,
    attack: str | Callable[..., torch.Tensor],
    eps_list: Sequence[float],
    *,
    batch_size: int = 256,
    seed: int = 0,
    clean: torch.Tensor | None = None,
    **attack_kwargs,
) -> torch.Tensor:
    """Per-image robustness: a bool tensor (len(eps_list), N), True where the model still classifies
    the attacked image correctly. See :func:`robust_accuracy` for the arguments."""
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise UserError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)} or pass a callable.")
        attack_fn, seeding = ATTACKS[attack], _SEEDED.get(attack)
    elif callable(attack):
        attack_fn, seeding = attack, None
    else:
        raise UserError(f"attack must be a name ({', '.join(ATTACKS)}) or a callable, got {attack!r}.")
    eps_list = [_check_eps(e) for e in eps_list]
    if not eps_list:
        raise UserError("eps_list is empty; give at least one budget, e.g. [0, 1/255, 4/255].")
    batch_size = _check_int(batch_size, "batch_size")
    budget_norm = _check_norm(attack_kwargs.get("norm", "linf")) if attack != "pgd_l2" else "l2"
    if clean is not None and not isinstance(clean, torch.Tensor):
        clean = torch.as_tensor(clean)

    device = _model_device(model)
    flags, n_seen = [], 0
    with eval_mode(model):
        for x, y in _batches(images, labels, batch_size):
            x, y = x.to(device), y.to(device)
            _check_images(x, y)
            pred = _clean_predictions(clean, n_seen, len(x))
            if pred is None:
                with torch.no_grad():
                    logits = model(x)
                _check_label_range(y, logits.shape[1])
                pred = logits.argmax(1)
            correct = pred.to(device) == y
            batch_flags = torch.zeros(len(eps_list), len(x), dtype=torch.bool)
            todo = correct.nonzero().flatten()
            if seeding == "per_image":
                all_seeds = attack_seeds(seed, n_seen, len(x))
                todo_seeds = [all_seeds[i] for i in todo.tolist()]
            for k, eps in enumerate(eps_list):
                if eps == 0 or len(todo) == 0:
                    batch_flags[k] = correct.cpu()
                    continue
                kwargs = dict(attack_kwargs)
                if seeding == "per_image":
                    kwargs["seed"] = todo_seeds
                elif seeding == "per_batch":
                    kwargs["seed"] = attack_seeds(seed, n_seen, 1)[0] % 2**31
                xs, ys = x[todo], y[todo]
                adv = attack_fn(model, xs, ys, eps, **kwargs)
                _check_budget(adv, xs, eps, budget_norm, attack)
                with torch.no_grad():
                    still = model(adv).argmax(1) == ys
                row = torch.zeros(len(x), dtype=torch.bool)
                row[todo.cpu()] = still.cpu()
                batch_flags[k] = row
            flags.append(batch_flags)
            n_seen += len(x)
    if clean is not None and len(clean) != n_seen:
        raise UserError(f"clean has {len(clean)} entries for {n_seen} images; give one per image.")
    return torch.cat(flags, dim=1)


def _check_budget(adv: torch.Tensor, x0: torch.Tensor, eps: float, norm: str, attack) -> None:
    # A perturbation beyond the budget would overstate the attack; that is a bug in the attack.
    delta = (adv.detach() - x0).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(p=2, dim=1)
    worst = size.max().item() if len(size) else 0.0
    if worst > eps * (1 + _BUDGET_SLACK) + _BUDGET_SLACK:
        raise RuntimeError(f"attack {attack!r} returned a perturbation of {norm} size {worst:.6g} > eps {eps:.6g}.")
    if adv.min().item() < 0 or adv.max().item() > 1:
        raise RuntimeError(f"attack {attack!r} returned pixels outside [0, 1].")


def robust_accuracy(
    model: nn.Module,
    images,
    labels: torch.Tensor | None,
    attack: str | Callable[..., torch.Tensor],
    eps_list: Sequence[float],
    *,
    batch_size: int = 256,
    seed: int = 0,
    clean: torch.Tensor | None = None,
    **attack_kwargs,
) -> dict[float, float]:
    """Accuracy under ``attack`` for each budget in ``eps_list``: ``{eps: accuracy in [0, 1]}``.

    ``images`` is a tensor (N, C, H, W) of pixels in [0, 1] with ``labels`` (N,), or an iterable of
    (images, labels) batches with ``labels=None``; batches go to the model's device. ``attack`` is
    a name from :data:`ATTACKS` or a callable ``attack(model, images, labels, eps, **attack_kwargs)``
    returning adversarial images; ``attack_kwargs`` go to it (e.g. ``steps=20, norm="l2"``).
    eps 0 is the clean accuracy.

    Clean accuracy: pass ``clean`` (logits (N, K) or predicted labels (N,) from the suite's shared
    clean forward pass, in the same image order and from the same model in eval mode) to skip that
    forward pass here. Images the model already gets wrong are not attacked and count as not
    robust, so robust accuracy <= clean accuracy by construction.

    Determinism: with random starts, image i's start comes from a generator seeded by
    (``seed``, i) (:func:`synclone.util.seeds.attack_seeds`), the same whatever ``batch_size`` and whichever images are
    skipped. AutoAttack takes one seed per batch, derived from (``seed``, index of its first image).
    """
    flags = robust_flags(
        model, images, labels, attack, eps_list, batch_size=batch_size, seed=seed, clean=clean, **attack_kwargs
    )
    return {float(eps): flags[k].float().mean().item() for k, eps in enumerate(eps_list)}


# ----------------------------------------------------------------------------------------------------------------------
# adversarial
# ----------------------------------------------------------------------------------------------------------------------


DEFAULT_EPS = {"linf": [1 / 255, 2 / 255, 4 / 255, 8 / 255], "l2": [0.25, 0.5, 1.0]}


class AdversarialSettings(StrictModel):
    """Settings of the ``adversarial`` probe.

    ``eps``: budgets in [0, 1] pixel units (the model normalises inside); default 1/255, 2/255, 4/255, 8/255 for
    L-inf and 0.25, 0.5, 1.0 for L2. ``step_size``: the PGD step in pixel units; ``None`` uses 2.5 * eps / steps
    (Madry et al.). ``norm`` is implied by the attack, except for AutoAttack (default linf). ``version``,
    ``attacks``, ``n_iter`` and ``n_queries`` are AutoAttack's (``version='custom'`` runs ``attacks``; fewer
    iterations give a quicker, weaker estimate); ``restarts``, when given, sets its ``n_restarts``.
    """

    attack: Literal["fgsm", "pgd_linf", "pgd_l2", "autoattack"] = "pgd_linf"
    eps: list[float] | None = None
    norm: Literal["linf", "l2"] | None = None
    steps: int = Field(default=10, ge=1)
    step_size: float | None = Field(default=None, gt=0)
    random_start: bool = False
    restarts: int = Field(default=1, ge=1)
    max_images: int | None = Field(default=500, ge=1)
    seed: int = 0
    version: Literal["standard", "plus", "rand", "custom"] = "standard"
    attacks: list[str] | None = None
    n_iter: int | None = Field(default=None, ge=1)
    n_queries: int | None = Field(default=None, ge=1)
    # Several attacks in one run (Singh et al.: FGSM and PGD), each a mapping of the settings above that
    # differ from these (e.g. [{attack: fgsm}, {attack: pgd_linf, steps: 20}]); all attack the same images,
    # whose clean logits are computed once. ``name`` labels a block's rows (default: its attack).
    blocks: list[dict[str, Any]] | None = None
    name: str | None = None

    @field_validator("eps")
    @classmethod
    def _eps(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one eps (e.g. [0.00392, 0.0157] for 1/255 and 4/255)")
        bad = [e for e in v if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(f"eps must be > 0 in [0, 1] pixel units (e.g. 0.0314 for 8/255), got {bad[0]}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        implied = {"fgsm": "linf", "pgd_linf": "linf", "pgd_l2": "l2"}.get(self.attack)
        if implied and self.norm not in (None, implied):
            raise ValueError(f"attack {self.attack} is an {implied} attack; drop norm={self.norm} or choose another "
                             "attack")
        if self.attack.startswith("pgd") and self.restarts > 1 and not self.random_start:
            raise ValueError("restarts > 1 needs random_start: true (without it every restart is the same attack)")
        return self

    def attack_blocks(self) -> list[AdversarialSettings]:
        """The attacks to run: the blocks (each completed from these settings), or these settings alone."""
        if not self.blocks:
            return [self]
        base = self.model_dump(exclude={"blocks", "name"}, exclude_unset=True)
        out = []
        for i, block in enumerate(self.blocks):
            if "blocks" in block or "max_images" in block:
                raise UserError(f"probes.adversarial.blocks[{i}]: 'blocks' and 'max_images' belong to the probe, "
                                "not to a block (every block attacks the same images)")
            merged = {**base, **block}
            if block.get("attack") and block["attack"] != self.attack and "norm" not in block:
                merged.pop("norm", None)  # the block's attack implies its own norm
            try:
                out.append(AdversarialSettings.model_validate(merged))
            except ValidationError as err:
                raise UserError(format_validation_error(err, prefix=f"probes.adversarial.blocks[{i}].")) from None
        names = [b.label for b in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"probes.adversarial.blocks: two blocks are both '{dup[0]}'; give each a distinct 'name'")
        return out

    @property
    def label(self) -> str:
        return self.name or self.attack

    @property
    def resolved_norm(self) -> str:
        return {"fgsm": "linf", "pgd_linf": "linf", "pgd_l2": "l2"}.get(self.attack) or self.norm or "linf"

    @property
    def resolved_eps(self) -> list[float]:
        return list(self.eps) if self.eps is not None else DEFAULT_EPS[self.resolved_norm]

    def attack_kwargs(self) -> dict:
        if self.attack == "fgsm":
            return {}
        if self.attack == "autoattack":
            kw = {"norm": self.resolved_norm, "version": self.version}
            for key in ("attacks", "n_iter", "n_queries"):
                if getattr(self, key) is not None:
                    kw[key] = getattr(self, key)
            if "restarts" in self.model_fields_set:  # else AutoAttack's own per-version default
                kw["n_restarts"] = self.restarts
            return kw
        return {"steps": self.steps, "alpha": self.step_size, "random_start": self.random_start,
                "restarts": self.restarts}

    def convention(self) -> str:
        norm = self.resolved_norm
        if self.attack == "fgsm":
            return "fgsm; linf; eps in [0,1] pixel units; one step of size eps; misclassified images not attacked"
        if self.attack == "autoattack":
            extra = "".join(f"; {k}={v}" for k, v in self.attack_kwargs().items() if k not in ("norm", "version"))
            return (f"autoattack {self.version}; {norm}; eps in [0,1] pixel units{extra}; seed={self.seed}; "
                    "misclassified images not attacked")
        step = "2.5*eps/steps" if self.step_size is None else f"{self.step_size:g}"
        return (f"{self.attack}; {norm}; eps in [0,1] pixel units; steps={self.steps}; step={step}; "
                f"random_start={self.random_start}; restarts={self.restarts}; last iterate; seed={self.seed}; "
                "misclassified images not attacked")


def _adv_cache(ctx: EvalContext, model: str, data: TensorImageSet, s: AdversarialSettings, eps: float) -> Path:
    code = source_hash("synclone.probes.adversarial")
    key = f"{ctx.models[model].fingerprint}|{data.fingerprint()}|{s.convention()}|{s.attack_kwargs()}|{eps!r}|{code}"
    return ctx.cache_dir / "adversarial" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _float_batches(data: TensorImageSet, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(data), size):
        yield data.batch(slice(start, start + size))


@register_probe("adversarial", AdversarialSettings)
def adversarial_probe(ctx: EvalContext, s: AdversarialSettings) -> list[Row]:
    """Robust top-1 accuracy per eps under FGSM, PGD (L-inf / L2) or AutoAttack, with the clean top-1 beside it."""
    check_models(ctx, "adversarial")
    blocks = s.attack_blocks()
    data = ctx.cap(ctx.clean, s.max_images)
    rows: list[Row] = []
    for m in progress(ctx, list(ctx.models), "adversarial (" + ", ".join(b.label for b in blocks) + ")"):
        clean = ctx.logits(m, data)  # one clean pass per model, shared by every attack block
        clean_top1 = top1(clean, data.labels)
        for b in blocks:
            robust = _robust_accuracies(ctx, m, data, b, clean)
            prefix = f"{b.label} " if s.blocks else ""
            for eps, value in zip(b.resolved_eps, robust, strict=True):
                rows.append(Row(m, "adversarial", data.name, f"{prefix}eps={eps:.4g}", "robust_top1", value,
                                len(data), b.convention()))
            ctx.add_artifact(m, "adversarial", data.name, "robust_curve",
                             {"eps": b.resolved_eps, "robust_top1": robust, "clean_top1": clean_top1,
                              "attack": b.label, "norm": b.resolved_norm, "convention": b.convention()})
        rows.append(Row(m, "adversarial", data.name, "clean", "clean_top1", clean_top1, len(data),
                        "shared clean logits of the same images"))
    return rows


def _robust_accuracies(ctx: EvalContext, m: str, data: TensorImageSet, s: AdversarialSettings,
                       clean: torch.Tensor) -> list[float]:
    """Robust top-1 per eps of one attack, from the per-image cache where present."""
    eps_list = s.resolved_eps
    flags: dict[float, torch.Tensor] = {}
    for eps in eps_list:
        path = _adv_cache(ctx, m, data, s, eps)
        if path.is_file():
            flags[eps] = load_file(str(path))["robust"].bool()
    todo = [e for e in eps_list if e not in flags]
    if todo:
        module = ctx.models[m].module
        out = robust_flags(module, _float_batches(data, ctx.batch_size), None, s.attack, todo,
                           seed=s.seed, clean=clean, **s.attack_kwargs())
        for k, eps in enumerate(todo):
            flags[eps] = out[k]
            path = _adv_cache(ctx, m, data, s, eps)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"robust": out[k].to(torch.uint8).contiguous()}, str(tmp))
    return [float(flags[e].float().mean()) for e in eps_list]
