"""Reading predictions files of any system: Parquet, CSV, JSONL, and the per-sample logs of
lm-evaluation-harness.

A predictions file is a table with one row per item and at least its record kind's
required columns (for BBQ ``category``, ``example_id`` and ``pred_index``). Any system can
write one; :func:`read_predictions` accepts Parquet, CSV and JSONL, and the per-sample logs
of lm-evaluation-harness (``samples_<task>_<date>.jsonl``, mapped to rows by
:mod:`.lmeval`), and fails with a message that names the file, the line (CSV/JSONL) or
row (Parquet) and the field at fault.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data import check_benchmark
from ..errors import ConfigError, DataError
from .bbq import pick_permutation, validate
from .fields import (
    MAX_FIELD_CHARS,
    PLACES_ATTR,
    STRICT_ATTR,
    Read,
    check_lengths,
    decode,
    json_line,
    keys_digest,
    line_runs,
    locator,
    read_bytes,
)
from .lmeval import check_reading, is_lm_eval_sample, read_log
from .probes import validate_probes
from .schema import BBQ, KINDS, PERMUTATION_COLUMN, RecordKind

logger = logging.getLogger(__name__)

_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def _kind_for(columns: Any, given: str | None, src: Path) -> RecordKind:
    """The record kind of a file: the one asked for, else a probe benchmark's when the file
    names items by ``item_id`` (its ``benchmark`` column says which), else BBQ."""
    if given is not None:
        return KINDS[check_benchmark(given)]
    names = {str(c) for c in columns}
    if "item_id" in names and "category" not in names:
        raise DataError(
            f"{src}: names items by 'item_id' (a likelihood-probe benchmark's predictions) but "
            "does not say which benchmark; pass --benchmark (crows-pairs, stereoset, winobias, "
            "winogender) or add a 'benchmark' column"
        )
    return BBQ


def _benchmark_column(df: pd.DataFrame, given: str | None, src: Path) -> str | None:
    """The benchmark a probe file names in its ``benchmark`` column (one value), else
    ``given``."""
    if given is not None or "benchmark" not in df.columns or "item_id" not in df.columns:
        return given
    values = sorted({str(v) for v in df["benchmark"].dropna()})
    if len(values) != 1:
        raise DataError(
            f"{src}: column 'benchmark' holds {', '.join(map(repr, values[:5])) or 'nothing'}; "
            "expected one benchmark per predictions file"
        )
    try:
        return check_benchmark(values[0])
    except ConfigError as exc:
        raise DataError(f"{src}: column 'benchmark': {exc}") from None


def _check_record(
    path: Path, lineno: int, rec: Any, line_chars: int, required: tuple[str, ...]
) -> None:
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
    for col in required:
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


def _read_jsonl(
    path: Path, parsed: list[tuple[int, Any, int]], given: str | None
) -> tuple[pd.DataFrame, np.ndarray, str, RecordKind]:
    first = parsed[0][1]
    keys = list(first) if isinstance(first, dict) else []
    if given is None and "item_id" in keys and isinstance(first.get("benchmark"), str):
        given = _benchmark_column(pd.DataFrame({"benchmark": [first["benchmark"]],
                                                "item_id": [0]}), None, path)  # fmt: skip
    kind = _kind_for(keys, given, path)
    for lineno, rec, chars in parsed:
        _check_record(path, lineno, rec, chars, kind.required)
    df = pd.DataFrame.from_records([rec for _, rec, _ in parsed])
    return df, np.asarray([n for n, _, _ in parsed], dtype=np.int64), "", kind


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
    df.attrs.update({"format": "lm-eval", "notes": notes, STRICT_ATTR: ["unknown_loc"]})
    return df, lines, ""


def _read_csv(
    path: Path, data: bytes, given: str | None
) -> tuple[pd.DataFrame, np.ndarray, str, RecordKind]:
    text = decode(path, data)
    try:
        df = pd.read_csv(
            io.StringIO(text),
            dtype={"category": str, PERMUTATION_COLUMN: str, "item_id": str, "benchmark": str},
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
    kind = _kind_for(df.columns, _benchmark_column(df, given, path), path)
    missing = [c for c in kind.required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(map(repr, missing))} in header "
            f"(found {', '.join(map(repr, map(str, df.columns)))})"
        )
    if df.empty:
        raise DataError(f"{path}: no predictions (only a header)")
    return df, lines, "", kind


def _read_parquet(
    path: Path, data: bytes, given: str | None
) -> tuple[pd.DataFrame, np.ndarray, str, RecordKind]:
    try:
        df = pd.read_parquet(io.BytesIO(data))
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})"
        ) from None
    rows = np.arange(len(df), dtype=np.int64) + 1
    check_lengths(df, str(path), locator(rows, "row "), header=None)
    kind = _kind_for(df.columns, _benchmark_column(df, given, path), path)
    missing = [c for c in kind.required if c not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, map(str, df.columns)))})"
        )
    if df.empty:
        raise DataError(f"{path}: no predictions (the table has no rows)")
    return df.reset_index(drop=True), rows, "row ", kind


def read_predictions(
    path: str | os.PathLike[str],
    *,
    permutation: str | None = None,
    all_permutations: bool = False,
    format: str = "auto",
    length_norm: str = "none",
    benchmark: str | None = None,
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
        all_permutations: Keep the rows of every permutation (the answer-position view);
            ``permutation`` must then be None.
        format: One of :data:`~.lmeval.PREDICTION_FORMATS`. ``"auto"`` chooses by suffix
            and reads a JSONL file whose first record is an lm-eval sample as
            ``"lm-eval"``; any other value reads the file as that format whatever its
            suffix.
        benchmark: The benchmark the file holds predictions of (one of
            :data:`~.schema.KINDS`); None: BBQ, or a likelihood-probe benchmark when the file
            names items by ``item_id`` and says which in its ``benchmark`` column (see
            :func:`.probes.validate_probes` for what such a file holds).
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
    if all_permutations and permutation is not None:
        raise ConfigError("choose one permutation or all of them, not both")
    p = Path(path)
    if benchmark is not None:
        benchmark = check_benchmark(benchmark)
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
            if benchmark not in (None, "bbq"):
                raise ConfigError(
                    f"{p}: an lm-evaluation-harness log is read as BBQ predictions; logs of "
                    f"{benchmark} tasks are not read (convert them to a CSV with item_id and "
                    "score_0, score_1, ...)"
                )
            kind = "lm-eval"
            df, numbers, unit = _lm_eval_frame(p, parsed, length_norm)
            record = BBQ
        else:
            df, numbers, unit, record = _read_jsonl(p, parsed, benchmark)
    else:
        reader = {"csv": _read_csv, "parquet": _read_parquet}[kind]
        df, numbers, unit, record = reader(p, data, benchmark)
    if length_norm != "none" and kind != "lm-eval":
        raise ConfigError(
            f"`--length-norm`={length_norm!r} applies to lm-evaluation-harness logs; {p} is "
            f"read as {kind} and its pred_index is used as written"
        )
    read_attrs = dict(df.attrs)
    if record is not BBQ:
        return _probe_frame(df, record, p, kind, numbers, unit)
    df = validate(df, str(p), locator(numbers, unit))
    notes: list[str] = list(read_attrs.get("notes", []))
    if PERMUTATION_COLUMN in df.columns and not all_permutations:
        df, note = pick_permutation(df, str(p), permutation)
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
        STRICT_ATTR: list(read_attrs.get(STRICT_ATTR, [])),
        PLACES_ATTR: {"unit": unit, "runs": line_runs(kept), "keys": keys_digest(df)},
    }
    return df


def _probe_frame(
    df: pd.DataFrame, kind: RecordKind, p: Path, fmt: str, numbers: np.ndarray, unit: str
) -> pd.DataFrame:
    """A likelihood-probe file's rows validated (:func:`.probes.validate_probes`), with
    the same ``attrs`` as a BBQ frame."""
    df = validate_probes(df, kind, str(p), locator(numbers, unit))
    df.attrs = {
        "source": str(p),
        "format": fmt,
        "benchmark": kind.name,
        "notes": [],
        PLACES_ATTR: {
            "unit": unit,
            "runs": line_runs(numbers),
            "keys": keys_digest(df, ("item_id",)),
        },
    }
    return df


def benchmark_of(
    path: str | os.PathLike[str],
    format: str = "auto",
    *,
    length_norm: str = "none",
    given: str | None = None,
) -> str:
    """Which benchmark a predictions file holds (``given``, checked, else read from its
    columns and, for a probe benchmark's file, its ``benchmark`` column), reading no more
    than needed: ``bbq`` for BBQ predictions and lm-evaluation-harness logs. The reading
    options are checked first, so a command fails on them before any work.

    Raises:
        ConfigError: an unknown ``format``, ``length_norm`` or ``given`` benchmark.
        DataError: the file cannot be read, or names items by ``item_id`` without saying
            which benchmark (pass it).
    """
    check_reading(format, length_norm)
    if given is not None:
        return check_benchmark(given)
    p = Path(path)
    kind = format if format != "auto" else _SUFFIXES.get(p.suffix.lower())
    if kind == "lm-eval":
        return "bbq"
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(p).names
            first = (
                pq.ParquetFile(p).read_row_group(0, columns=["benchmark"]).column(0)[0].as_py()
                if "benchmark" in names
                else None
            )
        except Exception as exc:  # pyarrow raises several unrelated types for bad files
            raise DataError(
                f"{p}: not a readable Parquet file ({type(exc).__name__}: {exc})"
            ) from None
        return _benchmark_named(names, first, p)
    head = read_bytes(p)[: 1 << 20]
    text = decode(p, head.rsplit(b"\n", 1)[0] if b"\n" in head else head)
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if not lines:
        raise DataError(f"{p}: no predictions (the file is empty)")
    if kind in ("jsonl", None):
        rec = json_line(p, 1, lines[0])
        if kind is None or is_lm_eval_sample(rec) or not isinstance(rec, dict):
            return "bbq"
        return _benchmark_named(list(rec), rec.get("benchmark"), p)
    import csv

    rows = list(csv.reader(lines[:2]))
    header = rows[0]
    first = rows[1][header.index("benchmark")] if "benchmark" in header and len(rows) > 1 else None
    return _benchmark_named(header, first, p)


def _benchmark_named(columns: Any, value: Any, p: Path) -> str:
    names = {str(c) for c in columns}
    if "item_id" not in names or "category" in names:
        return "bbq"
    if value is None:
        _kind_for(names, None, p)  # raises: the file does not say which benchmark
    try:
        return check_benchmark(str(value))
    except ConfigError as exc:
        raise DataError(f"{p}: column 'benchmark': {exc}") from None
