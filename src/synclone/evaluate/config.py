"""The evaluation config: which models, which clean test set, which probes with which settings."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from synclone.config import StrictModel, format_validation_error
from synclone.data.readable import max_unreadable_field
from synclone.errors import UserError
from synclone.probes.base import get_probe
from synclone.util.executor import ExecutorConfig

DEFAULT_PROBES = {"clean": {}, "calibration": {}}


class EvaluateConfig(StrictModel):
    """Everything ``synclone evaluate`` needs; load from YAML with dotted overrides."""
    output: str = "runs/eval"
    models: dict[str, str] = Field(default_factory=dict, description="display name -> synclone model folder")
    data: str = Field("fashion_mnist:test", description="the clean (in-distribution) test set")
    data_root: str | None = None
    image_size: int | None = Field(
        None, ge=8, description="stream dataset folders from disk at this size (resize + centre crop): large sets")
    max_images: int | None = Field(None, ge=1, description="cap on images per dataset (seeded subset)")
    batch_size: int = Field(256, ge=1)
    max_unreadable: float = max_unreadable_field("images of a dataset")
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    cache_dir: str | None = Field(None, description="logits cache (default <output>/cache/logits)")
    probes: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_PROBES))
    # Where clean-data logits are computed: this process (local) or a Ray cluster (synclone.util.executor).
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    def probe_settings(self) -> list[tuple[str, Any]]:
        """(name, validated settings) per probe, in config order; unknown probes or keys name themselves."""
        out = []
        for name, raw in self.probes.items():
            spec = get_probe(name)
            try:
                out.append((name, spec.settings.model_validate(raw or {})))
            except ValidationError as err:
                raise UserError(format_validation_error(err, prefix=f"probes.{name}.")) from None
        return out
