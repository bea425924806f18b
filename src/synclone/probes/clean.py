"""The ``clean`` probe: top-k accuracy on the in-distribution test set."""

from __future__ import annotations

from pydantic import Field

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.probes.base import EvalContext, Row, register_probe


class CleanSettings(StrictModel):
    topk: list[int] = Field(default_factory=lambda: [1], description="accuracies to report, e.g. [1, 5]")


@register_probe("clean", CleanSettings)
def clean_probe(ctx: EvalContext, s: CleanSettings) -> list[Row]:
    """Top-k accuracy on the clean in-distribution test set."""
    rows = []
    data = ctx.clean
    for name in ctx.models:
        logits = ctx.logits(name, data)
        for k in s.topk:
            if not 1 <= k <= logits.shape[1]:
                raise UserError(f"probes.clean.topk: k={k} must be between 1 and the {logits.shape[1]} classes")
            hit = (logits.topk(k, dim=1).indices == data.labels[:, None]).any(1).float().mean()
            rows.append(Row(name, "clean", data.name, "clean", f"top{k}", float(hit), len(data),
                            f"all {len(data)} images of {data.name}; selection never used this split"))
    return rows
