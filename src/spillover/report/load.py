"""Reading a run's artifacts for the report: the comparison, optional JSON, predictions."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, SpilloverError
from ..rundir import COMPARISON_FILE, PREDICTION_FILES
from ..stats import Comparison

logger = logging.getLogger(__name__)

HAND_COMPARISON = "comparison.json"
"""A comparison at the top of a folder made by hand (``spillover compare --json``)."""
HAND_PREDICTIONS: Mapping[str, tuple[str, ...]] = {
    "base": ("base.parquet", "base.csv", "base.jsonl"),
    "aligned": ("aligned.parquet", "aligned.csv", "aligned.jsonl"),
}
"""Prediction files looked for at the top of a folder made by hand (the first present)."""


@dataclass(frozen=True)
class ReportInputs:
    """Where a report's comparison and predictions are."""

    comparison: Path
    """The comparison file."""
    predictions: dict[str, Path]
    """Per model (``base``/``aligned``): its predictions file (which may not exist)."""
    shown: dict[str, str]
    """Per model: how notes name its predictions file."""
    by_hand: bool
    """The folder is not a run directory: the comparison is at its top."""


def find_comparison(folder: Path) -> Path | None:
    """A folder's comparison: ``stats/comparison.json`` of a run, else ``comparison.json``."""
    for rel in (COMPARISON_FILE, HAND_COMPARISON):
        if (Path(folder) / rel).is_file():
            return Path(folder) / rel
    return None


def report_inputs(
    folder: Path, base: Path | None = None, aligned: Path | None = None
) -> ReportInputs:
    """The inputs of one report: a run directory, or a folder made by hand.

    Raises:
        DataError: the folder holds no comparison, or a prediction file named by
            ``base`` / ``aligned`` does not exist.
    """
    comparison = find_comparison(folder)
    if comparison is None:
        raise DataError(
            f"{folder / COMPARISON_FILE}: not found (nor {HAND_COMPARISON} at the folder's top); "
            "expected the comparison written by the stats stage (`spillover compare --json`)"
        )
    by_hand = comparison.name == HAND_COMPARISON and comparison.parent == Path(folder)
    predictions: dict[str, Path] = {}
    shown: dict[str, str] = {}
    for model, given in (("base", base), ("aligned", aligned)):
        if given is not None:
            if not Path(given).is_file():
                raise DataError(f"{given}: not found; expected the {model} model's predictions")
            predictions[model], shown[model] = Path(given), Path(given).name
            continue
        names = HAND_PREDICTIONS[model] if by_hand else (PREDICTION_FILES[model],)
        rel = next((n for n in names if (folder / n).is_file()), names[0])
        predictions[model], shown[model] = folder / rel, rel
    return ReportInputs(comparison, predictions, shown, by_hand)


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
        picked = df["displayed_pred"]
        total = len(picked)
        shares[model] = [float((picked == k).sum()) / total if total else 0.0 for k in range(3)]
        grouped = df.groupby(df["permutation"].astype(str))["correct"]
        accuracy[model] = {str(k): float(v) for k, v in grouped.mean().sort_index().items()}
        perms.update(accuracy[model])
        counts[model] = len(df)
    return PositionBias(shares, accuracy, counts, sorted(perms))


def load_position_bias(
    inputs: ReportInputs, notes: list[str], warnings: list[str]
) -> PositionBias | None:
    """Answer-position statistics from the predictions, when several orders were scored.

    The files are read as ``spillover compare`` reads them (any system's Parquet, CSV or
    JSONL, lm-evaluation-harness logs, legacy permutation ids); a file that cannot be read
    is named in ``warnings`` and left out."""
    from ..predictions import position_frame, read_predictions

    paths = inputs.predictions
    names = inputs.shown
    missing = [names[m] for m, p in paths.items() if not p.is_file()]
    if len(missing) == len(paths):
        where = ", ".join(missing) if inputs.by_hand else "eval/*/predictions.parquet"
        notes.append(f"No per-item predictions ({where}): position view skipped.")
        return None
    if missing:
        notes.append(f"{', '.join(missing)} not found: position view shows the other model only.")
    frames: dict[str, Any] = {}
    for model, path in paths.items():
        if not path.is_file():
            continue
        try:
            df = read_predictions(path, all_permutations=True)
        except SpilloverError as exc:
            msg = f"{names[model]} could not be read and is skipped: {exc}"
            logger.warning(msg)
            warnings.append(msg)
            continue
        frame, lacking = position_frame(df)
        if frame is None:
            notes.append(
                f"{names[model]} has no column(s) {', '.join(lacking)}: "
                "position view skipped for it."
            )
            continue
        frames[model] = frame
    if not frames:
        return None
    n_perm = max(int(df["permutation"].nunique()) for df in frames.values())
    if n_perm < 2:
        notes.append("Predictions hold a single answer order: position view skipped.")
        return None
    return _position_bias(frames)
