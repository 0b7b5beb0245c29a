"""Likelihood-probe predictions (CrowS-Pairs, StereoSet, WinoBias, Winogender): field
checks, and the join with the benchmark's items (the items are authoritative).

A file of any system holds one row per item with ``item_id`` and the summed
log-probability of each option in the benchmark's role order (``score_0``, ``score_1``
and, for StereoSet, ``score_2``); ``n_tokens_0..`` (scored tokens per option) are
optional, and StereoSet's per-token comparison needs them (without them the scores are
taken as already per token, and a note says so). Every other item attribute comes from the
benchmark's own files when the frame is joined.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from ..data import PROBES
from ..errors import DataError
from .fields import (
    MAX_INTEGER,
    PLACES_ATTR,
    Locator,
    bool_mask,
    first_index,
    numeric,
    place_of,
    py_value,
    show_value,
)
from .schema import RecordKind

logger = logging.getLogger(__name__)

ITEM_KEY: tuple[str] = ("item_id",)
"""Identity of a probe item within its benchmark."""

JOINED_COLUMNS: tuple[str, ...] = (
    "attribute", "bias_type", "cluster", "split", "group", "label", "pair", "n_options",
)  # fmt: skip
"""Item attributes :func:`join_with_items` takes from the benchmark (authoritative)."""


def _ids(col: pd.Series, src: str, where: Locator) -> pd.Series:
    """Item ids as text: a CSV or JSON reader's number ``17`` is the id ``"17"``."""

    def one(value: Any) -> str | None:
        if value is None or isinstance(value, (bool, np.bool_)):
            return None
        if isinstance(value, (float, np.floating)):
            return str(int(value)) if np.isfinite(value) and float(value).is_integer() else None
        text = str(py_value(value)).strip()
        return text or None

    texts = [one(v) for v in col]
    bad = np.array([t is None for t in texts], dtype=bool)
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"{src}:{where(i)}: field 'item_id'={show_value(col.iloc[i])}; expected the item's id "
            f"as the benchmark names it ({int(bad.sum())} row(s) affected)"
        )
    return pd.Series(texts, index=col.index, dtype=object)


def _scores(df: pd.DataFrame, col: str, src: str, where: Locator) -> np.ndarray:
    vals = numeric(df[col])
    bad = np.isnan(vals) | (vals == np.inf) | bool_mask(df[col])
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"{src}:{where(i)}: field {col!r}={show_value(df[col].iloc[i])}; expected a "
            "log-probability (a finite number or -inf)"
        )
    return vals


def _counts(df: pd.DataFrame, col: str, src: str, where: Locator) -> np.ndarray:
    vals = numeric(df[col])
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(vals) | (vals != np.round(vals)) | (vals < 1) | (vals > MAX_INTEGER)
    bad |= bool_mask(df[col])
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"{src}:{where(i)}: field {col!r}={show_value(df[col].iloc[i])}; expected a "
            "positive number of scored tokens"
        )
    return vals.astype(np.int64)


def validate_probes(df: pd.DataFrame, kind: RecordKind, src: str, where: Locator) -> pd.DataFrame:
    """A probe benchmark's rows checked: ids, one score per option, token counts, one row
    per item.

    Raises:
        DataError: naming the file, the line (or row) and the field.
    """
    out = df.copy()
    out["item_id"] = _ids(out["item_id"], src, where)
    if "benchmark" in out.columns:
        out["benchmark"] = kind.name
    else:
        out.insert(0, "benchmark", kind.name)
    for col in kind.score_columns:
        out[col] = _scores(out, col, src, where)
    counts = [f"n_tokens_{i}" for i in range(len(kind.score_columns))]
    present = [c for c in counts if c in out.columns and out[c].notna().any()]
    if present and len(present) != len(counts):
        raise DataError(
            f"{src}: has {', '.join(present)} but not "
            f"{', '.join(c for c in counts if c not in present)}; per-option token counts need "
            f"all of {', '.join(counts)}"
        )
    for col in present:
        out[col] = _counts(out, col, src, where)
    dup = out.duplicated(["item_id"], keep="first").to_numpy()
    if dup.any():
        i = first_index(dup)
        j = where(first_index((out["item_id"] == out["item_id"].iloc[i]).to_numpy()))
        first = f"line {j}" if j.isdigit() else j
        raise DataError(
            f"{src}:{where(i)}: duplicate item_id={out['item_id'].iloc[i]!r} (first at "
            f"{first}); each item may appear once ({int(dup.sum())} duplicate row(s))"
        )
    return out.reset_index(drop=True)


def join_with_items(preds: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Attach a probe benchmark's item attributes to its predictions by ``item_id``.

    Args:
        preds: :func:`~.read.read_predictions` of a probe benchmark's file.
        items: The benchmark's item frame (``BenchmarkData.frame()``, columns
            :data:`spillover.data.probes.PROBE_FRAME_COLUMNS`).

    Returns:
        The predictions with :data:`JOINED_COLUMNS` from the items, a ``decision_k`` per
        option (the benchmark's normalisation applied) and ``pred_index`` (the preferred
        option, ties to the earlier), in the order of ``preds``; ``attrs["notes"]`` says
        what was assumed.

    Raises:
        DataError: a prediction of an item the benchmark does not have (file and line of
            the first), a ``label`` that disagrees, or a file of another benchmark.
    """
    src = str(preds.attrs.get("source", "predictions"))
    name = str(preds.attrs.get("benchmark") or preds["benchmark"].iloc[0])
    spec = PROBES[name]
    theirs = items[items["benchmark"] == name]
    left = preds.reset_index(drop=True).copy()
    left["_row"] = np.arange(len(left))
    carried = [c for c in JOINED_COLUMNS if c in left.columns]
    merged = left.merge(
        theirs.drop(columns=["benchmark"]), on="item_id", how="left",
        suffixes=("_pred", ""), indicator="_spillover_match",
    )  # fmt: skip
    missing = merged[merged["_spillover_match"] == "left_only"].sort_values("_row")
    if len(missing):
        place = place_of(preds, int(missing["_row"].iloc[0]), ITEM_KEY)
        shown = ", ".join(map(str, missing["item_id"].head(5)))
        raise DataError(
            f"{src}{f':{place}' if place else ''}: {len(missing)} prediction(s) name items "
            f"that are not in {spec.title} (e.g. {shown}); check the item ids and the benchmark"
        )
    notes = list(preds.attrs.get("notes", []))
    for col in carried:
        mine, true = merged[f"{col}_pred"], merged[col]
        differ = (mine.astype(str) != true.astype(str)).to_numpy() & ~(
            mine.isna() & true.isna()
        ).to_numpy()
        if differ.any():
            k = first_index(differ)
            detail = (
                f"{int(differ.sum())} row(s) carry a {col!r} that disagrees with {spec.title} "
                f"(e.g. item {merged['item_id'].iloc[k]}: file says {show_value(mine.iloc[k])}, "
                f"{spec.title} says {show_value(true.iloc[k])})"
            )
            if col == "label":
                raise DataError(f"{src}: {detail}; the file was made for other items")
            notes.append(f"{src}: {detail}; using {spec.title}'s values")
        merged = merged.drop(columns=[f"{col}_pred"])
    merged = merged.drop(columns=["_spillover_match"]).sort_values("_row").drop(columns=["_row"])
    merged = merged.reset_index(drop=True)
    merged, assumed = _decisions(merged, spec.normalisation, len(spec.roles))
    if "normalisation" not in merged.columns or merged["normalisation"].isna().any():
        merged["normalisation"] = spec.normalisation
    for k in range(len(spec.roles)):  # no counts given: the scores stand as they are
        col = f"n_tokens_{k}"
        if col not in merged.columns or merged[col].isna().all():
            merged[col] = 1
    notes += [f"{src}: {a}" for a in assumed]
    kept = {k: v for k, v in preds.attrs.items() if k != PLACES_ATTR}
    merged.attrs = {**kept, "notes": notes}
    return merged


def _decisions(df: pd.DataFrame, normalisation: str, n: int) -> tuple[pd.DataFrame, list[str]]:
    """``decision_k`` per option and the preferred option ``pred_index``."""
    scores = np.column_stack([df[f"score_{k}"].to_numpy(dtype=float) for k in range(n)])
    assumed: list[str] = []
    if normalisation == "mean":
        if all(
            f"n_tokens_{k}" in df.columns and df[f"n_tokens_{k}"].notna().all() for k in range(n)
        ):
            tokens = np.column_stack([df[f"n_tokens_{k}"].to_numpy(dtype=float) for k in range(n)])
            scores = scores / np.maximum(tokens, 1.0)
        else:
            assumed.append(
                "no n_tokens_* columns: its scores are taken as per-token log-probabilities "
                "(the benchmark compares options per token)"
            )
    out = df.copy()
    for k in range(n):
        out[f"decision_{k}"] = scores[:, k]
    # argmax with ties to the earlier option
    out["pred_index"] = np.argmax(scores, axis=1).astype(np.int64)
    return out, assumed
