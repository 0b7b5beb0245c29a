"""Predictions: the one contract between evaluation and statistics.

This package owns the predictions file: its record kinds and columns (``schema``), the
Parquet files spillover writes (``parquet``), the readers of any system's files (``read``:
Parquet, CSV, JSONL; ``lmeval``: lm-evaluation-harness sample logs), the bounded parsing of
their fields (``fields``), and, per benchmark, its field checks and the join with the
benchmark's items (``bbq``). The evaluator writes through it, the statistics and the
report read through it; nobody else parses a predictions file. A new benchmark's
predictions are a new :class:`RecordKind` here, not another reader elsewhere.

Importing the face is cheap: the pandas-backed readers load on first use. Format:
``docs/predictions.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_getattr
from .schema import BBQ, KINDS, Prediction, ProbePrediction, RecordKind

if TYPE_CHECKING:
    from .bbq import check_joined, join_with_bbq, position_frame
    from .parquet import (
        predictions_table,
        read_metadata,
        read_table,
        table_predictions,
        write_table,
    )
    from .probes import join_with_items
    from .read import benchmark_of, read_predictions

_LAZY = {
    "bbq": ("check_joined", "join_with_bbq", "position_frame"),
    "probes": ("join_with_items",),
    "parquet": (
        "predictions_table",
        "read_metadata",
        "read_table",
        "table_predictions",
        "write_table",
    ),
    "read": ("benchmark_of", "read_predictions"),
}

__getattr__ = lazy_getattr(__name__, {n: m for m, names in _LAZY.items() for n in names})

__all__ = [
    "BBQ",
    "KINDS",
    "Prediction",
    "ProbePrediction",
    "RecordKind",
    "benchmark_of",
    "check_joined",
    "join_with_bbq",
    "join_with_items",
    "position_frame",
    "predictions_table",
    "read_metadata",
    "read_predictions",
    "read_table",
    "table_predictions",
    "write_table",
]
