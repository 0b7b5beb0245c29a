"""Parsing and validating BBQ's files: the category JSONL files and ``additional_metadata.csv``."""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import io
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from ..errors import DataError
from .items import CATEGORIES, CONTEXTS, POLARITIES, BBQItem, LabelType
from .scenarios import assign_scenarios
from .sources import METADATA_FILE

_REQUIRED_FIELDS = (
    "example_id",
    "question_index",
    "question_polarity",
    "context_condition",
    "category",
    "answer_info",
    "context",
    "question",
    "ans0",
    "ans1",
    "ans2",
    "label",
)

MAX_FIELD_CHARS = 131_072
"""Longest JSONL line or CSV field accepted (the csv module's default field limit); BBQ's
longest line has about 1,300 characters."""
INT64_MAX = 2**63 - 1
"""Largest id accepted: ids are stored as 64-bit integers in tables and files."""
MAX_MISSING_METADATA = 0.01
"""Largest share of items without a row in ``additional_metadata.csv`` (none in BBQ)."""


def line_error(path: Path | str, line: int, msg: str) -> DataError:
    return DataError(f"{path}:{line}: {msg}")


def as_id(value: object, *, allow_str: bool = True) -> int | None:
    """``value`` as an id in ``[0, 2**63)``: an int (not a bool) or, with ``allow_str``, a
    string of ASCII digits; None for anything else (floats such as ``1e20``, ``true``, ``-1``,
    ``1_000``, numbers too big for 64 bits)."""
    if type(value) is int:
        number = value
    elif allow_str and isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 19:
            return None
        number = int(text)
    else:
        return None
    return number if 0 <= number <= INT64_MAX else None


def decode_utf8(data: bytes, path: Path | str, *, kind: Literal["csv", "jsonl", "text"]) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark is dropped).

    Raises:
        DataError: invalid UTF-8, naming file, line and (when the ``kind`` of file lets the
            record be read with the bad bytes escaped) the field; ``text`` names no field.
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        field_of = _csv_field_with_surrogate if kind == "csv" else _json_field_with_surrogate
        try:
            text = data.decode("utf-8", errors="surrogateescape")
            field = field_of(text, line) if kind != "text" else None
        except (ValueError, RecursionError, csv.Error):
            field = None
        where = f"field {field!r}" if field else "the line"
        raise line_error(
            path,
            line,
            f"{where} is not valid UTF-8 ({exc.reason} at byte {column} of the line); "
            "expected UTF-8 text (fetch the file again, or re-save it as UTF-8)",
        ) from None


def load_json_line(line: str, path: Path | str, lineno: int, *, hint: str = "") -> Any:
    """One JSONL line, bounded in length and depth.

    Raises:
        DataError: naming file and line (and the field, for an over-long one).
    """
    if len(line) > MAX_FIELD_CHARS:
        raise line_error(path, lineno, _too_long(line))
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise line_error(
            path, lineno, f"malformed JSON: {exc.msg} at column {exc.colno}{hint}"
        ) from None
    except RecursionError:
        raise line_error(path, lineno, "JSON nested too deeply; expected a flat record") from None
    except ValueError:  # an integer literal of thousands of digits
        raise line_error(path, lineno, "malformed JSON: a number with too many digits") from None


def _too_long(line: str) -> str:
    limit = f"expected at most {MAX_FIELD_CHARS:,}"
    try:
        name, text = max(_strings(json.loads(line)), key=lambda kv: len(kv[1]))
    except (ValueError, RecursionError):
        return f"line is {len(line):,} characters long; {limit}"
    if len(text) > MAX_FIELD_CHARS:
        return f"field {name!r} is {len(text):,} characters long; {limit}"
    return f"line is {len(line):,} characters long; {limit}"


def _strings(obj: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """Every string in a JSON value (keys too), with its path (``answer_info.ans0[1]``)."""
    if isinstance(obj, str):
        yield prefix or "(value)", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else str(key)
            yield name, key
            yield from _strings(value, name)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _strings(value, f"{prefix}[{i}]")


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters for a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _json_field_with_surrogate(text: str, line: int) -> str | None:
    """The field of JSONL line ``line`` holding an undecodable byte (surrogate-escaped)."""
    rec = json.loads(text.split("\n")[line - 1])
    return next((name for name, s in _strings(rec) if _has_surrogate(s)), None)


def parse_items_jsonl(
    data: bytes, path: Path | str, *, expected_category: str | None = None
) -> list[dict[str, Any]]:
    """Parse and validate one BBQ category file (bytes, LF endings).

    Returns raw field dictionaries (validated, with answers and unknown_loc
    resolved). Metadata joins happen in :func:`load_bbq`.

    Raises:
        DataError: naming file, line and field.
    """
    text = decode_utf8(data, path, kind="jsonl")
    lines = text.split("\n")
    truncated = bool(lines) and lines[-1] != ""
    rows: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        hint = ""
        if truncated and lineno == len(lines):
            hint = " (the file ends mid-line: it looks truncated; fetch it again)"
        rec = load_json_line(line, path, lineno, hint=hint)
        if not isinstance(rec, dict):
            raise line_error(path, lineno, f"expected a JSON object, found {type(rec).__name__}")
        for name in _REQUIRED_FIELDS:
            if name not in rec:
                raise line_error(path, lineno, f"missing field {name!r}")
        rows.append(validate_record(rec, path, lineno, expected_category, seen))
    if not rows:
        raise DataError(f"{path}: no items (the file is empty)")
    return rows


def validate_record(
    rec: dict[str, Any],
    path: Path | str,
    lineno: int,
    expected_category: str | None,
    seen: dict[int, int],
) -> dict[str, Any]:
    """One BBQ record (a JSON object with every required field) as the item fields it gives.

    ``seen`` maps the example ids read so far to their lines (updated here).

    Raises:
        DataError: naming file, line and field.
    """
    cat = rec["category"]
    if cat not in CATEGORIES:
        near = difflib.get_close_matches(str(cat), CATEGORIES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise line_error(
            path, lineno, f"field 'category'={short_repr(cat)} is not a BBQ category{hint}"
        )
    if expected_category is not None and cat != expected_category:
        raise line_error(
            path, lineno, f"field 'category'={short_repr(cat)} in the file of {expected_category!r}"
        )
    eid, qidx = _record_ids(rec, path, lineno, seen)
    ctx = rec["context_condition"]
    if ctx not in CONTEXTS:
        raise line_error(
            path,
            lineno,
            f"field 'context_condition'={short_repr(ctx)}; expected 'ambig' or 'disambig'",
        )
    pol = rec["question_polarity"]
    if pol not in POLARITIES:
        raise line_error(
            path, lineno, f"field 'question_polarity'={short_repr(pol)}; expected 'neg' or 'nonneg'"
        )
    label = rec["label"]
    if not isinstance(label, int) or isinstance(label, bool) or label not in (0, 1, 2):
        raise line_error(path, lineno, f"field 'label'={short_repr(label)}; expected 0, 1 or 2")
    for name in ("context", "question", "ans0", "ans1", "ans2"):
        if not isinstance(rec[name], str):
            raise line_error(
                path, lineno, f"field {name!r}={short_repr(rec[name])}; expected a string"
            )
    groups = _answer_groups(rec["answer_info"], path, lineno)
    unknown = [i for i, g in enumerate(groups) if g == "unknown"]
    if len(unknown) != 1:
        raise line_error(
            path,
            lineno,
            f"field 'answer_info' tags {len(unknown)} answers as 'unknown'; expected exactly one",
        )
    meta = rec.get("additional_metadata") or {}
    if not isinstance(meta, dict):
        raise line_error(
            path, lineno, f"field 'additional_metadata'={short_repr(meta)}; expected an object"
        )
    sg = meta.get("stereotyped_groups") or []
    if isinstance(sg, str):
        sg = [sg]
    sub = meta.get("subcategory")
    return {
        "category": cat,
        "example_id": eid,
        "question_index": qidx,
        "context_condition": ctx,
        "question_polarity": pol,
        "context": rec["context"],
        "question": rec["question"],
        "answers": (rec["ans0"], rec["ans1"], rec["ans2"]),
        "answer_groups": groups,
        "label": label,
        "unknown_loc": unknown[0],
        "stereotyped_groups": tuple(str(g) for g in sg),
        "subcategory": None if sub in (None, "", "None") else str(sub),
        "_line": lineno,
    }


def _record_ids(
    rec: dict[str, Any], path: Path | str, lineno: int, seen: dict[int, int]
) -> tuple[int, int]:
    """A record's ``example_id`` (unique in its file; ``seen`` is updated) and
    ``question_index``, both integers in ``[0, 2**63)``."""
    eid = as_id(rec["example_id"], allow_str=False)
    if eid is None:
        raise line_error(
            path,
            lineno,
            f"field 'example_id'={short_repr(rec['example_id'])}; expected an integer in "
            "[0, 2**63) (a JSON number without fraction or exponent)",
        )
    if eid in seen:
        raise line_error(path, lineno, f"field 'example_id'={eid} repeats line {seen[eid]}")
    seen[eid] = lineno
    qidx = as_id(rec["question_index"])
    if qidx is None:
        raise line_error(
            path,
            lineno,
            f"field 'question_index'={short_repr(rec['question_index'])}; expected an integer in "
            "[0, 2**63) (a number or a string of digits)",
        )
    return eid, qidx


def _answer_groups(info: Any, path: Path | str, lineno: int) -> tuple[str, str, str]:
    """The group tag of each answer, from ``answer_info`` (``{"ans0": [text, group], ...}``)."""
    groups: list[str] = []
    for i in range(3):
        entry = info.get(f"ans{i}") if isinstance(info, dict) else None
        if not isinstance(entry, list) or len(entry) < 2 or not isinstance(entry[1], str):
            raise line_error(
                path,
                lineno,
                f"field 'answer_info.ans{i}'={short_repr(entry)}; expected [text, group]",
            )
        groups.append(entry[1])
    return (groups[0], groups[1], groups[2])


@dataclass(frozen=True, slots=True)
class _Meta:
    target_loc: int | None
    label_type: LabelType | None
    line: int


def parse_metadata_csv(data: bytes, path: Path | str) -> dict[tuple[str, int], _Meta]:
    """Parse ``additional_metadata.csv`` into ``(category, example_id) -> metadata``.

    Duplicated keys (64 in the official file) must agree on ``target_loc`` and
    ``label_type``; they differ only in free-text columns. ``NA`` target
    locations (16 rows) become None. A leading byte-order mark is accepted.

    Raises:
        DataError: naming file, line and field (invalid UTF-8, over-long or malformed
            fields, bad values).
    """
    text = decode_utf8(data, path, kind="csv")
    needed = ("category", "example_id", "target_loc", "label_type")
    out: dict[tuple[str, int], _Meta] = {}
    for line, row in csv_rows(text, path, needed):
        if None in row or any(row[c] is None for c in needed):
            raise line_error(path, line, "wrong number of fields (the file may be truncated)")
        cat = row["category"]
        if cat not in CATEGORIES:
            raise line_error(
                path, line, f"field 'category'={short_repr(cat)} is not a BBQ category"
            )
        eid = as_id(row["example_id"])
        if eid is None:
            raise line_error(
                path,
                line,
                f"field 'example_id'={short_repr(row['example_id'])}; expected an integer in [0, 2**63)",
            )
        tl_raw = row["target_loc"].strip()
        if tl_raw in ("NA", ""):
            tl: int | None = None
        elif tl_raw in ("0", "1", "2"):
            tl = int(tl_raw)
        else:
            raise line_error(
                path, line, f"field 'target_loc'={short_repr(tl_raw)}; expected 0, 1, 2 or NA"
            )
        lt_raw = row["label_type"].strip()
        if lt_raw not in ("name", "label"):
            raise line_error(
                path, line, f"field 'label_type'={short_repr(lt_raw)}; expected 'name' or 'label'"
            )
        meta = _Meta(tl, cast(LabelType, lt_raw), line)
        prev = out.get((cat, eid))
        if prev is not None and (prev.target_loc, prev.label_type) != (tl, meta.label_type):
            raise line_error(
                path,
                line,
                f"{cat} example {eid} repeats line {prev.line} with a different "
                f"target_loc/label_type ({tl}/{lt_raw} vs {prev.target_loc}/{prev.label_type})",
            )
        if prev is None:
            out[(cat, eid)] = meta
    return out


def csv_rows(
    text: str, path: Path | str, needed: Sequence[str], *, delimiter: str = ","
) -> Iterator[tuple[int, dict[str | Any, Any]]]:
    """``(line, row)`` for every record of a CSV text whose header has the ``needed`` columns;
    ``line`` is the line the record starts on. A tab ``delimiter`` reads a TSV file, where
    quotes are plain text.

    Raises:
        DataError: a missing column, or a malformed or over-long field, naming file and line
            (and the field, where it can be told).
    """
    if delimiter == "\t":
        reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    start = 1
    try:
        header = reader.fieldnames or []
        missing = [c for c in needed if c not in header]
        if missing:
            raise line_error(
                path, 1, f"missing column(s) {', '.join(map(repr, missing))} in header"
            )
        start = 2
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        at = max(reader.reader.line_num, start)  # the line being read when it failed
        if "field limit" in str(exc):
            record = "\n".join(text.split("\n")[start - 1 : at])
            index = _long_field_index(record)
            names = reader.fieldnames if start > 1 else None
            where = "a field"
            if index is not None and names and index < len(names):
                where = f"field {names[index]!r}"
            raise line_error(
                path,
                start,
                f"{where} is longer than {csv.field_size_limit():,} characters; expected short "
                "CSV fields",
            ) from None
        raise line_error(path, at, f"malformed CSV: {exc}") from None


def field_count(row: Mapping[str | None, Any]) -> int:
    """The fields of a :func:`csv_rows` row as read: the header's, less those missing, plus
    any beyond the header."""
    extra = row.get(None) or ()
    return sum(v is not None for k, v in row.items() if k is not None) + len(extra)


def _long_field_index(record: str) -> int | None:
    """Position of the first field of a CSV record longer than the csv module's limit."""
    limit = csv.field_size_limit()
    pos, index, n = 0, 0, len(record)
    while pos <= n:
        end = pos
        if record.startswith('"', pos):
            end = pos + 1
            while 0 <= end < n:
                end = record.find('"', end)
                if end < 0 or not record.startswith('""', end):
                    break
                end += 2
            end = n if end < 0 else end + 1
        comma = record.find(",", end)
        comma = n if comma < 0 else comma
        if comma - pos > limit:
            return index
        index, pos = index + 1, comma + 1
    return None


def _csv_field_with_surrogate(text: str, line: int) -> str | None:
    """The column of the first CSV field holding an undecodable byte (surrogate-escaped)."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, [])
    if any(map(_has_surrogate, header)):
        return "header"
    for row in reader:
        for name, value in zip(header, row, strict=False):
            if _has_surrogate(value):
                return name
        if reader.line_num >= line:
            break
    return None


def parse_all(
    blobs: Mapping[str, bytes], found: Mapping[str, Path], cats: Sequence[str]
) -> list[BBQItem]:
    """Parse the metadata and every category file, and join them into items.

    Raises:
        DataError: naming file, line and field; also a ``target_loc`` that points at the
            item's "unknown" answer.
    """
    meta = parse_metadata_csv(blobs[METADATA_FILE], found[METADATA_FILE])
    items: list[BBQItem] = []
    for cat in cats:
        name = f"{cat}.jsonl"
        for rec in parse_items_jsonl(blobs[name], found[name], expected_category=cat):
            line = rec.pop("_line")
            m = meta.get((cat, rec["example_id"]))
            flags: list[str] = []
            if m is None:
                flags.append("metadata_missing")
                target, ltype = None, None
            else:
                target, ltype = m.target_loc, m.label_type
                if target is None:
                    flags.append("target_loc_na")
                elif target == rec["unknown_loc"]:
                    raise DataError(
                        f"{found[METADATA_FILE]}:{m.line}: target_loc={target} of {cat} example "
                        f"{rec['example_id']} is its 'unknown' answer ({found[name]}:{line})"
                    )
            items.append(BBQItem(**rec, target_loc=target, label_type=ltype, flags=tuple(flags)))
    _check_metadata_coverage(items, cats, found[METADATA_FILE])
    scenarios = assign_scenarios((it.category, it.question_index, it.question) for it in items)
    return [
        dataclasses.replace(it, scenario=scenarios[(it.category, it.question_index)])
        for it in items
    ]


def _check_metadata_coverage(items: Sequence[BBQItem], cats: Sequence[str], path: Path) -> None:
    """Refuse a metadata file that lacks a whole category or more than 1 % of the items.

    The pinned file has a row for every item; this catches a truncated or foreign file
    accepted with ``allow_unverified``.
    """
    missing = Counter(it.category for it in items if "metadata_missing" in it.flags)
    if not missing:
        return
    total = Counter(it.category for it in items)
    whole = [c for c in cats if total[c] and missing[c] == total[c]]
    n_missing = sum(missing.values())
    if not whole and n_missing <= MAX_MISSING_METADATA * len(items):
        return
    which = f", every item of {', '.join(whole)}" if whole else ""
    raise DataError(
        f"{path}: no metadata row for {n_missing:,} of {len(items):,} items{which}; expected a "
        f"row per item (at most {MAX_MISSING_METADATA:.0%} missing): the file looks truncated "
        f"or is not BBQ's {METADATA_FILE}; fetch it again with `spillover data fetch --force`"
    )
