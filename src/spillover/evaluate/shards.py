"""Resumable evaluations: shards of finished chunks, and the parts of a data-parallel run.

While an evaluation runs, finished chunks are written as shards beside the output, so an
interrupted run resumes where it stopped and ends with the same file an uninterrupted run
writes. The tables are written and read through :mod:`spillover.predictions`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .._io import atomic_write_json
from ..errors import ConfigError, DataError
from ..predictions import BBQ, RecordKind, read_metadata, read_table, write_table

if TYPE_CHECKING:

    class Keyed(Protocol):
        """An item with an identity (a BBQ item or a probe benchmark's)."""

        @property
        def key(self) -> tuple[str | int, ...]: ...


logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".shards"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def items_digest(items: Sequence[Keyed]) -> str:
    """SHA-256 of the (ordered) item keys, identifying an item selection (BBQ's
    ``(category, example_id)``, a probe benchmark's ``(benchmark, item_id)``)."""
    text = "\n".join("\t".join(map(str, it.key)) for it in items)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def shard_dir(out: str | Path) -> Path:
    """Folder of the in-progress shards of an output file."""
    p = Path(out)
    return p.with_name(p.name + SHARD_SUFFIX)


def open_shards(folder: Path, manifest: dict[str, Any]) -> None:
    """Start or resume the shard folder of an evaluation.

    Raises:
        ConfigError: the folder holds shards of a run with another configuration.
    """
    path = folder / MANIFEST
    if folder.is_dir() and path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            found = None
        if found != manifest:
            diff = _describe_diff(found, manifest)
            raise ConfigError(
                f"{folder}: shards of an earlier run with a different configuration ({diff}); "
                "rerun with the same options to resume, or delete that folder to start over"
            )
        logger.info("resuming from %s", folder)
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest)


def _describe_diff(found: Any, want: Mapping[str, Any]) -> str:
    if not isinstance(found, dict):
        return "unreadable manifest"
    diffs: list[str] = []
    for key in sorted(set(found) | set(want)):
        a, b = found.get(key), want.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: was {a.get(sub)!r}, now {b.get(sub)!r}")
        elif key == "items_sha256":
            diffs.append("a different item selection")
        else:
            diffs.append(f"{key}: was {a!r}, now {b!r}")
    return "; ".join(diffs[:3]) or "manifest differs"


def write_shard(path: Path, table: Any, stats: Mapping[str, int], items_sha256: str) -> None:
    """Write one finished chunk atomically, with its scorer counters and the digest of the
    item keys it was made for (:func:`items_digest` of the chunk) in the metadata."""
    write_table(table, path, {"stats": dict(stats), "items_sha256": items_sha256})


def read_shard(
    path: Path, chunk: Sequence[Keyed], rows_per_item: int, kind: RecordKind = BBQ
) -> tuple[Any, dict[str, int]] | None:
    """A finished shard's table and scorer counters, or None when it must be recomputed.

    A shard is reused only when it was written for exactly this chunk (the item digest
    in its metadata), with the schema of ``kind``, and its rows hold exactly these items,
    ``rows_per_item`` rows each: a shard copied from another chunk or another run, or
    edited, is scored again.
    """
    try:
        table, meta = read_table(path)
        stats = {str(k): int(v) for k, v in dict(meta.get("stats", {})).items()}
    except Exception:  # a damaged shard is recomputed
        logger.warning("%s: unreadable shard, recomputing it", path)
        return None
    # a row's key as its item names it: BBQ's (category, example_id), a probe's item_id
    expected = Counter({tuple(it.key[-len(kind.key) :]): rows_per_item for it in chunk})
    if (
        table.num_rows != len(chunk) * rows_per_item
        or table.schema != kind.arrow_schema()
        or meta.get("items_sha256") != items_digest(chunk)
        or Counter(zip(*(table.column(c).to_pylist() for c in kind.key), strict=True)) != expected
    ):
        logger.warning("%s: shard of other items or damaged, recomputing it", path)
        return None
    return table, stats


# --------------------------------------------------------------------------- data-parallel parts


def part_path(out: str | Path, index: int, count: int) -> Path:
    """File one process of a data-parallel evaluation writes its share to."""
    out = Path(out)
    return out.with_name(f"{out.name}.part{index:03d}-of-{count:03d}.parquet")


def merge_prediction_files(parts: Sequence[Path], out: str | Path) -> Path:
    """Merge the per-process files of a data-parallel evaluation into one.

    The parts hold consecutive blocks of the same sorted item list, so
    concatenating them in process order gives the single-process row order.
    Metadata is taken from the first part with row counts, item digest and
    scorer statistics recomputed over all parts. The parts are removed
    after the merged file is written (atomically).

    Raises:
        DataError: a part is missing or was made with another configuration.
    """
    import pyarrow as pa

    tables, metas = [], []
    for p in parts:
        if not p.is_file():
            raise DataError(f"{p}: part of a data-parallel evaluation is missing")
        tables.append(read_table(p)[0])
        metas.append(read_metadata(p))
    first = metas[0]
    for p, m in zip(parts[1:], metas[1:], strict=True):
        if m.get("config") != first.get("config") or m.get("model") != first.get("model"):
            raise DataError(f"{p}: made with another configuration or model than {parts[0]}")
    full = pa.concat_tables(tables)
    stats: dict[str, int] = {}
    for m in metas:
        for k, v in (m.get("scorer_stats") or {}).items():
            stats[k] = stats.get(k, 0) + int(v)
    # unique keys in row order (rows of one item are adjacent): what items_digest hashes
    keys = list(
        dict.fromkeys(
            zip(
                full.column("category").to_pylist(),
                full.column("example_id").to_pylist(),
                strict=True,
            )
        )
    )
    meta = {
        **first,
        "n_items": sum(int(m.get("n_items", 0)) for m in metas),
        "n_rows": full.num_rows,
        "items_sha256": canonical_keys_digest(keys),
        "scorer_stats": stats,
        "processes": len(parts),
    }
    write_table(full, Path(out), meta)
    for p in parts:
        p.unlink()
    return Path(out)


def canonical_keys_digest(keys: Iterable[tuple[str, int]]) -> str:
    """SHA-256 of ordered ``(category, example_id)`` keys, as :func:`items_digest` computes it."""
    text = "\n".join(f"{c}\t{e}" for c, e in keys)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
