"""Shared pieces of the probe tests: a one-thread context, a tiny trained CNN, running a probe by name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _tiny_clip import one_thread  # noqa: F401  (re-exported for the probe tests)
from synclone.config import validate
from synclone.data.imageset import TensorImageSet
from synclone.labels import FASHION_MNIST
from synclone.models import create_classifier
from synclone.probes.base import EvalContext, get_probe


def fit_tiny(train: TensorImageSet, steps: int, seed: int):
    """A synclone_cnn_tiny trained ``steps`` Adam steps of 64 images: a real, non-random model in seconds."""
    torch.manual_seed(seed)
    model = create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28), [0.5], [0.5])
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    with one_thread():
        for _ in range(steps):
            x, y = train.batch(torch.randint(0, len(train), (64,), generator=g))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def run_probe(name: str, ctx: EvalContext, **settings):
    spec = get_probe(name)
    return spec.run(ctx, validate(spec.settings, settings, source=f"probes.{name}"))


def table(rows) -> dict:
    return {(r.model, r.variant, r.metric): r.value for r in rows}


def same(a: float, b: float, tol: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=tol)


def probe_on_folder(name: str, model, label_space=None, **settings) -> tuple[dict, dict]:
    """Run the suite's probe ``name`` on one model (any module with ``input_size``): its rows as
    ``{(variant, metric): value}`` and ``{(variant, metric): n}``. The clean set is two blank images at the
    model's input size (the probes read their stimuli at that size); caches go to a temporary folder."""
    import tempfile
    from pathlib import Path

    from synclone.probes.base import ModelEntry

    space = label_space if label_space is not None else model.label_space
    clean = TensorImageSet(torch.zeros((2, *model.input_size), dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                           space, "blank")
    entry = ModelEntry("m", Path("m"), model.eval(), fingerprint=f"{type(model).__name__}-{id(model)}")
    with tempfile.TemporaryDirectory() as out:
        rows = run_probe(name, EvalContext({"m": entry}, clean, Path(out), progress=False), **settings)
    return {(r.variant, r.metric): r.value for r in rows}, {(r.variant, r.metric): r.n for r in rows}
