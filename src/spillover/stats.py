"""Statistics stage: BBQ metrics of one run, and paired comparison of two runs.

Two entry points:

* :func:`compute_metrics` (CLI ``spillover metrics``): accuracy, unknown-answer
  rate and the BBQ bias scores s_DIS / s_AMB (Parrish et al. 2022) per stratum.
* :func:`compare_runs` (CLI ``spillover compare``): a base and an aligned run on
  the same items, compared per category x context with McNemar-family tests,
  multiplicity-corrected p-values, paired effect sizes with intervals, bias-score
  differences with bootstrap intervals, and Simpson's-paradox flags (an
  aggregate that improves while strata under it degrade significantly; a
  bias-score change whose sign the strata do not share).

Prediction files come from any system: :func:`read_predictions` accepts Parquet,
CSV or JSONL with ``category``, ``example_id`` and ``pred_index``, and
:func:`join_with_bbq` attaches BBQ's item attributes. The library functions
take already-joined DataFrames, so they work on in-memory tables too.

This module imports neither torch nor any model library; scipy and statsmodels
are imported on first use. Formulae, choices and references: ``docs/stats.md``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ._stats_bootstrap import bootstrap_cell_sums, percentile_interval
from ._stats_compare import (
    FLAG_DEGRADATION,
    FLAG_IMPROVEMENT,
    FLAG_MASKING,
    FLAG_REVERSAL,
    CompareConfig,
    Comparison,
    SimpsonFlag,
    compare_runs,
    load_and_compare,
)
from ._stats_io import (
    IDENTITY_PERMUTATION,
    JOINED_REQUIRED,
    PRED_REQUIRED,
    SCORE_COLUMNS,
    join_with_bbq,
    read_predictions,
)
from ._stats_metrics import (
    ALL,
    DEFAULT_BY,
    KEY_ORDER,
    BiasScore,
    bias_score,
    bias_values,
    compute_metrics,
    normalize_by,
)
from ._stats_tests import (
    CI_METHOD,
    McNemarResult,
    OddsRatio,
    adjust_pvalues,
    discordant_odds_ratio,
    mcnemar_midp,
    mcnemar_test,
    paired_difference_ci,
    resolve_test,
)
from .data import BBQData


@dataclass
class MetricsReport:
    """Result of :func:`load_and_compute_metrics`."""

    table: pd.DataFrame
    """One record per stratum (see :func:`compute_metrics`)."""
    warnings: list[str] = field(default_factory=list)
    """BBQ data warnings (e.g. unverified files)."""
    notes: list[str] = field(default_factory=list)
    """Notes made while reading (e.g. which permutation was used)."""

    def records(self) -> list[dict[str, Any]]:
        """The table as strict-JSON records (None for undefined values)."""
        from ._stats_compare import _json_safe

        return _json_safe(self.table.to_dict(orient="records"))  # type: ignore[no-any-return]


def load_and_compute_metrics(
    pred_path: str | os.PathLike[str],
    bbq: BBQData,
    *,
    by: str | Iterable[str] | None = DEFAULT_BY,
    permutation: str | None = None,
) -> MetricsReport:
    """Read a prediction file, join it with BBQ and compute :func:`compute_metrics`.

    Args:
        pred_path: Parquet, CSV or JSONL predictions.
        bbq: Loaded BBQ; its warnings are carried into the report.
        by: Stratification keys (comma-separated string or sequence).
        permutation: Permutation to keep when the file holds several.

    Raises:
        DataError: unreadable or malformed predictions, unknown items.
        ConfigError: bad ``by``.
    """
    preds = read_predictions(pred_path, permutation=permutation)
    joined = join_with_bbq(preds, bbq)
    table = compute_metrics(joined, by)
    return MetricsReport(table, list(bbq.warnings), list(joined.attrs["notes"]))


__all__ = [
    "ALL",
    "CI_METHOD",
    "DEFAULT_BY",
    "FLAG_DEGRADATION",
    "FLAG_IMPROVEMENT",
    "FLAG_MASKING",
    "FLAG_REVERSAL",
    "IDENTITY_PERMUTATION",
    "JOINED_REQUIRED",
    "KEY_ORDER",
    "PRED_REQUIRED",
    "SCORE_COLUMNS",
    "BiasScore",
    "CompareConfig",
    "Comparison",
    "McNemarResult",
    "MetricsReport",
    "OddsRatio",
    "SimpsonFlag",
    "adjust_pvalues",
    "bias_score",
    "bias_values",
    "bootstrap_cell_sums",
    "compare_runs",
    "compute_metrics",
    "discordant_odds_ratio",
    "join_with_bbq",
    "load_and_compare",
    "load_and_compute_metrics",
    "mcnemar_midp",
    "mcnemar_test",
    "normalize_by",
    "paired_difference_ci",
    "percentile_interval",
    "read_predictions",
    "resolve_test",
]
