"""The report: evaluation folders -> one self-contained ``report.html`` plus ``report.md`` and ``figures/``.

Made from saved results and artefacts only (model-vs-human's rule: evaluate to a table first, plot
and report as a separate stage), so a report can be rebuilt, merged across runs or restyled without
touching a model.
"""

from synclone.report.build import build_report
from synclone.report.load import load_evaluations
from synclone.report.verdict import HEADLINES

__all__ = ["build_report", "load_evaluations", "HEADLINES"]
