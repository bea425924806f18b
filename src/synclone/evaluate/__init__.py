"""``synclone evaluate``: a suite of probes over models x datasets, written as long-format results."""

from synclone.evaluate.config import EvaluateConfig
from synclone.evaluate.runner import evaluate, model_names, read_results
from synclone.probes.base import COLUMNS, EvalContext, ModelEntry, Row, register_probe

__all__ = ["COLUMNS", "EvalContext", "EvaluateConfig", "ModelEntry", "Row", "evaluate", "model_names",
           "read_results", "register_probe"]
