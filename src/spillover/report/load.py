"""Reading a run's artifacts for the report: the comparison, optional JSON, predictions."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..rundir import PREDICTION_FILES
from ..stats import Comparison

logger = logging.getLogger(__name__)


def read_json(path: Path, what: str) -> Any:
    """The JSON content of ``path``.

    Raises:
        DataError: missing, unreadable or not JSON; ``what`` says what was expected.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {what}"
        ) from None


def load_comparison(path: Path) -> Comparison:
    """Read and check ``stats/comparison.json``.

    Raises:
        DataError: The file is missing, is not JSON, or lacks the expected shape.
    """
    what = "expected the comparison written by the stats stage (`spillover compare`); rerun it"
    return Comparison.from_json(read_json(path, what), str(path))


def load_optional_json(path: Path, label: str, notes: list[str], warnings: list[str]) -> Any:
    """The JSON content of an optional artifact; a note when absent, a warning when bad."""
    if not path.is_file():
        notes.append(f"{label} not found ({path.name}): that part of the report is skipped.")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{label} ({path.name}) could not be read and is skipped: {exc}"
        logger.warning(msg)
        warnings.append(msg)
        return None


@dataclass(frozen=True)
class PositionBias:
    """Answer-position statistics per model from per-item predictions."""

    shares: dict[str, list[float]]
    """Per model (``base``/``aligned``): share of picks at displayed positions A, B, C."""
    accuracy: dict[str, dict[str, float]]
    """Per model: accuracy per permutation label."""
    counts: dict[str, int]
    """Per model: number of prediction rows used."""
    permutations: list[str]
    """Permutation labels, sorted."""


def _position_bias(frames: Mapping[str, Any]) -> PositionBias:
    shares: dict[str, list[float]] = {}
    accuracy: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    perms: set[str] = set()
    for model, df in frames.items():
        picked = df["displayed_pred"].dropna().astype(int)
        total = len(picked)
        shares[model] = [float((picked == k).sum()) / total if total else 0.0 for k in range(3)]
        grouped = df.groupby(df["permutation"].astype(str))["correct"]
        accuracy[model] = {str(k): float(v) for k, v in grouped.mean().sort_index().items()}
        perms.update(accuracy[model])
        counts[model] = len(df)
    return PositionBias(shares, accuracy, counts, sorted(perms))


def load_position_bias(run_dir: Path, notes: list[str], warnings: list[str]) -> PositionBias | None:
    """Answer-position statistics from the run's predictions, when several orders were scored."""
    import pandas as pd

    paths = {m: run_dir / p for m, p in PREDICTION_FILES.items()}
    missing = [p for p in PREDICTION_FILES.values() if not (run_dir / p).is_file()]
    if len(missing) == len(paths):
        notes.append("No per-item predictions (eval/*/predictions.parquet): position view skipped.")
        return None
    if missing:
        notes.append(f"{', '.join(missing)} not found: position view shows the other model only.")
    frames: dict[str, Any] = {}
    need = {"permutation", "displayed_pred", "correct"}
    for model, path in paths.items():
        if not path.is_file():
            continue
        try:
            df = pd.read_parquet(path, columns=None)
        except Exception as exc:  # pyarrow raises many types for bad files
            msg = f"{PREDICTION_FILES[model]} could not be read and is skipped: {exc}"
            logger.warning(msg)
            warnings.append(msg)
            continue
        lacking = sorted(need - set(df.columns))
        if lacking:
            notes.append(
                f"{PREDICTION_FILES[model]} has no column(s) {', '.join(lacking)}: "
                "position view skipped for it."
            )
            continue
        frames[model] = df
    if not frames:
        return None
    n_perm = max(int(df["permutation"].astype(str).nunique()) for df in frames.values())
    if n_perm < 2:
        notes.append("Predictions hold a single answer order: position view skipped.")
        return None
    return _position_bias(frames)
