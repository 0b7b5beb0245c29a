"""Parsing and validating BBQ's files: the category JSONL files and ``additional_metadata.csv``."""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

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


def line_error(path: Path | str, line: int, msg: str) -> DataError:
    return DataError(f"{path}:{line}: {msg}")


def parse_items_jsonl(
    data: bytes, path: Path | str, *, expected_category: str | None = None
) -> list[dict[str, Any]]:
    """Parse and validate one BBQ category file (bytes, LF endings).

    Returns raw field dictionaries (validated, with answers and unknown_loc
    resolved). Metadata joins happen in :func:`load_bbq`.

    Raises:
        DataError: naming file, line and field.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[: exc.start].count(b"\n") + 1
        raise line_error(path, bad, f"not valid UTF-8 ({exc.reason})") from None
    lines = text.split("\n")
    truncated = bool(lines) and lines[-1] != ""
    rows: list[dict[str, Any]] = []
    seen: dict[int, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ""
            if truncated and lineno == len(lines):
                hint = " (the file ends mid-line: it looks truncated; fetch it again)"
            raise line_error(
                path, lineno, f"malformed JSON: {exc.msg} at column {exc.colno}{hint}"
            ) from None
        if not isinstance(rec, dict):
            raise line_error(path, lineno, f"expected a JSON object, found {type(rec).__name__}")
        for name in _REQUIRED_FIELDS:
            if name not in rec:
                raise line_error(path, lineno, f"missing field {name!r}")
        rows.append(_validate_record(rec, path, lineno, expected_category, seen))
    if not rows:
        raise DataError(f"{path}: no items (the file is empty)")
    return rows


def _validate_record(
    rec: dict[str, Any],
    path: Path | str,
    lineno: int,
    expected_category: str | None,
    seen: dict[int, int],
) -> dict[str, Any]:
    cat = rec["category"]
    if cat not in CATEGORIES:
        near = difflib.get_close_matches(str(cat), CATEGORIES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise line_error(path, lineno, f"field 'category'={cat!r} is not a BBQ category{hint}")
    if expected_category is not None and cat != expected_category:
        raise line_error(
            path, lineno, f"field 'category'={cat!r} in the file of {expected_category!r}"
        )
    eid = rec["example_id"]
    if not isinstance(eid, int) or isinstance(eid, bool) or eid < 0:
        raise line_error(
            path, lineno, f"field 'example_id'={eid!r}; expected a non-negative integer"
        )
    if eid in seen:
        raise line_error(path, lineno, f"field 'example_id'={eid} repeats line {seen[eid]}")
    seen[eid] = lineno
    try:
        qidx = int(rec["question_index"])
    except (TypeError, ValueError):
        raise line_error(
            path, lineno, f"field 'question_index'={rec['question_index']!r}; expected an integer"
        ) from None
    ctx = rec["context_condition"]
    if ctx not in CONTEXTS:
        raise line_error(
            path, lineno, f"field 'context_condition'={ctx!r}; expected 'ambig' or 'disambig'"
        )
    pol = rec["question_polarity"]
    if pol not in POLARITIES:
        raise line_error(
            path, lineno, f"field 'question_polarity'={pol!r}; expected 'neg' or 'nonneg'"
        )
    label = rec["label"]
    if not isinstance(label, int) or isinstance(label, bool) or label not in (0, 1, 2):
        raise line_error(path, lineno, f"field 'label'={label!r}; expected 0, 1 or 2")
    for name in ("context", "question", "ans0", "ans1", "ans2"):
        if not isinstance(rec[name], str):
            raise line_error(path, lineno, f"field {name!r}={rec[name]!r}; expected a string")
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
        raise line_error(path, lineno, f"field 'additional_metadata'={meta!r}; expected an object")
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


def _answer_groups(info: Any, path: Path | str, lineno: int) -> tuple[str, str, str]:
    """The group tag of each answer, from ``answer_info`` (``{"ans0": [text, group], ...}``)."""
    groups: list[str] = []
    for i in range(3):
        entry = info.get(f"ans{i}") if isinstance(info, dict) else None
        if not isinstance(entry, list) or len(entry) < 2 or not isinstance(entry[1], str):
            raise line_error(
                path, lineno, f"field 'answer_info.ans{i}'={entry!r}; expected [text, group]"
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
    locations (16 rows) become None.
    """
    text = data.decode("utf-8", errors="strict")
    reader = csv.DictReader(io.StringIO(text))
    needed = ("category", "example_id", "target_loc", "label_type")
    missing = [c for c in needed if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(map(repr, missing))} in header")
    out: dict[tuple[str, int], _Meta] = {}
    start = 2
    for row in reader:
        line = start
        start = reader.line_num + 1
        if None in row or any(row[c] is None for c in needed):
            raise line_error(path, line, "wrong number of fields (the file may be truncated)")
        cat = row["category"]
        if cat not in CATEGORIES:
            raise line_error(path, line, f"field 'category'={cat!r} is not a BBQ category")
        try:
            eid = int(row["example_id"])
        except ValueError:
            raise line_error(
                path, line, f"field 'example_id'={row['example_id']!r}; expected an integer"
            ) from None
        tl_raw = row["target_loc"].strip()
        if tl_raw in ("NA", ""):
            tl: int | None = None
        elif tl_raw in ("0", "1", "2"):
            tl = int(tl_raw)
        else:
            raise line_error(path, line, f"field 'target_loc'={tl_raw!r}; expected 0, 1, 2 or NA")
        lt_raw = row["label_type"].strip()
        if lt_raw not in ("name", "label"):
            raise line_error(
                path, line, f"field 'label_type'={lt_raw!r}; expected 'name' or 'label'"
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
    scenarios = assign_scenarios((it.category, it.question_index, it.question) for it in items)
    return [
        dataclasses.replace(it, scenario=scenarios[(it.category, it.question_index)])
        for it in items
    ]
