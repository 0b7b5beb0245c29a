"""Prediction files: reading, validation and the join with BBQ.

A prediction file is a table with one row per BBQ item and at least the columns
``category``, ``example_id`` and ``pred_index``. Any system can write one; the
readers here accept Parquet, CSV and JSONL and fail with a message that names
the file, the line (CSV/JSONL) or row (Parquet) and the field at fault.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import CATEGORIES, CATEGORY_ALIASES, ITEM_FRAME_COLUMNS, BBQData
from ..errors import DataError

logger = logging.getLogger(__name__)

KEY_COLUMNS: tuple[str, str] = ("category", "example_id")
"""Identity of a BBQ item: ``(category, example_id)``."""

PRED_REQUIRED: tuple[str, ...] = ("category", "example_id", "pred_index")
"""Columns every prediction file must have."""

SCORE_COLUMNS: tuple[str, str, str] = ("score_0", "score_1", "score_2")
"""Optional per-option log-probabilities (or any log-scale scores); softmax gives probabilities."""

PERMUTATION_COLUMN = "permutation"
"""Optional column: which answer-order permutation a row was evaluated under."""

IDENTITY_PERMUTATION = "012"
"""The permutation id of BBQ's own answer order (ids name the original answer shown at each
position, as the evaluator writes them: ``"012"``, ``"120"``, ``"201"``, ...)."""

_LEGACY_IDENTITY = "0"
# files written before permutation ids were kept as strings call the identity 0

ITEM_COLUMNS: tuple[str, ...] = tuple(c for c in ITEM_FRAME_COLUMNS if c not in KEY_COLUMNS)
"""Item attributes that :func:`join_with_bbq` takes from BBQ (authoritative)."""

JOINED_REQUIRED: tuple[str, ...] = (
    "category",
    "example_id",
    "pred_index",
    "context_condition",
    "question_polarity",
    "label",
    "target_loc",
    "unknown_loc",
)
"""Columns a joined frame must have for metrics and comparisons."""

_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}

Locator = Callable[[int], str]
"""Maps a 0-based row position to ``"N"`` (a line number) or ``"row N"`` for messages."""


def _py(value: object) -> object:
    """A numpy scalar as the plain Python value (for readable messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _at(place: str) -> str:
    """``"line 3"`` for a bare line number, else the place as is."""
    return f"line {place}" if place.isdigit() else place


def _category_hint(value: object) -> str:
    text = str(value)
    norm = text.strip().lower().replace("-", "_").replace(" ", "_")
    if norm in CATEGORY_ALIASES:
        return f" (did you mean {CATEGORY_ALIASES[norm]!r}?)"
    for cat in CATEGORIES:
        if cat.lower() == norm:
            return f" (did you mean {cat!r}?)"
    near = difflib.get_close_matches(text, CATEGORIES, n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _read_jsonl(path: Path) -> tuple[pd.DataFrame, Locator]:
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 ({exc.reason})") from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: malformed JSON: {exc.msg} at column {exc.colno}"
            ) from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(rec).__name__}")
        for col in PRED_REQUIRED:
            if col not in rec:
                raise DataError(f"{path}:{lineno}: missing field {col!r}")
        records.append(rec)
        lines.append(lineno)
    if not records:
        raise DataError(f"{path}: no predictions (the file is empty)")
    return pd.DataFrame.from_records(records), lambda i: str(lines[i])


def _read_csv(path: Path) -> tuple[pd.DataFrame, Locator]:
    try:
        df = pd.read_csv(
            path, dtype={"category": str, PERMUTATION_COLUMN: str}, keep_default_na=True
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: no predictions (the file is empty)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    missing = [c for c in PRED_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(map(repr, missing))} in header "
            f"(found {', '.join(map(repr, map(str, df.columns)))})"
        )
    if df.empty:
        raise DataError(f"{path}: no predictions (only a header)")
    # line 1 is the header; data rows start on line 2 (fields with embedded newlines would
    # shift this, prediction files have none)
    return df, lambda i: str(i + 2)


def _read_parquet(path: Path) -> tuple[pd.DataFrame, Locator]:
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})"
        ) from None
    missing = [c for c in PRED_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, map(str, df.columns)))})"
        )
    if df.empty:
        raise DataError(f"{path}: no predictions (the table has no rows)")
    return df.reset_index(drop=True), lambda i: f"row {i + 1}"


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _integer_column(
    df: pd.DataFrame, col: str, src: str, where: Locator, allowed: Sequence[int] | None = None
) -> np.ndarray:
    raw = df[col]
    num = pd.to_numeric(raw, errors="coerce")
    values: np.ndarray = np.asarray(num.to_numpy(dtype=float, na_value=np.nan), dtype=float)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values != np.round(values))
        if allowed is not None:
            bad |= ~np.isin(values, np.asarray(allowed, dtype=float))
        else:
            bad |= values < 0
    if bad.any():
        i = _first(bad)
        expected = (
            " or ".join([", ".join(map(str, allowed[:-1])), str(allowed[-1])])
            if allowed is not None
            else "a non-negative integer"
        )
        raise DataError(
            f"{src}:{where(i)}: field {col!r}={_py(raw.iloc[i])!r}; expected {expected} "
            f"({int(bad.sum())} row(s) affected)"
        )
    return values.astype(np.int64)


def _validate(df: pd.DataFrame, src: str, where: Locator) -> pd.DataFrame:
    out = df.copy()
    missing = [c for c in PRED_REQUIRED if c not in out.columns]
    if missing:
        raise DataError(f"{src}: missing column(s) {', '.join(map(repr, missing))}")
    cats = out["category"]
    bad = ~cats.isin(CATEGORIES).to_numpy()
    if bad.any():
        i = _first(bad)
        value = cats.iloc[i]
        raise DataError(
            f"{src}:{where(i)}: field 'category'={value!r} is not a BBQ category"
            f"{_category_hint(value)}; names must be spelled exactly as in BBQ "
            f"({int(bad.sum())} row(s) affected)"
        )
    out["category"] = cats.astype(str)
    out["example_id"] = _integer_column(out, "example_id", src, where)
    out["pred_index"] = _integer_column(out, "pred_index", src, where, allowed=(0, 1, 2))
    present = [c for c in SCORE_COLUMNS if c in out.columns]
    if present:
        absent = [c for c in SCORE_COLUMNS if c not in out.columns]
        if absent:
            raise DataError(
                f"{src}: has {', '.join(present)} but not {', '.join(absent)}; "
                "per-option scores need all three columns score_0, score_1, score_2"
            )
        for col in SCORE_COLUMNS:
            vals = pd.to_numeric(out[col], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            bad = np.isnan(vals) | (vals == np.inf)
            if bad.any():
                i = _first(bad)
                raise DataError(
                    f"{src}:{where(i)}: field {col!r}={_py(out[col].iloc[i])!r}; expected a "
                    "log-probability (a finite number or -inf)"
                )
            out[col] = vals
    if PERMUTATION_COLUMN in out.columns:
        out[PERMUTATION_COLUMN] = _permutation_strings(out[PERMUTATION_COLUMN])
    keys = [*KEY_COLUMNS] + ([PERMUTATION_COLUMN] if PERMUTATION_COLUMN in out.columns else [])
    dup = out.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        first_dup = out.duplicated(keys, keep="first").to_numpy()
        i = _first(first_dup)
        key_vals = tuple(_py(out[k].iloc[i]) for k in keys)
        same = np.ones(len(out), dtype=bool)
        for k, v in zip(keys, key_vals, strict=True):
            same &= (out[k] == v).to_numpy()
        j = _first(same)
        shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key_vals, strict=True))
        per = " per permutation" if PERMUTATION_COLUMN in keys else ""
        raise DataError(
            f"{src}:{where(i)}: duplicate key {shown} (first at {_at(where(j))}); each item may "
            f"appear once{per} ({int(first_dup.sum())} duplicate row(s))"
        )
    return out


def _permutation_strings(col: pd.Series) -> pd.Series:
    """Permutation ids as the strings written: a CSV or JSON reader's number ``12`` is the id
    ``"012"`` again (three digits padded back when they then form a permutation of 012), and
    the legacy identity ``0`` is ``"012"``; other ids are kept as text."""

    def one(value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return value
        if isinstance(value, (int, np.integer, float, np.floating)) and float(value).is_integer():
            text = str(int(value))
        else:
            text = str(value).strip()
        if text == _LEGACY_IDENTITY:
            return IDENTITY_PERMUTATION
        padded = text.zfill(3)
        if text.isdigit() and len(text) < 3 and sorted(padded) == ["0", "1", "2"]:
            return padded
        return text

    return col.map(one).astype(object)


def _pick_permutation(
    df: pd.DataFrame, src: str, permutation: str | None
) -> tuple[pd.DataFrame, str | None]:
    values = sorted(df[PERMUTATION_COLUMN].unique(), key=lambda v: (len(v), v))
    if permutation is not None:
        if permutation not in values:
            raise DataError(
                f"{src}: no rows with permutation {permutation!r}; the file has "
                f"{', '.join(map(repr, values[:10]))}{' ...' if len(values) > 10 else ''}"
            )
        kept = df[df[PERMUTATION_COLUMN] == permutation]
        note = None
        if len(values) > 1:
            note = f"{src}: using permutation {permutation!r} ({len(kept)} of {len(df)} rows)"
        return kept, note
    if len(values) == 1:
        return df, None
    if IDENTITY_PERMUTATION not in values:
        raise DataError(
            f"{src}: rows come from {len(values)} answer-order permutations "
            f"({', '.join(map(repr, values[:10]))}) and none is the identity "
            f"{IDENTITY_PERMUTATION!r}; choose one with --permutation"
        )
    kept = df[df[PERMUTATION_COLUMN] == IDENTITY_PERMUTATION]
    note = (
        f"{src}: rows come from {len(values)} answer-order permutations; using the identity "
        f"permutation {IDENTITY_PERMUTATION!r} ({len(kept)} of {len(df)} rows); "
        "pass --permutation to choose another"
    )
    return kept, note


def read_predictions(
    path: str | os.PathLike[str], *, permutation: str | None = None
) -> pd.DataFrame:
    """Read and validate a prediction file (Parquet, CSV or JSONL, chosen by suffix).

    Args:
        path: ``.parquet``/``.pq``, ``.csv`` or ``.jsonl``/``.ndjson`` file with at least
            ``category``, ``example_id`` and ``pred_index`` columns. Optional columns:
            ``score_0``, ``score_1``, ``score_2`` (per-option log-probabilities),
            ``permutation`` (answer-order permutation id) and any BBQ item column,
            which :func:`join_with_bbq` checks against BBQ.
        permutation: Which permutation to keep when the file has a ``permutation``
            column. None keeps the only one there is, or the identity ``"0"`` when
            there are several (recorded in ``df.attrs["notes"]``).

    Returns:
        The predictions with ``category`` as str, ``example_id`` and ``pred_index``
        as int64 and scores as float64; ``df.attrs["source"]`` holds the path and
        ``df.attrs["notes"]`` any notes made while reading.

    Raises:
        DataError: the file is missing, unreadable or malformed; the message names
            the file, the line (CSV, JSONL) or row (Parquet) and the field.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: prediction file not found")
    kind = _SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"{p}: unsupported prediction file type {p.suffix or '(none)'!r}; expected "
            ".parquet, .csv or .jsonl"
        )
    if kind == "jsonl":
        df, where = _read_jsonl(p)
    elif kind == "csv":
        df, where = _read_csv(p)
    else:
        df, where = _read_parquet(p)
    df = _validate(df, str(p), where)
    notes: list[str] = []
    if PERMUTATION_COLUMN in df.columns:
        df, note = _pick_permutation(df, str(p), permutation)
        if note:
            notes.append(note)
            logger.info(note)
    elif permutation is not None:
        raise DataError(
            f"{p}: a permutation ({permutation!r}) was requested but the file has no "
            f"{PERMUTATION_COLUMN!r} column"
        )
    df = df.reset_index(drop=True)
    df.attrs["source"] = str(p)
    df.attrs["notes"] = list(notes)
    return df


def _item_frame(bbq: BBQData | pd.DataFrame) -> pd.DataFrame:
    if isinstance(bbq, BBQData):
        return bbq.frame()
    needed = [c for c in JOINED_REQUIRED if c != "pred_index"]
    missing = [c for c in needed if c not in bbq.columns]
    if missing:
        raise DataError(f"BBQ item frame lacks column(s) {', '.join(map(repr, missing))}")
    return bbq


def _show_keys(df: pd.DataFrame, limit: int = 5) -> str:
    shown = ", ".join(
        f"{c}/{e}" for c, e in zip(df["category"][:limit], df["example_id"][:limit], strict=True)
    )
    more = f" and {len(df) - limit} more" if len(df) > limit else ""
    return shown + more


def join_with_bbq(preds: pd.DataFrame, bbq: BBQData | pd.DataFrame) -> pd.DataFrame:
    """Attach BBQ's item attributes to predictions by ``(category, example_id)``.

    BBQ is authoritative: item columns the prediction file already carries are
    checked and replaced. A disagreeing ``label`` is an error (the file was made
    for other items); other disagreements are logged as warnings.

    Args:
        preds: Output of :func:`read_predictions` (or any frame with its columns).
        bbq: Loaded BBQ, or an item frame shaped like :meth:`BBQData.frame`.

    Returns:
        The predictions with ``context_condition``, ``question_polarity``,
        ``label_type``, ``label``, ``target_loc`` (nullable Int64), ``unknown_loc``,
        ``question_index`` and ``subcategory`` added, in the order of ``preds``;
        ``attrs["notes"]`` holds the reading notes plus any replaced disagreements.

    Raises:
        DataError: predictions whose key is not in BBQ (how many, and a few), or
            labels that disagree with BBQ's.
    """
    src = str(preds.attrs.get("source", "predictions"))
    items = _item_frame(bbq)
    carried = [c for c in ITEM_COLUMNS if c in preds.columns and c in items.columns]
    notes = list(preds.attrs.get("notes", []))
    left = preds.reset_index(drop=True).copy()
    left["_row"] = np.arange(len(left))
    merged = left.merge(
        items, on=list(KEY_COLUMNS), how="left", suffixes=("_pred", ""), indicator=True
    )
    unmatched = merged[merged["_merge"] == "left_only"]
    if len(unmatched):
        raise DataError(
            f"{src}: {len(unmatched)} prediction(s) name items that are not in BBQ "
            f"(e.g. {_show_keys(unmatched)}); check the category names and example ids "
            "or load the BBQ categories the predictions were made on"
        )
    for col in carried:
        mine = merged[f"{col}_pred"]
        theirs = merged[col]
        if col == "target_loc":
            a = pd.to_numeric(mine, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            b = theirs.to_numpy(dtype=float, na_value=np.nan)
            differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        elif col in ("label", "unknown_loc", "question_index"):
            a = pd.to_numeric(mine, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            differ = a != theirs.to_numpy(dtype=float)
        else:
            differ = (mine.astype(str) != theirs.astype(str)).to_numpy()
            differ = differ & ~(mine.isna() & theirs.isna()).to_numpy()
        if differ.any():
            bad = merged[differ]
            example = bad.iloc[0]
            detail = (
                f"{int(differ.sum())} prediction row(s) carry a {col!r} that disagrees with "
                f"BBQ (e.g. {example['category']}/{example['example_id']}: file says "
                f"{_py(example[f'{col}_pred'])!r}, BBQ says {_py(example[col])!r})"
            )
            if col == "label":
                raise DataError(
                    f"{src}: {detail}; BBQ's labels are authoritative: the file was made for "
                    "other items or its rows are misaligned"
                )
            logger.warning("%s: %s; using BBQ's values", src, detail)
            notes.append(f"{src}: {detail}; using BBQ's values")
        merged = merged.drop(columns=[f"{col}_pred"])
    merged = merged.drop(columns=["_merge"]).sort_values("_row").drop(columns=["_row"])
    merged = merged.reset_index(drop=True)
    merged["target_loc"] = merged["target_loc"].astype("Int64")
    merged.attrs = {**preds.attrs, "notes": notes}
    front = [c for c in (*KEY_COLUMNS, "pred_index", *ITEM_COLUMNS) if c in merged.columns]
    rest = [c for c in merged.columns if c not in front]
    return merged[front + rest]


def check_joined(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Validate an already-joined frame (columns, pred_index range, duplicate keys).

    Returns a copy with canonical dtypes. Raises DataError naming ``name``.
    """
    missing = [c for c in JOINED_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {', '.join(map(repr, missing))}; join the "
            "predictions with BBQ first (join_with_bbq) or read them with load_and_compare"
        )
    if df.empty:
        raise DataError(f"{name}: no predictions")
    out = df.reset_index(drop=True).copy()
    pos: Locator = lambda i: f"row {i + 1}"  # noqa: E731
    out = _validate(out, name, pos)
    dup = out.duplicated(list(KEY_COLUMNS), keep="first").to_numpy()
    if dup.any():
        i = _first(dup)
        hint = (
            "; the rows come from several answer-order permutations: keep one"
            if PERMUTATION_COLUMN in out.columns
            else ""
        )
        raise DataError(
            f"{name}:{pos(i)}: duplicate key category={out['category'].iloc[i]!r}, "
            f"example_id={out['example_id'].iloc[i]} ({int(dup.sum())} duplicate row(s)){hint}"
        )
    for col in ("label", "unknown_loc"):
        out[col] = _integer_column(out, col, name, pos, allowed=(0, 1, 2))
    tl = pd.to_numeric(out["target_loc"], errors="coerce")
    tl_vals = tl.to_numpy(dtype=float, na_value=np.nan)
    bad = ~np.isnan(tl_vals) & ~np.isin(tl_vals, (0.0, 1.0, 2.0))
    if bad.any():
        i = _first(bad)
        raise DataError(
            f"{name}:{pos(i)}: field 'target_loc'={_py(out['target_loc'].iloc[i])!r}; "
            "expected 0, 1, 2 or missing"
        )
    out["target_loc"] = tl.astype("Int64")
    if "question_index" in out.columns:
        out["question_index"] = _integer_column(out, "question_index", name, pos)
    return out
