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
from .config import FIGURE_FORMATS, FORMATS, ReportConfig

if TYPE_CHECKING:
    from .build import find_run_dirs, write_combined_report, write_report
    from .figures import FIGURES_DIR
    from .load import find_comparison, load_comparison
    from .spillover_map import MAP_NAME

# the builders (matplotlib, jinja2, pandas) load on first use: the configs stay cheap
_WHERE = {
    "find_run_dirs": "build",
    "write_combined_report": "build",
    "write_report": "build",
    "FIGURES_DIR": "figures",
    "find_comparison": "load",
    "load_comparison": "load",
    "MAP_NAME": "spillover_map",
}


__getattr__ = lazy_getattr(__name__, _WHERE)


__all__ = [
    "FIGURES_DIR",
    "FIGURE_FORMATS",
    "FORMATS",
    "MAP_NAME",
    "ReportConfig",
    "find_comparison",
    "find_run_dirs",
    "load_comparison",
    "write_combined_report",
    "write_report",
]
