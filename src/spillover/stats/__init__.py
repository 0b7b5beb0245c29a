"""Statistics stage: BBQ metrics of one run, and paired comparison of two runs.

Two entry points:

* :func:`compute_metrics` (CLI ``spillover metrics``): accuracy, unknown-answer
  rate and the BBQ bias scores s_DIS / s_AMB (Parrish et al. 2022) per stratum.
* :func:`compare_runs` (CLI ``spillover compare``): a base and an aligned run on
  the same items, compared per category x context with McNemar-family tests,
  multiplicity-corrected p-values, paired effect sizes with intervals, bias-score
  differences with bootstrap intervals, and Simpson's-paradox flags. Its result is a
  typed :class:`Comparison` of :class:`StratumRecord` rows and :class:`Flag` s, the
  contract the report stage reads.

Prediction files come from any system: :func:`read_predictions` accepts Parquet,
CSV or JSONL with ``category``, ``example_id`` and ``pred_index``, and the per-sample
logs of lm-evaluation-harness (``lm_eval --log_samples``); :func:`join_with_bbq`
attaches BBQ's item attributes. The library functions
take already-joined DataFrames, so they work on in-memory tables too.

Modules: ``io``, ``lmeval``, ``metrics``, ``tests``, ``bootstrap``, ``config``, ``records``,
``compare``, ``flags``; import from this package, not from them. This package imports
neither torch nor any model library; scipy and statsmodels are imported on first use.
Formulae, choices and references: ``docs/stats.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .config import CLUSTER_UNITS, COMPARE_TESTS, CompareConfig
from .keys import ALL, DEFAULT_BY, KEY_ORDER, normalize_by
from .lmeval import (
    LM_EVAL_LENGTH_NORMS,
    LM_EVAL_UNKNOWN_PHRASINGS,
    PREDICTION_FORMATS,
    check_reading,
)
from .records import (
    FLAG_DEGRADATION,
    FLAG_IMPROVEMENT,
    FLAG_ITEM_LEVEL_ONLY,
    FLAG_LOW_SUPPORT,
    FLAG_MASKING,
    FLAG_OVER_ABSTENTION,
    FLAG_REVERSAL,
    MIN_BIAS_SUPPORT,
    WARNINGS_COLUMN,
    WARNINGS_SEPARATOR,
    Comparison,
    Flag,
    StratumRecord,
)
from .tests import (
    CI_METHOD,
    CORRECTIONS,
    TESTS,
    McNemarResult,
    OddsRatio,
    adjust_pvalues,
    discordant_odds_ratio,
    mcnemar_midp,
    mcnemar_test,
    paired_difference_ci,
    resolve_test,
)

if TYPE_CHECKING:
    from .bootstrap import bootstrap_cell_sums, percentile_interval
    from .clustered import (
        ClusterInterval,
        ClusterTest,
        Heterogeneity,
        cluster_totals,
        heterogeneity_test,
        minimum_detectable_change,
        signflip_distribution,
        signflip_interval,
        signflip_test,
    )
    from .compare import compare_runs, load_and_compare, on_templates
    from .guard import COLLAPSE_SHARE, UNKNOWN_RISE, answer_mix
    from .io import (
        IDENTITY_PERMUTATION,
        JOINED_REQUIRED,
        PRED_REQUIRED,
        SCORE_COLUMNS,
        join_with_bbq,
        read_predictions,
    )
    from .metrics import (
        BiasScore,
        MetricsReport,
        bias_score,
        bias_values,
        compute_metrics,
        load_and_compute_metrics,
    )

# numpy- and pandas-backed parts load on first use, so that importing the configs and
# records (as the command line does at start-up) stays cheap
_LAZY = {
    "bootstrap": ("bootstrap_cell_sums", "percentile_interval"),
    "clustered": (
        "ClusterInterval",
        "ClusterTest",
        "Heterogeneity",
        "cluster_totals",
        "heterogeneity_test",
        "minimum_detectable_change",
        "signflip_interval",
        "signflip_distribution",
        "signflip_test",
    ),
    "compare": ("compare_runs", "load_and_compare", "on_templates"),
    "guard": ("COLLAPSE_SHARE", "UNKNOWN_RISE", "answer_mix"),
    "io": (
        "IDENTITY_PERMUTATION",
        "JOINED_REQUIRED",
        "PRED_REQUIRED",
        "SCORE_COLUMNS",
        "join_with_bbq",
        "read_predictions",
    ),
    "metrics": (
        "BiasScore",
        "MetricsReport",
        "bias_score",
        "bias_values",
        "compute_metrics",
        "load_and_compute_metrics",
    ),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


__getattr__ = lazy_getattr(__name__, _WHERE)


__all__ = [
    "ALL",
    "CI_METHOD",
    "CLUSTER_UNITS",
    "COLLAPSE_SHARE",
    "COMPARE_TESTS",
    "CORRECTIONS",
    "DEFAULT_BY",
    "FLAG_DEGRADATION",
    "FLAG_IMPROVEMENT",
    "FLAG_ITEM_LEVEL_ONLY",
    "FLAG_LOW_SUPPORT",
    "FLAG_MASKING",
    "FLAG_OVER_ABSTENTION",
    "FLAG_REVERSAL",
    "IDENTITY_PERMUTATION",
    "JOINED_REQUIRED",
    "KEY_ORDER",
    "LM_EVAL_LENGTH_NORMS",
    "LM_EVAL_UNKNOWN_PHRASINGS",
    "MIN_BIAS_SUPPORT",
    "PREDICTION_FORMATS",
    "PRED_REQUIRED",
    "SCORE_COLUMNS",
    "TESTS",
    "UNKNOWN_RISE",
    "WARNINGS_COLUMN",
    "WARNINGS_SEPARATOR",
    "BiasScore",
    "ClusterInterval",
    "ClusterTest",
    "CompareConfig",
    "Comparison",
    "Flag",
    "Heterogeneity",
    "McNemarResult",
    "MetricsReport",
    "OddsRatio",
    "StratumRecord",
    "adjust_pvalues",
    "answer_mix",
    "bias_score",
    "bias_values",
    "bootstrap_cell_sums",
    "check_reading",
    "cluster_totals",
    "compare_runs",
    "compute_metrics",
    "discordant_odds_ratio",
    "heterogeneity_test",
    "join_with_bbq",
    "load_and_compare",
    "load_and_compute_metrics",
    "mcnemar_midp",
    "mcnemar_test",
    "minimum_detectable_change",
    "normalize_by",
    "on_templates",
    "paired_difference_ci",
    "percentile_interval",
    "read_predictions",
    "resolve_test",
    "signflip_distribution",
    "signflip_interval",
    "signflip_test",
]
