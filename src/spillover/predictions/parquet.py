"""Writing and reading the Parquet files spillover itself makes: predictions tables with
their provenance in the file's metadata.

A predictions file is a Parquet table with one row per item (x answer order, for BBQ),
columns as :mod:`.schema` defines them (``docs/predictions.md``); its key-value metadata
holds the run's provenance as JSON under :data:`~.schema.METADATA_KEY`. Predictions of any
other system (CSV, JSONL, other columns, lm-evaluation-harness logs) are read by
:func:`spillover.predictions.read_predictions`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import atomic_open
from ..errors import DataError
from .schema import BBQ, METADATA_KEY, PREDICTION_COLUMNS, Prediction, RecordKind


def arrow_schema(kind: RecordKind = BBQ) -> Any:
    """The pyarrow schema of a predictions file of ``kind`` (without metadata)."""
    return kind.arrow_schema()


def predictions_table(preds: Sequence[Prediction]) -> Any:
    """BBQ predictions as a pyarrow Table with :func:`arrow_schema`."""
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
    :func:`spillover.predictions.read_predictions`.
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


def read_table(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """A Parquet file spillover wrote, as a pyarrow Table without metadata, and the JSON
    metadata it carried (``{}`` when none).

    Raises:
        Whatever pyarrow or json raise for a damaged file (callers decide what that means).
    """
    import pyarrow.parquet as pq

    table = pq.read_table(Path(path))
    meta: dict[str, Any] = json.loads((table.schema.metadata or {}).get(METADATA_KEY, b"{}"))
    return table.replace_schema_metadata(None), meta
