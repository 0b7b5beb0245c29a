"""spillover: what aligning a language model on one sensitive attribute does to the others.

The package is a pipeline of stages, each a package with a plain Python API:
``data`` (:func:`load_bbq`) -> ``align`` (:func:`build_pairs`, :func:`train_adapter`)
and ``evaluate`` (:func:`evaluate_model`) -> ``stats`` (:func:`compare_runs`) ->
``report`` (:func:`write_report`); ``runs`` (:func:`run_study`) sequences them.
Importing ``spillover`` is cheap: each entry point loads its stage on first use.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from ._lazy import lazy_getattr
from .errors import ConfigError, DataError, MissingDependencyError, ModelError, SpilloverError

if TYPE_CHECKING:
    from .align import build_pairs, train_adapter
    from .data import BBQData, BBQItem, fetch_bbq, load_bbq, select_items
    from .evaluate import evaluate_model
    from .report import write_report
    from .runs import run_study
    from .stats import compare_runs

try:
    __version__ = version("spillover")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

_ENTRY_POINTS = {
    "BBQData": "data",
    "BBQItem": "data",
    "fetch_bbq": "data",
    "load_bbq": "data",
    "select_items": "data",
    "build_pairs": "align",
    "train_adapter": "align",
    "evaluate_model": "evaluate",
    "compare_runs": "stats",
    "write_report": "report",
    "run_study": "runs",
}


__getattr__ = lazy_getattr(__name__, _ENTRY_POINTS)


__all__ = [
    "BBQData",
    "BBQItem",
    "ConfigError",
    "DataError",
    "MissingDependencyError",
    "ModelError",
    "SpilloverError",
    "__version__",
    "build_pairs",
    "compare_runs",
    "evaluate_model",
    "fetch_bbq",
    "load_bbq",
    "run_study",
    "select_items",
    "train_adapter",
    "write_report",
]
