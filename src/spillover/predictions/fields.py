"""Reading prediction files, below the table: bytes, UTF-8 text, JSON lines, the bounds on
fields and numbers (each failure a one-line DataError naming the file and line), and where
each row of a frame was read from."""

from __future__ import annotations

import hashlib
import json
import math
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DataError
from .schema import KEY_COLUMNS


def py_value(value: object) -> object:
    """A numpy scalar as the plain Python value (for readable messages)."""
    return value.item() if isinstance(value, np.generic) else value


Locator = Callable[[int], str]
"""Maps a 0-based row position to ``"N"`` (a line number) or ``"row N"`` for messages."""

Read = tuple[pd.DataFrame, np.ndarray, str]
"""What a reader returns: the rows, the line (or row) number of each, and the unit's prefix
in messages (``""`` for a line, ``"row "`` for a Parquet row)."""

MAX_FIELD_CHARS = 100_000
"""Longest text accepted in one field or column name of a prediction file."""

MAX_INTEGER = 2**53 - 1
"""Largest integer accepted in an integer field (``example_id``, ...): every reader (JSON,
CSV, Parquet, and pandas' float columns) holds integers up to it exactly."""


def show_value(value: object, limit: int = 60) -> str:
    """``repr`` of a field value for a message, cut to ``limit`` characters."""
    value = py_value(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"<an integer of {len(str(abs(value)))} digits>"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _is_bool(value: object) -> bool:
    """A boolean, or the text of one (``true``, ``False``, ...) as a CSV holds it."""
    if isinstance(value, (bool, np.bool_)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("true", "false")


def bool_mask(col: pd.Series) -> np.ndarray:
    """Which values of a column are booleans (a bool column: all of them)."""
    if pd.api.types.is_bool_dtype(col.dtype):
        return np.ones(len(col), dtype=bool)
    if pd.api.types.is_numeric_dtype(col.dtype):
        return np.zeros(len(col), dtype=bool)
    if isinstance(col.dtype, pd.StringDtype):
        text = col.str.strip().str.lower()
        return np.asarray(text.isin(["true", "false"]).to_numpy(dtype=bool, na_value=False))
    return np.fromiter((_is_bool(v) for v in col), dtype=bool, count=len(col))


def _to_float(value: object) -> float:
    """One value as a float: NaN when it is no number, +-inf when it is too large."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return math.nan
    if isinstance(value, (int, np.integer)):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return math.nan
    return math.nan


def numeric(col: pd.Series) -> np.ndarray:
    """A column as float64: NaN where a value is no number, never an OverflowError."""
    if pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
        return np.asarray(col.to_numpy(dtype=float, na_value=np.nan), dtype=float)
    try:
        num = pd.to_numeric(col, errors="coerce")
        return np.asarray(num.to_numpy(dtype=float, na_value=np.nan), dtype=float)
    except (OverflowError, TypeError, ValueError):  # integers beyond float's range
        return np.fromiter((_to_float(v) for v in col), dtype=float, count=len(col))


def read_bytes(path: Path) -> bytes:
    """The bytes of a prediction file; a one-line DataError when it cannot be read."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: prediction file not found") from None
    except OSError as exc:  # a symlink loop, a path through a file, ...
        raise DataError(
            f"{path}: cannot read the prediction file ({exc.strerror or exc}); check the path"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise DataError(f"{path}: is a folder; expected a prediction file (.parquet, .csv, .jsonl)")
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: is not a regular file; expected a prediction file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"{path}: cannot read the prediction file ({exc.strerror or exc}); check its "
            "permissions"
        ) from None


def decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a CSV or JSONL file (a leading byte-order mark dropped); an error names
    the line of the first undecodable byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        byte = data[exc.start : exc.start + 1]
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte {byte!r}: {exc.reason}); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")


def json_line(path: Path, lineno: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{lineno}: malformed JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except RecursionError:
        raise DataError(
            f"{path}:{lineno}: JSON nested too deeply to read; expected one flat object per line"
        ) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise DataError(f"{path}:{lineno}: unreadable JSON value ({exc})") from None


def locator(numbers: np.ndarray, unit: str) -> Locator:
    return lambda i: f"{unit}{int(numbers[i])}"


def first_index(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_lengths(df: pd.DataFrame, src: str, where: Locator, header: str | None) -> None:
    """Refuse a column name or a text field longer than :data:`MAX_FIELD_CHARS`."""
    at = f":{header}" if header else ""
    for name in df.columns:
        if len(str(name)) > MAX_FIELD_CHARS:
            raise DataError(
                f"{src}{at}: a column name of {len(str(name)):,} characters; expected at most "
                f"{MAX_FIELD_CHARS:,}"
            )
    for name in df.columns:
        col = df[name]
        if pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            continue
        if isinstance(col.dtype, pd.StringDtype):
            lengths = col.str.len().to_numpy(dtype=np.int64, na_value=0)
        else:
            lengths = np.fromiter(
                (len(v) if isinstance(v, str) else 0 for v in col), dtype=np.int64, count=len(col)
            )
        too_long = lengths > MAX_FIELD_CHARS
        if too_long.any():
            i = first_index(too_long)
            raise DataError(
                f"{src}:{where(i)}: field {str(name)[:60]!r} holds {int(lengths[i]):,} "
                f"characters; expected at most {MAX_FIELD_CHARS:,}"
            )


PLACES_ATTR = "places"
"""``DataFrame.attrs`` key: where each row of a frame :func:`~.read.read_predictions` returned
was read from (see :func:`place_of`)."""
STRICT_ATTR = "strict_columns"
"""``DataFrame.attrs`` key: carried item columns that must agree with BBQ (besides
``label``), see :func:`~.bbq.join_with_bbq`."""


def keys_digest(df: pd.DataFrame, key: tuple[str, ...] = KEY_COLUMNS) -> str:
    """Digest of a frame's item keys (``key`` columns) in row order (tells whether places
    still apply)."""
    hashed = pd.util.hash_pandas_object(df[list(key)], index=False)
    return hashlib.sha256(hashed.to_numpy().tobytes()).hexdigest()


def line_runs(numbers: np.ndarray) -> list[list[int]]:
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


def place_of(df: pd.DataFrame, i: int, key: tuple[str, ...] = KEY_COLUMNS) -> str | None:
    """``"12"`` (line) or ``"row 12"`` where row ``i`` of a frame :func:`read_predictions`
    returned was read; None once the frame's rows (their ``key`` columns) no longer are the
    ones read."""
    places = df.attrs.get(PLACES_ATTR)
    if not isinstance(places, dict) or places.get("keys") != keys_digest(df, key):
        return None
    for first, count, step in places["runs"]:
        if i < count:
            return f"{places['unit']}{first + i * step}"
        i -= count
    return None
