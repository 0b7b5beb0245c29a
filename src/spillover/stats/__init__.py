"""Statistics stage: BBQ metrics of one run, and paired comparison of two runs.

Two entry points for BBQ, on files as the commands and the run use them:

* :func:`load_and_compute_metrics` (``spillover metrics``): accuracy, unknown-answer rate
  and the BBQ bias scores s_DIS / s_AMB (Parrish et al. 2022) per stratum.
* :func:`compare_files` (``spillover compare`` and the run's ``compare`` stage): a base
  and an aligned run on the same items, compared per category x context with
  scenario-clustered and item-level tests, corrected p-values, paired effects with
  intervals, power and flags, and the target on its held-out scenarios. On frames already
  joined with BBQ, :func:`compare_runs` and :func:`compute_metrics` do the same work.

The likelihood-probe benchmarks (CrowS-Pairs, StereoSet, WinoBias, Winogender) have the
same two, on files (:func:`load_and_compute_probe_metrics`, :func:`compare_probe_files`) and on frames joined with their items: ``probes.probe_metrics`` (each benchmark's own
metrics per attribute and subset) and :func:`compare_probes` (the same paired, clustered
machinery, one correction family across the benchmarks compared, the benchmark's metric
and whether it moved toward its unbiased value), giving a :class:`ProbeComparison` of
:class:`ProbeRecord` rows.

Results are typed: a :class:`Comparison` of :class:`StratumRecord` rows and :class:`Flag`
s, the contract the report stage reads. Prediction files are read through
:mod:`spillover.predictions`. Modules: ``keys``, ``metrics``, ``tests``, ``clustered``,
``bootstrap``, ``rows``, ``config``, ``records``, ``compare``, ``flags``, ``guard``,
``files``, ``probes``, ``probe_records``, ``probe_compare``; other packages import
from this face. This package imports neither torch nor
any model library; numpy, pandas, scipy and statsmodels load on first use. Formulae,
choices and references: ``docs/stats.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .config import CompareConfig, MetricsConfig
from .keys import ALL
from .probe_records import ProbeComparison, ProbeRecord
from .records import WARNINGS_COLUMN, WARNINGS_SEPARATOR, Comparison, Flag, StratumRecord

if TYPE_CHECKING:
    from .compare import compare_runs
    from .files import (
        FileComparison,
        ProbeMetricsReport,
        compare_files,
        compare_probe_files,
        load_and_compute_probe_metrics,
    )
    from .guard import COLLAPSE_SHARE, UNKNOWN_RISE
    from .metrics import MetricsReport, compute_metrics, load_and_compute_metrics
    from .probe_compare import compare_probes

# numpy- and pandas-backed parts load on first use, so that importing the configs and
# records (as the command line does at start-up) stays cheap
_LAZY = {
    "compare": ("compare_runs",),
    "files": (
        "FileComparison",
        "ProbeMetricsReport",
        "compare_files",
        "compare_probe_files",
        "load_and_compute_probe_metrics",
    ),
    "guard": ("COLLAPSE_SHARE", "UNKNOWN_RISE"),
    "metrics": ("MetricsReport", "compute_metrics", "load_and_compute_metrics"),
    "probe_compare": ("compare_probes",),
}

__getattr__ = lazy_getattr(__name__, {n: m for m, names in _LAZY.items() for n in names})

__all__ = [
    "ALL",
    "COLLAPSE_SHARE",
    "UNKNOWN_RISE",
    "WARNINGS_COLUMN",
    "WARNINGS_SEPARATOR",
    "CompareConfig",
    "Comparison",
    "FileComparison",
    "Flag",
    "MetricsConfig",
    "MetricsReport",
    "ProbeComparison",
    "ProbeMetricsReport",
    "ProbeRecord",
    "StratumRecord",
    "compare_files",
    "compare_probe_files",
    "compare_probes",
    "compare_runs",
    "compute_metrics",
    "load_and_compute_metrics",
    "load_and_compute_probe_metrics",
]
