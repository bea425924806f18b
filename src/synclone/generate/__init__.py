"""Synthetic datasets from any diffusers model: plan, backends, runner and dataset writer.

Entry point: :func:`generate` with a :class:`GenerateConfig` (``python -m synclone.generate CONFIG``
or ``accelerate launch -m synclone.generate CONFIG`` to shard over processes). Names are imported
lazily so that ``import synclone.generate.<module>`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

_EXPORTS = {
    "generate": "synclone.generate.api",
    "resolve_labels": "synclone.generate.job",
    "format_dry_run": "synclone.generate.api",
    "GenerateConfig": "synclone.generate.config",
    "GeneratorConfig": "synclone.generate.config",
    "Job": "synclone.generate.plan",
    "build_plan": "synclone.generate.plan",
    "read_plan": "synclone.generate.plan",
    "BACKENDS": "synclone.generate.backends",
    "Generated": "synclone.generate.backends",
    "create_backend": "synclone.generate.backends",
    "register_backend": "synclone.generate.backends",
    "finalize": "synclone.generate.writer",
    "load_hf_dataset": "synclone.generate.writer",
    "image_folder": "synclone.generate.writer",
    "dataset_label_space": "synclone.generate.writer",
}

__all__ = [
    "generate", "resolve_labels", "format_dry_run", "GenerateConfig", "GeneratorConfig", "Job", "build_plan",
    "read_plan", "BACKENDS", "Generated", "create_backend", "register_backend", "finalize", "load_hf_dataset",
    "image_folder", "dataset_label_space",
]

if TYPE_CHECKING:  # pragma: no cover
    from synclone.generate.api import format_dry_run, generate
    from synclone.generate.backends import BACKENDS, Generated, create_backend, register_backend
    from synclone.generate.config import GenerateConfig, GeneratorConfig
    from synclone.generate.job import resolve_labels
    from synclone.generate.plan import Job, build_plan, read_plan
    from synclone.generate.writer import dataset_label_space, finalize, image_folder, load_hf_dataset


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'synclone.generate' has no attribute '{name}'")
