"""Prediction files: reading, validation and the join with BBQ.

A prediction file is a table with one row per BBQ item and at least the columns
``category``, ``example_id`` and ``pred_index``. Any system can write one; the
readers here accept Parquet, CSV and JSONL, and the per-sample logs of
lm-evaluation-harness (``samples_<task>_<date>.jsonl``, mapped to rows by
:mod:`.lmeval`), and fail with a message that names the file, the line (CSV/JSONL)
or row (Parquet) and the field at fault.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import CATEGORIES, CATEGORY_ALIASES, ITEM_FRAME_COLUMNS, BBQData, resolve_category
from ..errors import ConfigError, DataError
from .lmeval import check_reading, is_lm_eval_sample, read_log
from .reading import (
    MAX_FIELD_CHARS,
    MAX_INTEGER,
    Locator,
    Read,
    bool_mask,
    check_lengths,
    decode,
    first_index,
    json_line,
    locator,
    numeric,
    py_value,
    read_bytes,
    show_value,
)

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

_PLACES = "places"
# attrs key: where each row of a frame read by read_predictions came from (see _place_of)
_STRICT = "strict_columns"
# attrs key: carried item columns that must agree with BBQ (besides label), see join_with_bbq


def _at(place: str) -> str:
    """``"line 3"`` for a bare line number, else the place as is."""
    return f"line {place}" if place.isdigit() else place


def _canonical_categories(cats: pd.Series) -> pd.Series:
    """Categories as BBQ spells them: an alias or another casing (``gender``,
    ``gender-identity``) is read as :func:`~spillover.data.resolve_category` reads it
    wherever a category is expected; values it does not know are kept, to be refused
    with their line."""
    names: dict[str, str] = {}
    for value in cats:
        if isinstance(value, str) and value not in names:
            names[value] = value
            if len(value) <= 100:
                with contextlib.suppress(ConfigError):
                    names[value] = resolve_category(value)
    return cats.map(lambda v: names.get(v, v) if isinstance(v, str) else v)


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


def _check_record(path: Path, lineno: int, rec: Any, line_chars: int) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(rec).__name__}")
    # a field can only be over-long on a line that is
    for key, value in rec.items() if line_chars > MAX_FIELD_CHARS else ():
        if len(key) > MAX_FIELD_CHARS:
            raise DataError(
                f"{path}:{lineno}: a field name of {len(key):,} characters; expected at most "
                f"{MAX_FIELD_CHARS:,}"
            )
        if isinstance(value, str) and len(value) > MAX_FIELD_CHARS:
            raise DataError(
                f"{path}:{lineno}: field {key[:60]!r} holds {len(value):,} characters; "
                f"expected at most {MAX_FIELD_CHARS:,}"
            )
    for col in PRED_REQUIRED:
        if col not in rec:
            hint = (
                "; it is an lm-evaluation-harness sample: read the file with --format lm-eval "
                "(or auto)"
                if is_lm_eval_sample(rec)
                else ""
            )
            raise DataError(f"{path}:{lineno}: missing field {col!r}{hint}")


def _json_records(path: Path, data: bytes) -> list[tuple[int, Any, int]]:
    """``(line, record, line length)`` of each non-blank line of a JSONL file."""
    records: list[tuple[int, Any, int]] = []
    # line ends as universal newlines read them (a bare \r cannot be inside a JSON string)
    text = decode(path, data).replace("\r\n", "\n").replace("\r", "\n")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            records.append((lineno, json_line(path, lineno, line), len(line)))
    if not records:
        raise DataError(f"{path}: no predictions (the file is empty)")
    return records


def _read_jsonl(path: Path, parsed: list[tuple[int, Any, int]]) -> Read:
    for lineno, rec, chars in parsed:
        _check_record(path, lineno, rec, chars)
    df = pd.DataFrame.from_records([rec for _, rec, _ in parsed])
    return df, np.asarray([n for n, _, _ in parsed], dtype=np.int64), ""


def _lm_eval_frame(path: Path, parsed: list[tuple[int, Any, int]], length_norm: str) -> Read:
    """Rows of an lm-eval samples log (:func:`.lmeval.read_log`); its notes and the
    columns that must agree with BBQ ride in ``attrs``."""
    for lineno, rec, _ in parsed:
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(rec).__name__}")
    rows, notes = read_log(path, [(n, rec) for n, rec, _ in parsed], length_norm)
    lines = np.asarray([n for n, _, _ in parsed], dtype=np.int64)
    df = pd.DataFrame.from_records(rows)
    check_lengths(df, str(path), locator(lines, ""), header=None)
    df.attrs.update({"format": "lm-eval", "notes": notes, _STRICT: ["unknown_loc"]})
    return df, lines, ""


def _read_csv(path: Path, data: bytes) -> Read:
    text = decode(path, data)
    try:
        df = pd.read_csv(
            io.StringIO(text),
            dtype={"category": str, PERMUTATION_COLUMN: str},
            keep_default_na=True,
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: no predictions (the file is empty)") from None
    except (pd.errors.ParserError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None
    # line 1 is the header; data rows start on line 2 (fields with embedded newlines would
    # shift this, prediction files have none)
    lines = np.arange(len(df), dtype=np.int64) + 2
    check_lengths(df, str(path), locator(lines, ""), header="1")
    missing = [c for c in PRED_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(map(repr, missing))} in header "
            f"(found {', '.join(map(repr, map(str, df.columns)))})"
        )
    if df.empty:
        raise DataError(f"{path}: no predictions (only a header)")
    return df, lines, ""


def _read_parquet(path: Path, data: bytes) -> Read:
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})"
        ) from None
    rows = np.arange(len(df), dtype=np.int64) + 1
    check_lengths(df, str(path), locator(rows, "row "), header=None)
    missing = [c for c in PRED_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, map(str, df.columns)))})"
        )
    if df.empty:
        raise DataError(f"{path}: no predictions (the table has no rows)")
    return df.reset_index(drop=True), rows, "row "


def _integer_column(
    df: pd.DataFrame, col: str, src: str, where: Locator, allowed: Sequence[int] | None = None
) -> np.ndarray:
    raw = df[col]
    expected = (
        " or ".join([", ".join(map(str, allowed[:-1])), str(allowed[-1])])
        if allowed is not None
        else "a non-negative integer"
    )
    booleans = bool_mask(raw)
    if booleans.any():
        i = first_index(booleans)
        raise DataError(
            f"{src}:{where(i)}: field {col!r}={show_value(raw.iloc[i])} is a boolean; expected "
            f"{expected} ({int(booleans.sum())} row(s) affected)"
        )
    values = numeric(raw)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values != np.round(values))
        if allowed is not None:
            bad |= ~np.isin(values, np.asarray(allowed, dtype=float))
        else:
            bad |= (values < 0) | (values > MAX_INTEGER)
    if bad.any():
        i = first_index(bad)
        if allowed is None and abs(values[i]) > MAX_INTEGER:
            expected += f" of at most {MAX_INTEGER:,}"
        raise DataError(
            f"{src}:{where(i)}: field {col!r}={show_value(raw.iloc[i])}; expected {expected} "
            f"({int(bad.sum())} row(s) affected)"
        )
    return values.astype(np.int64)


def _validate(df: pd.DataFrame, src: str, where: Locator) -> pd.DataFrame:
    out = df.copy()
    missing = [c for c in PRED_REQUIRED if c not in out.columns]
    if missing:
        raise DataError(f"{src}: missing column(s) {', '.join(map(repr, missing))}")
    cats = out["category"]
    if not cats.isin(CATEGORIES).all():
        cats = _canonical_categories(cats)
    bad = ~cats.isin(CATEGORIES).to_numpy()
    if bad.any():
        i = first_index(bad)
        value = cats.iloc[i]
        raise DataError(
            f"{src}:{where(i)}: field 'category'={show_value(value)} is not a BBQ category"
            f"{_category_hint(value)}; expected a BBQ category or an alias such as "
            f"'gender' ({int(bad.sum())} row(s) affected)"
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
            vals = numeric(out[col])
            bad = np.isnan(vals) | (vals == np.inf) | bool_mask(out[col])
            if bad.any():
                i = first_index(bad)
                raise DataError(
                    f"{src}:{where(i)}: field {col!r}={show_value(out[col].iloc[i])}; expected a "
                    "log-probability (a finite number or -inf)"
                )
            out[col] = vals
    if PERMUTATION_COLUMN in out.columns:
        out[PERMUTATION_COLUMN] = _permutation_strings(out[PERMUTATION_COLUMN], src, where)
    keys = [*KEY_COLUMNS] + ([PERMUTATION_COLUMN] if PERMUTATION_COLUMN in out.columns else [])
    dup = out.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        first_dup = out.duplicated(keys, keep="first").to_numpy()
        i = first_index(first_dup)
        key_vals = tuple(py_value(out[k].iloc[i]) for k in keys)
        same = np.ones(len(out), dtype=bool)
        for k, v in zip(keys, key_vals, strict=True):
            same &= (out[k] == v).to_numpy()
        j = first_index(same)
        shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key_vals, strict=True))
        per = " per permutation" if PERMUTATION_COLUMN in keys else ""
        raise DataError(
            f"{src}:{where(i)}: duplicate key {shown} (first at {_at(where(j))}); each item may "
            f"appear once{per} ({int(first_dup.sum())} duplicate row(s))"
        )
    return out


def _permutation_strings(col: pd.Series, src: str, where: Locator) -> pd.Series:
    """Permutation ids as the strings written: a CSV or JSON reader's number ``12`` is the id
    ``"012"`` again (three digits padded back when they then form a permutation of 012), and
    the legacy identity ``0`` is ``"012"``; other ids are kept as text. A missing id, a
    boolean or a non-finite number is refused."""

    def one(value: Any) -> str | None:
        if value is None or isinstance(value, (bool, np.bool_)):
            return None
        if isinstance(value, (float, np.floating)):
            if not math.isfinite(value):
                return None
            text = str(int(value)) if float(value).is_integer() else str(value)
        elif isinstance(value, (int, np.integer)):
            text = str(int(value))
        else:
            text = str(value).strip()
        if text == _LEGACY_IDENTITY:
            return IDENTITY_PERMUTATION
        padded = text.zfill(3)
        if text.isdigit() and len(text) < 3 and sorted(padded) == ["0", "1", "2"]:
            return padded
        return text

    texts = [one(v) for v in col]
    bad = np.array([t is None or t == "" for t in texts], dtype=bool)
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"{src}:{where(i)}: field {PERMUTATION_COLUMN!r}={show_value(col.iloc[i])}; expected a "
            f"permutation id such as '012' ({int(bad.sum())} row(s) affected)"
        )
    return pd.Series(texts, index=col.index, dtype=object)


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
    path: str | os.PathLike[str],
    *,
    permutation: str | None = None,
    format: str = "auto",
    length_norm: str = "none",
) -> pd.DataFrame:
    """Read and validate a prediction file (Parquet, CSV, JSONL or an lm-eval samples log).

    Args:
        path: ``.parquet``/``.pq``, ``.csv`` or ``.jsonl``/``.ndjson`` file with at least
            ``category`` (BBQ's spelling or an alias such as ``gender``), ``example_id``
            and ``pred_index`` columns. Optional columns: ``score_0``, ``score_1``,
            ``score_2`` (per-option log-probabilities), ``permutation`` (answer-order
            permutation id) and any BBQ item column, which :func:`join_with_bbq` checks
            against BBQ. Or a ``samples_<task>_<date>.jsonl`` of ``lm_eval
            --log_samples`` on a BBQ multiple-choice task (see :mod:`.lmeval`).
        permutation: Which permutation to keep when the file has a ``permutation``
            column. None keeps the only one there is, or the identity ``"012"`` when
            there are several (recorded in ``df.attrs["notes"]``).
        format: One of :data:`~.lmeval.PREDICTION_FORMATS`. ``"auto"`` chooses by suffix
            and reads a JSONL file whose first record is an lm-eval sample as
            ``"lm-eval"``; any other value reads the file as that format whatever its
            suffix.
        length_norm: For lm-eval logs, the decision read (see
            :data:`~.lmeval.LM_EVAL_LENGTH_NORMS`): ``"none"`` is lm-eval's ``acc``,
            ``"char"`` its ``acc_norm``, ``"byte"`` its ``acc_bytes``. Other formats take
            ``pred_index`` as written and refuse anything but ``"none"``.

    Returns:
        The predictions with ``category`` as str (BBQ's spelling), ``example_id`` and
        ``pred_index`` as int64 and scores as float64; ``df.attrs["source"]`` holds the
        path, ``df.attrs["format"]`` the format read, ``df.attrs["notes"]`` any notes
        made while reading and ``df.attrs["places"]`` the line (or row) each prediction
        was read from, which :func:`join_with_bbq` names in its errors while the frame's
        keys are still the ones read.

    Raises:
        ConfigError: an unknown ``format`` or ``length_norm``, or a ``length_norm`` on a
            file that is not an lm-eval log.
        DataError: the file is missing, unreadable (a folder, a symlink loop, no
            permission), not UTF-8, malformed or out of bounds (booleans or integers
            above :data:`MAX_INTEGER` in integer fields, text over
            :data:`MAX_FIELD_CHARS`); an lm-eval sample without a BBQ identity, with an
            unknown choice layout, or a log that mixes tasks. The message names the file,
            the line (CSV, JSONL) or row (Parquet) and the field.
    """
    check_reading(format, length_norm)
    p = Path(path)
    kind = format if format != "auto" else _SUFFIXES.get(p.suffix.lower())
    if kind is None:
        raise DataError(
            f"{p}: unsupported prediction file type {p.suffix or '(none)'!r}; expected "
            ".parquet, .csv or .jsonl (or name the format with --format)"
        )
    data = read_bytes(p)
    if kind in ("jsonl", "lm-eval"):
        parsed = _json_records(p, data)
        if kind == "lm-eval" or (format == "auto" and is_lm_eval_sample(parsed[0][1])):
            kind = "lm-eval"
            df, numbers, unit = _lm_eval_frame(p, parsed, length_norm)
        else:
            df, numbers, unit = _read_jsonl(p, parsed)
    else:
        df, numbers, unit = {"csv": _read_csv, "parquet": _read_parquet}[kind](p, data)
    if length_norm != "none" and kind != "lm-eval":
        raise ConfigError(
            f"`--length-norm`={length_norm!r} applies to lm-evaluation-harness logs; {p} is "
            f"read as {kind} and its pred_index is used as written"
        )
    read_attrs = dict(df.attrs)
    df = _validate(df, str(p), locator(numbers, unit))
    notes: list[str] = list(read_attrs.get("notes", []))
    if PERMUTATION_COLUMN in df.columns:
        df, note = _pick_permutation(df, str(p), permutation)
        if note:
            notes.append(note)
            # returned in attrs["notes"]; callers show it (the CLI prints it once)
            logger.debug(note)
    elif permutation is not None:
        raise DataError(
            f"{p}: a permutation ({permutation!r}) was requested but the file has no "
            f"{PERMUTATION_COLUMN!r} column"
        )
    kept = numbers[df.index.to_numpy()]
    df = df.reset_index(drop=True)
    df.attrs = {
        "source": str(p),
        "format": kind,
        "notes": notes,
        _STRICT: list(read_attrs.get(_STRICT, [])),
        _PLACES: {"unit": unit, "runs": _runs(kept), "keys": _keys_digest(df)},
    }
    return df


def _keys_digest(df: pd.DataFrame) -> str:
    """Digest of a frame's item keys in row order (tells whether places still apply)."""
    hashed = pd.util.hash_pandas_object(df[list(KEY_COLUMNS)], index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()


def _runs(numbers: np.ndarray) -> list[list[int]]:
    """Line numbers as ``[first, count, step]`` runs: a few numbers for a whole file."""
    runs: list[list[int]] = []
    for n in numbers.tolist():
        if runs:
            first, count, step = runs[-1]
            if count == 1 and n > first:
                runs[-1] = [first, 2, n - first]
                continue
            if n == first + count * step:
                runs[-1][1] += 1
                continue
        runs.append([n, 1, 1])
    return runs


def _place_of(df: pd.DataFrame, i: int) -> str | None:
    """``"12"`` (line) or ``"row 12"`` where row ``i`` of a frame :func:`read_predictions`
    returned was read; None once the frame's rows no longer are the ones read."""
    places = df.attrs.get(_PLACES)
    if not isinstance(places, dict) or places.get("keys") != _keys_digest(df):
        return None
    for first, count, step in places["runs"]:
        if i < count:
            return f"{places['unit']}{first + i * step}"
        i -= count
    return None


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
        DataError: predictions whose key is not in BBQ (the file and line of the first,
            how many, and a few), or labels that disagree with BBQ's.
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
    unmatched = merged[merged["_merge"] == "left_only"].sort_values("_row")
    if len(unmatched):
        place = _place_of(preds, int(unmatched["_row"].iloc[0]))
        raise DataError(
            f"{src}{f':{place}' if place else ''}: {len(unmatched)} prediction(s) name items "
            "that are not in BBQ "
            f"(e.g. {_show_keys(unmatched)}); check the category names and example ids "
            "or load the BBQ categories the predictions were made on"
        )
    for col in carried:
        mine = merged[f"{col}_pred"]
        theirs = merged[col]
        if col == "target_loc":
            a = numeric(mine)
            b = theirs.to_numpy(dtype=float, na_value=np.nan)
            differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        elif col in ("label", "unknown_loc", "question_index"):
            a = numeric(mine)
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
                f"{show_value(example[f'{col}_pred'])}, BBQ says {show_value(example[col])})"
            )
            if col == "label":
                raise DataError(
                    f"{src}: {detail}; BBQ's labels are authoritative: the file was made for "
                    "other items or its rows are misaligned"
                )
            if col in preds.attrs.get(_STRICT, ()):
                raise DataError(
                    f"{src}: {detail}; its predictions were mapped with the file's value, so "
                    "the file was made on other data than this BBQ"
                )
            # returned in attrs["notes"]; callers show it (the CLI prints it once)
            logger.debug("%s: %s; using BBQ's values", src, detail)
            notes.append(f"{src}: {detail}; using BBQ's values")
        merged = merged.drop(columns=[f"{col}_pred"])
    merged = merged.drop(columns=["_merge"]).sort_values("_row").drop(columns=["_row"])
    merged = merged.reset_index(drop=True)
    merged["target_loc"] = merged["target_loc"].astype("Int64")
    kept_attrs = {k: v for k, v in preds.attrs.items() if k not in (_PLACES, _STRICT)}
    merged.attrs = {**kept_attrs, "notes": notes}
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
        i = first_index(dup)
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
    tl_vals = numeric(out["target_loc"])
    bad = (~np.isnan(tl_vals) & ~np.isin(tl_vals, (0.0, 1.0, 2.0))) | bool_mask(out["target_loc"])
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"{name}:{pos(i)}: field 'target_loc'={show_value(out['target_loc'].iloc[i])}; "
            "expected 0, 1, 2 or missing"
        )
    out["target_loc"] = pd.array(
        [pd.NA if math.isnan(v) else int(v) for v in tl_vals.tolist()], dtype="Int64"
    )
    if "question_index" in out.columns:
        out["question_index"] = _integer_column(out, "question_index", name, pos)
    return out
