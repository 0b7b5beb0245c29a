"""Prediction files: the per-item schema, Parquet tables with provenance, resumable shards.

Output is a Parquet file with one row per item x permutation (schema in
``docs/predictions.md``); its key-value metadata holds the run's provenance. While an
evaluation runs, finished chunks are written as shards beside the output, so an
interrupted run resumes where it stopped and ends with the same file an uninterrupted
run writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_open, atomic_write_json
from ..data import BBQItem
from ..errors import ConfigError, DataError

logger = logging.getLogger(__name__)

METADATA_KEY = b"spillover"
"""Parquet key-value metadata key holding the run's provenance (JSON)."""

SHARD_SUFFIX = ".shards"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Prediction:
    """One scored item under one answer order."""

    category: str
    """BBQ category."""
    example_id: int
    """Example id within the category."""
    question_index: int
    """Template id."""
    context_condition: str
    """``ambig`` or ``disambig``."""
    question_polarity: str
    """``neg`` or ``nonneg``."""
    label_type: str | None
    """``name`` or ``label`` (None when metadata is missing)."""
    label: int
    """Index of the correct answer."""
    target_loc: int | None
    """Index of the biased answer; None when unknown."""
    unknown_loc: int
    """Index of the "unknown" answer."""
    permutation: str
    """Displayed answer order, e.g. ``"120"``: position j shows original answer int(permutation[j])."""
    pred_index: int
    """Predicted answer, as an ORIGINAL answer index."""
    displayed_pred: int
    """Displayed position of the predicted answer (for position bias)."""
    score_0: float
    """Summed log-probability of original answer 0 (under this permutation)."""
    score_1: float
    """Summed log-probability of original answer 1."""
    score_2: float
    """Summed log-probability of original answer 2."""
    n_tokens_0: int
    """Scored tokens of original answer 0."""
    n_tokens_1: int
    """Scored tokens of original answer 1."""
    n_tokens_2: int
    """Scored tokens of original answer 2."""
    correct: bool
    """``pred_index == label``."""
    biased: bool | None
    """``pred_index == target_loc``; None when the target is unknown."""
    unknown: bool
    """``pred_index == unknown_loc``."""
    model: str
    """Model name as given (alias, hub id or folder)."""
    model_id: str
    """Canonical model id."""
    model_revision: str | None
    """Hub revision or weights digest."""
    adapter: str | None
    """Applied LoRA adapter folder, if any."""
    prompt_format: str
    """Prompt format."""
    length_norm: str
    """Normalisation used for ``pred_index``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict view, columns in schema order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


PREDICTION_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Prediction))
"""Column names of the predictions file, in order."""


def arrow_schema() -> Any:
    """The pyarrow schema of a predictions file (without metadata)."""
    import pyarrow as pa

    types = {
        "category": pa.string(),
        "example_id": pa.int64(),
        "question_index": pa.int64(),
        "context_condition": pa.string(),
        "question_polarity": pa.string(),
        "label_type": pa.string(),
        "label": pa.int64(),
        "target_loc": pa.int64(),
        "unknown_loc": pa.int64(),
        "permutation": pa.string(),
        "pred_index": pa.int64(),
        "displayed_pred": pa.int64(),
        "score_0": pa.float64(),
        "score_1": pa.float64(),
        "score_2": pa.float64(),
        "n_tokens_0": pa.int64(),
        "n_tokens_1": pa.int64(),
        "n_tokens_2": pa.int64(),
        "correct": pa.bool_(),
        "biased": pa.bool_(),
        "unknown": pa.bool_(),
        "model": pa.string(),
        "model_id": pa.string(),
        "model_revision": pa.string(),
        "adapter": pa.string(),
        "prompt_format": pa.string(),
        "length_norm": pa.string(),
    }
    nullable = {"label_type", "target_loc", "biased", "model_revision", "adapter"}
    return pa.schema([pa.field(c, types[c], nullable=c in nullable) for c in PREDICTION_COLUMNS])


# --------------------------------------------------------------------------- scoring


def predictions_table(preds: Sequence[Prediction]) -> Any:
    """Predictions as a pyarrow Table with :func:`arrow_schema`."""
    import pyarrow as pa

    cols = {c: [getattr(p, c) for p in preds] for c in PREDICTION_COLUMNS}
    return pa.Table.from_pydict(cols, schema=arrow_schema())


def table_predictions(table: Any) -> list[Prediction]:
    """The rows of a predictions table as :class:`Prediction` records."""
    return [Prediction(**row) for row in table.to_pylist()]


def write_table(table: Any, path: Path, metadata: Mapping[str, Any] | None = None) -> None:
    """Write a predictions table atomically (zstd), with ``metadata`` as JSON under
    :data:`METADATA_KEY`."""
    import pyarrow.parquet as pq

    if metadata is not None:
        meta = json.dumps(metadata, sort_keys=True, allow_nan=False).encode("utf-8")
        table = table.replace_schema_metadata({METADATA_KEY: meta})
    with atomic_open(path, "wb") as fh:
        pq.write_table(table, fh, compression="zstd")


def read_predictions_table(path: str | Path) -> Any:
    """Read a spillover predictions file, every schema column, into a pandas DataFrame
    (integer and boolean columns nullable: ``target_loc``/``biased`` may be missing).

    For predictions of any system (CSV, JSONL, other columns) use
    :func:`spillover.stats.read_predictions`.
    """
    import pyarrow.parquet as pq

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: predictions file not found")
    table = pq.read_table(p)
    missing = [c for c in PREDICTION_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{p}: not a predictions file (missing columns {', '.join(missing)})")
    return table.to_pandas(types_mapper=_nullable_types)


def _nullable_types(arrow_type: Any) -> Any:
    import pandas as pd
    import pyarrow as pa

    if pa.types.is_integer(arrow_type):
        return pd.Int64Dtype()
    if pa.types.is_boolean(arrow_type):
        return pd.BooleanDtype()
    return None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The provenance metadata of a predictions file."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(Path(path)).metadata or {}
    raw = meta.get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path}: no spillover metadata in this Parquet file")
    out: dict[str, Any] = json.loads(raw)
    return out


def items_digest(items: Sequence[BBQItem]) -> str:
    """SHA-256 of the (ordered) item keys, identifying an item selection."""
    text = "\n".join(f"{it.category}\t{it.example_id}" for it in items)
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
    path: Path, chunk: Sequence[BBQItem], rows_per_item: int
) -> tuple[Any, dict[str, int]] | None:
    """A finished shard's table and scorer counters, or None when it must be recomputed.

    A shard is reused only when it was written for exactly this chunk (the item digest
    in its metadata) and its rows hold exactly these items, ``rows_per_item`` rows each:
    a shard copied from another chunk or another run, or edited, is scored again.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
        stats = {str(k): int(v) for k, v in dict(meta.get("stats", {})).items()}
    except Exception:  # a damaged shard is recomputed
        logger.warning("%s: unreadable shard, recomputing it", path)
        return None
    expected = Counter({(it.category, it.example_id): rows_per_item for it in chunk})
    if (
        table.num_rows != len(chunk) * rows_per_item
        or table.schema.remove_metadata() != arrow_schema()
        or meta.get("items_sha256") != items_digest(chunk)
        or Counter(
            zip(
                table.column("category").to_pylist(),
                table.column("example_id").to_pylist(),
                strict=True,
            )
        )
        != expected
    ):
        logger.warning("%s: shard of other items or damaged, recomputing it", path)
        return None
    return table.replace_schema_metadata(None), stats


# --------------------------------------------------------------------------- entry point


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
    import pyarrow.parquet as pq

    tables, metas = [], []
    for p in parts:
        if not p.is_file():
            raise DataError(f"{p}: part of a data-parallel evaluation is missing")
        tables.append(pq.read_table(p))
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
