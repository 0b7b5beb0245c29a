"""Report stage: tables, figures, HTML and Markdown from a run's artifacts.

Modules: ``config`` (:class:`ReportConfig`), ``load`` (reading artifacts), ``values``
(formatting), ``figures``, ``tables``, ``spillover_map`` (a sweep's target x attribute x
context map), ``build`` (:func:`write_report`); templates in
``templates/``. Import from this package. It reads the typed comparison records of
:mod:`spillover.stats` and never imports torch, transformers, TRL or PEFT.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .config import ReportConfig

if TYPE_CHECKING:
    from .build import ReportOutcome, report_folder, write_combined_report, write_report

# the builders (matplotlib, jinja2, pandas) load on first use: the configs stay cheap
_LAZY = {"build": ("ReportOutcome", "report_folder", "write_combined_report", "write_report")}

__getattr__ = lazy_getattr(__name__, {n: m for m, names in _LAZY.items() for n in names})

__all__ = [
    "ReportConfig",
    "ReportOutcome",
    "report_folder",
    "write_combined_report",
    "write_report",
]
