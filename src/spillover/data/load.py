"""Loading BBQ: the verified item set, its provenance, the parsed-items cache and a summary."""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import gc
import hashlib
import itertools
import json
import logging
import operator
import os
import random
import stat
import struct
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .items import CATEGORIES, CONTEXTS, ITEM_FRAME_COLUMNS, POLARITIES, BBQItem, resolve_categories
from .parse import as_id, parse_all, validate_record
from .sources import (
    ENV_BBQ_DIR,
    METADATA_FILE,
    DownloadProgress,
    FileCheck,
    SourceKind,
    bbq_cache_dir,
    fetch_bbq,
    locate_files,
    needed_files,
    read_checked,
)

logger = logging.getLogger(__name__)


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
        self._index.update({(it.category, it.example_id): it for it in self.items})

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
        for col in ("example_id", "question_index", "label", "unknown_loc", "scenario"):
            df[col] = df[col].astype("int64")
        return df


@dataclass(frozen=True, slots=True)
class BBQSource:
    """Where BBQ is read from; the ``bbq`` section of a run config, ``--bbq-dir`` & co. on
    the command line."""

    dir: str | None = None
    """BBQ folder (flat or upstream layout); default: ``$SPILLOVER_BBQ_DIR``, then the cache,
    then a download."""
    cache_dir: str | None = None
    """Cache root (BBQ in ``<root>/bbq``, models in ``<root>/models``); default:
    ``$SPILLOVER_CACHE`` or ``~/.cache/spillover``."""
    allow_unverified: bool = False
    """Accept files whose SHA-256 differs from the pinned release (a warning is recorded in
    every output made from them)."""

    def load(
        self,
        *,
        categories: Iterable[str] | None = None,
        fetch: bool = True,
        progress: DownloadProgress | None = None,
    ) -> BBQData:
        """:func:`load_bbq` from this source."""
        return load_bbq(
            self.dir,
            cache_dir=self.cache_dir,
            categories=categories,
            allow_unverified=self.allow_unverified,
            fetch=fetch,
            progress=progress,
        )


def load_bbq(
    bbq_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    categories: Iterable[str] | None = None,
    allow_unverified: bool = False,
    fetch: bool = True,
    progress: DownloadProgress | None = None,
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
    needed = needed_files(cats)
    explicit = bbq_dir if bbq_dir is not None else os.environ.get(ENV_BBQ_DIR) or None
    if explicit is not None:
        root = Path(explicit).expanduser()
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "BBQ folder does not exist"
            if root.is_symlink() and not root.exists():
                what = "BBQ folder is a broken symlink or a symlink loop"
            raise DataError(f"{root}: {what}; expected the folder holding BBQ's files")
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


_PARSED_FORMAT = 3
"""Version of the parsed-items cache layout; bump when parsing or :class:`BBQItem` changes."""
_PARSED_MAGIC = b"spillover parsed BBQ\n"
_PARSED_HEADER = struct.Struct(">Q32s")
"""After the magic line: the payload's length and the SHA-256 of the entry key + payload."""
_PARSED_MAX_BYTES = 64 << 20
"""Largest entry read (all of BBQ takes about 15 MB)."""
_KINDS: Mapping[str, str] = {
    "category": "str",
    "example_id": "int",
    "question_index": "int",
    "context_condition": "str",
    "question_polarity": "str",
    "context": "str",
    "question": "str",
    "answers": "tuple",
    "answer_groups": "tuple",
    "label": "int",
    "unknown_loc": "int",
    "target_loc": "loc?",
    "label_type": "str?",
    "stereotyped_groups": "tuple",
    "subcategory": "str?",
    "flags": "tuple",
    "scenario": "int",
}
"""How each :class:`BBQItem` field is stored, as one int64 per item: the number itself
(``int``; ``loc?``: 0, 1, 2 or -1 for None), or its index in the entry's table of strings
(``str``; ``str?``: -1 for None) or of string tuples (``tuple``)."""
_SECTIONS = len(_KINDS) + 4
"""A section per field, then: tuple sizes, tuple members, string ends, the strings' text."""
_LOCS = (0, 1, 2, None)
_FLAGS = frozenset({"target_loc_na", "metadata_missing"})
_SPOT_RECORDS = 256
"""Source records re-parsed and compared with a cache entry on every read (and a quarter as
many metadata rows)."""
_JSONL_FIELDS = (
    "category",
    "example_id",
    "question_index",
    "context_condition",
    "question_polarity",
    "context",
    "question",
    "answers",
    "answer_groups",
    "label",
    "unknown_loc",
    "stereotyped_groups",
    "subcategory",
)
"""The item fields that come from a category file alone."""


def _parsed_key(checks: Sequence[FileCheck], cats: Sequence[str]) -> bytes:
    """What a parsed-cache entry is made from: the files' SHA-256 digests (already computed to
    verify them), the categories, the cache layout and the byte order of its numbers."""
    return json.dumps(
        [
            _PARSED_FORMAT,
            sys.byteorder,
            list(cats),
            list(_KINDS.items()),
            sorted((c.name, c.sha256) for c in checks),
        ]
    ).encode()


def _parsed_cache_path(cache_root: Path, key: bytes) -> Path:
    """Where the parsed items of exactly these file contents are cached.

    The name is a digest of the entry key, so a changed file or a new release can never be
    served stale items.
    """
    return cache_root / "parsed" / f"{hashlib.sha256(key).hexdigest()[:32]}.items"


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic collector while ~60,000 acyclic objects are built (twice as fast)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _read_parsed(
    path: Path, key: bytes, cats: Sequence[str], blobs: Mapping[str, bytes]
) -> tuple[list[BBQItem] | None, str]:
    """Items from the parsed cache, or None and why not ("" when there is no entry).

    An entry (int64 arrays and one string table; nothing in it is code, and nothing it
    says can make the reader allocate more than the entry's size) loads the 58,492 items
    several times faster than parsing and validating the JSONL again. It is used only when
    it is a private regular file of at most :data:`_PARSED_MAX_BYTES`; its header's length
    and SHA-256 (over the entry key, which binds it to the source files' digests, and the
    payload) match; every field holds values the parser makes, with as many items per
    category as the category file has records; and randomly drawn records of the source
    files, parsed again, agree with it.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        return None, "a symlink" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if os.name == "posix" and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
            return None, "owned or writable by another user"
        if st.st_size > _PARSED_MAX_BYTES:
            return None, f"{st.st_size:,} bytes, more than the {_PARSED_MAX_BYTES:,} accepted"
        with os.fdopen(fd, "rb", closefd=False) as fh:
            blob = fh.read(_PARSED_MAX_BYTES + 1)
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    finally:
        os.close(fd)
    start = len(_PARSED_MAGIC) + _PARSED_HEADER.size
    if len(blob) < start or not blob.startswith(_PARSED_MAGIC):
        return None, "not a parsed-BBQ entry"
    size, digest = _PARSED_HEADER.unpack_from(blob, len(_PARSED_MAGIC))
    payload = memoryview(blob)[start:]
    if size != len(payload):
        return None, f"{len(payload):,} bytes of content where its header says {size:,}"
    check = hashlib.sha256(key)
    check.update(payload)
    if check.digest() != digest:
        return None, "content does not match its SHA-256"
    counts = {cat: _count_records(blobs[f"{cat}.jsonl"]) for cat in cats}
    with _gc_paused():
        col, why = _decode_items(payload, sum(counts.values()))
    if col is None:
        return None, why
    why = _check_items(col, cats, counts)
    if why:
        return None, why
    index = dict(zip(zip(col["category"], col["example_id"], strict=True), itertools.count()))
    if len(index) != len(col["category"]):
        return None, "an item (category, example_id) repeats"
    why = _spot_check(col, index, cats, blobs)
    if why:
        return None, why
    with _gc_paused():
        return list(map(BBQItem, *(col[name] for name in _KINDS))), ""


def _count_records(blob: bytes) -> int:
    """The records of a JSONL file: its lines, less blank ones at the start and end (a file
    with a blank line between records is never cached, see :func:`_cacheable`)."""
    body = blob.strip()
    return body.count(b"\n") + 1 if body else 0


def _encode_items(items: Sequence[BBQItem]) -> bytes:
    """The payload of a cache entry: see :data:`_KINDS` and :data:`_SECTIONS`."""
    strings: dict[str, int] = {}
    tuples: dict[tuple[str, ...], int] = {}
    sections: list[bytes] = []
    for name, kind in _KINDS.items():
        values = list(map(operator.attrgetter(name), items))
        if kind in ("int", "loc?"):
            codes = [-1 if v is None else v for v in values]
        else:
            table: dict[Any, int] = tuples if kind == "tuple" else strings
            codes = [-1 if v is None else table.setdefault(v, len(table)) for v in values]
        sections.append(array("q", codes).tobytes())
    members = [strings.setdefault(s, len(strings)) for t in tuples for s in t]
    sections.append(array("q", map(len, tuples)).tobytes())
    sections.append(array("q", members).tobytes())
    sections.append(array("q", itertools.accumulate(map(len, strings))).tobytes())
    sections.append("".join(strings).encode("utf-8", "surrogatepass"))
    return array("q", map(len, sections)).tobytes() + b"".join(sections)


def _decode_items(payload: memoryview, n: int) -> tuple[dict[str, list[Any]] | None, str]:
    """The ``n`` items' values by field from an entry's payload, else None and why."""
    sizes = _numbers(payload[: 8 * _SECTIONS])
    if sizes is None or len(sizes) != _SECTIONS or min(sizes) < 0:
        return None, "content does not have the expected layout"
    if sum(sizes) != len(payload) - 8 * _SECTIONS:
        return None, "its sections do not add up to its size"
    parts, at = [], 8 * _SECTIONS
    for size in sizes:
        parts.append(payload[at : at + size])
        at += size
    try:
        text = str(parts[-1], "utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None, "its strings are not UTF-8"
    ends, members, tuple_sizes = _numbers(parts[-2]), _numbers(parts[-3]), _numbers(parts[-4])
    if ends is None or members is None or tuple_sizes is None:
        return None, "content does not have the expected layout"
    if ends and (ends[-1] != len(text) or not all(map(operator.le, [0, *ends], ends))):
        return None, "its string table is inconsistent"
    strings = list(map(text.__getitem__, map(slice, itertools.chain((0,), ends), ends)))
    if (tuple_sizes and min(tuple_sizes) < 0) or sum(tuple_sizes) != len(members):
        return None, "its tuple table is inconsistent"
    if members and (min(members) < 0 or max(members) >= len(strings)):
        return None, "its tuple table is inconsistent"
    flat = iter(list(map(strings.__getitem__, members)))
    tuples = [tuple(itertools.islice(flat, k)) for k in tuple_sizes]
    lookup: list[Any] = [*strings, None]  # code -1 reads None
    col: dict[str, list[Any]] = {}
    for (name, kind), part in zip(_KINDS.items(), parts, strict=False):
        codes = _numbers(part)
        if codes is None or len(codes) != n:
            return None, f"items do not match the {n:,} records of the category files"
        if kind == "int":
            col[name] = codes.tolist()
            continue
        table: Sequence[Any] = tuples if kind == "tuple" else _LOCS if kind == "loc?" else lookup
        low = -1 if kind.endswith("?") else 0
        high = 3 if kind == "loc?" else len(tuples) if kind == "tuple" else len(strings)
        if codes and (min(codes) < low or max(codes) >= high):
            return None, f"{name!r} holds a value the parser never makes"
        col[name] = list(map(table.__getitem__, codes))
    return col, ""


def _numbers(part: memoryview) -> array[int] | None:
    """``part`` as int64 numbers, or None when its size is not a multiple of 8."""
    if len(part) % 8:
        return None
    numbers = array("q")
    numbers.frombytes(part)
    return numbers


def _check_items(
    col: Mapping[str, list[Any]], cats: Sequence[str], counts: Mapping[str, int]
) -> str:
    """Why the decoded fields do not hold what :func:`parse_all` makes ("" when they do)."""
    expected = list(itertools.chain.from_iterable(itertools.repeat(c, counts[c]) for c in cats))
    if col["category"] != expected:
        return "items per category do not match the records of the category files"
    small = {0, 1, 2}
    problems = {
        "example_id": min(col["example_id"], default=0) < 0,
        "question_index": min(col["question_index"], default=0) < 0,
        "scenario": min(col["scenario"], default=0) < 0,
        "context_condition": not set(col["context_condition"]) <= set(CONTEXTS),
        "question_polarity": not set(col["question_polarity"]) <= set(POLARITIES),
        "answers": not set(map(len, col["answers"])) <= {3},
        "answer_groups": not set(map(len, col["answer_groups"])) <= {3},
        "label": not set(col["label"]) <= small,
        "unknown_loc": not set(col["unknown_loc"]) <= small
        or not set(map(operator.methodcaller("count", "unknown"), col["answer_groups"])) <= {1}
        or not set(map(operator.getitem, col["answer_groups"], col["unknown_loc"])) <= {"unknown"},
        "target_loc": any(map(operator.eq, col["target_loc"], col["unknown_loc"])),
        "label_type": not set(col["label_type"]) <= {"name", "label", None},
        "flags": not set(itertools.chain.from_iterable(col["flags"])) <= _FLAGS,
    }
    bad = [name for name, wrong in problems.items() if wrong]
    return f"{bad[0]!r} holds a value the parser never makes" if bad else ""


def _spot_check(
    col: Mapping[str, Sequence[Any]],
    index: Mapping[tuple[str, int], int],
    cats: Sequence[str],
    blobs: Mapping[str, bytes],
) -> str:
    """Re-parse randomly drawn records of the (verified) source files and compare them with
    the entry's items; "" when all agree, else what differs.

    An entry rewritten with a fresh digest but changed items (labels, texts, targets) is
    caught unless the change touches only a handful of items.
    """
    rng = random.Random(os.urandom(16))
    names = [f"{c}.jsonl" for c in cats]
    cum = list(itertools.accumulate(len(blobs[n]) for n in names))
    for k in rng.choices(range(len(names)), cum_weights=cum, k=_SPOT_RECORDS):
        line = _line_at(blobs[names[k]], rng)
        if not line.strip():
            continue
        try:
            rec = validate_record(json.loads(line), names[k], 0, cats[k], {})
        except (ValueError, DataError, KeyError, TypeError, AttributeError, RecursionError):
            return f"it does not match {names[k]}"
        pos = index.get((cats[k], rec["example_id"]))
        if pos is None:
            return f"it lacks {cats[k]} example {rec['example_id']} of {names[k]}"
        for name in _JSONL_FIELDS:
            if rec[name] != col[name][pos]:
                return (
                    f"its {cats[k]} example {rec['example_id']} differs from {names[k]} in {name!r}"
                )
    meta = blobs[METADATA_FILE].removeprefix(codecs.BOM_UTF8)
    header = next(csv.reader([meta[: meta.find(b"\n")].decode("utf-8", "replace")]), [])
    need = ("category", "example_id", "target_loc", "label_type")
    if not set(need) <= set(header):
        return f"{METADATA_FILE} has no such header"
    at = [header.index(c) for c in need]
    for _ in range(_SPOT_RECORDS // 4):
        text = _line_at(meta, rng).decode("utf-8", "replace")
        row = next(csv.reader([text]), [])
        if len(row) != len(header) or row[at[0]] not in cats:
            continue  # the header, a line inside a multi-line record, another category
        eid = as_id(row[at[1]])
        pos = index.get((row[at[0]], eid)) if eid is not None else None
        target = {"0": 0, "1": 1, "2": 2, "NA": None, "": None}.get(row[at[2]].strip(), -1)
        if pos is not None and (target, row[at[3]].strip()) != (
            col["target_loc"][pos],
            col["label_type"][pos],
        ):
            return f"its {row[at[0]]} example {row[at[1]]} differs from {METADATA_FILE}"
    return ""


def _line_at(blob: bytes, rng: random.Random) -> bytes:
    """The line of ``blob`` holding a randomly drawn byte."""
    at = rng.randrange(len(blob)) if blob else 0
    end = blob.find(b"\n", at)
    return blob[blob.rfind(b"\n", 0, at) + 1 : len(blob) if end < 0 else end]


def _write_parsed(path: Path, key: bytes, items: Sequence[BBQItem]) -> None:
    """Cache ``items`` at ``path``: a private file (0600) in a private folder (0700)."""
    folder = path.parent
    try:
        payload = _encode_items(items)
        digest = hashlib.sha256(key + payload).digest()
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(folder.stat().st_mode) != 0o700:
            os.chmod(folder, 0o700)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:  # mkstemp makes the file 0600
                fh.write(_PARSED_MAGIC + _PARSED_HEADER.pack(len(payload), digest) + payload)
            os.replace(tmp_name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        for old in folder.glob("*.marshal"):  # entries of the previous layout
            if len(old.stem) == 32:
                with contextlib.suppress(OSError):
                    old.unlink()
    except (OSError, OverflowError, UnicodeEncodeError) as exc:  # a cache only saves time
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
        blobs[name], check = read_checked(
            name, found[name], allow_unverified=allow_unverified, warnings=warnings
        )
        checks.append(check)
    if cache_root is None:
        items = parse_all(blobs, found, cats)
    else:
        items = _parse_cached(cache_root, checks, cats, blobs, found)
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


def _parse_cached(
    cache_root: Path,
    checks: Sequence[FileCheck],
    cats: Sequence[str],
    blobs: Mapping[str, bytes],
    found: Mapping[str, Path],
) -> list[BBQItem]:
    """The items from the parsed cache when its entry checks out, else parsed (and cached)."""
    key = _parsed_key(checks, cats)
    path = _parsed_cache_path(cache_root, key)
    items, why = _read_parsed(path, key, cats, blobs)
    if items is not None:
        return items
    if why:
        logger.warning(
            "ignoring the parsed-BBQ cache entry %s (%s); parsing the BBQ files again", path, why
        )
    items = parse_all(blobs, found, cats)
    if _cacheable(items, cats, blobs):
        _write_parsed(path, key, items)
    return items


def _cacheable(items: Sequence[BBQItem], cats: Sequence[str], blobs: Mapping[str, bytes]) -> bool:
    """Whether a cache entry of ``items`` would pass :func:`_check_entry`'s record counts
    (not so for a file with a blank line between records: it is parsed every time)."""
    per_cat = Counter(it.category for it in items)
    return all(per_cat[c] == _count_records(blobs[f"{c}.jsonl"]) for c in cats)


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
        row["scenarios"] = len({it.scenario for it in its})
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
