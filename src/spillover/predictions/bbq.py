"""BBQ predictions: field checks of the BBQ record kind, answer-order permutations, and the
join with BBQ's items (BBQ is authoritative for every item attribute)."""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..data import CATEGORIES, CATEGORY_ALIASES, ITEM_FRAME_COLUMNS, BBQData, resolve_category
from ..errors import ConfigError, DataError
from .fields import (
    MAX_INTEGER,
    PLACES_ATTR,
    STRICT_ATTR,
    Locator,
    bool_mask,
    first_index,
    numeric,
    place_of,
    py_value,
    show_value,
)
from .schema import (
    IDENTITY_PERMUTATION,
    JOINED_REQUIRED,
    KEY_COLUMNS,
    LEGACY_IDENTITY,
    PERMUTATION_COLUMN,
    PRED_REQUIRED,
    SCORE_COLUMNS,
)

logger = logging.getLogger(__name__)

ITEM_COLUMNS: tuple[str, ...] = tuple(c for c in ITEM_FRAME_COLUMNS if c not in KEY_COLUMNS)
"""Item attributes that :func:`join_with_bbq` takes from BBQ (authoritative)."""


def _at(place: str) -> str:
    """``"line 3"`` for a bare line number, else the place as is."""
    return f"line {place}" if place.isdigit() else place


def _canonical_categories(cats: pd.Series) -> pd.Series:
    """Categories as BBQ spells them: an alias or another casing (``gender``,
    ``gender-identity``) is read as :func:`~spillover.data.resolve_category` reads it
    wherever a category is expected; values it does not know are kept, to be refused
    with their line."""
    names: dict[str, str] = {}
    for value in cats:
        if isinstance(value, str) and value not in names:
            names[value] = value
            if len(value) <= 100:
                with contextlib.suppress(ConfigError):
                    names[value] = resolve_category(value)
    return cats.map(lambda v: names.get(v, v) if isinstance(v, str) else v)


def _category_hint(value: object) -> str:
    text = str(value)
    norm = text.strip().lower().replace("-", "_").replace(" ", "_")
    if norm in CATEGORY_ALIASES:
        return f" (did you mean {CATEGORY_ALIASES[norm]!r}?)"
    for cat in CATEGORIES:
        if cat.lower() == norm:
            return f" (did you mean {cat!r}?)"
    near = difflib.get_close_matches(text, CATEGORIES, n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _integer_column(
    df: pd.DataFrame, col: str, src: str, where: Locator, allowed: Sequence[int] | None = None
) -> np.ndarray:
    raw = df[col]
    expected = (
        " or ".join([", ".join(map(str, allowed[:-1])), str(allowed[-1])])
        if allowed is not None
        else "a non-negative integer"
    )
    booleans = bool_mask(raw)
    if booleans.any():
        i = first_index(booleans)
        raise DataError(
            f"{src}:{where(i)}: field {col!r}={show_value(raw.iloc[i])} is a boolean; expected "
            f"{expected} ({int(booleans.sum())} row(s) affected)"
        )
    values = numeric(raw)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(values) | (values != np.round(values))
        if allowed is not None:
            bad |= ~np.isin(values, np.asarray(allowed, dtype=float))
        else:
            bad |= (values < 0) | (values > MAX_INTEGER)
    if bad.any():
        i = first_index(bad)
        if allowed is None and abs(values[i]) > MAX_INTEGER:
            expected += f" of at most {MAX_INTEGER:,}"
        raise DataError(
            f"{src}:{where(i)}: field {col!r}={show_value(raw.iloc[i])}; expected {expected} "
            f"({int(bad.sum())} row(s) affected)"
        )
    return values.astype(np.int64)


def validate(df: pd.DataFrame, src: str, where: Locator) -> pd.DataFrame:
    out = df.copy()
    missing = [c for c in PRED_REQUIRED if c not in out.columns]
    if missing:
        raise DataError(f"{src}: missing column(s) {', '.join(map(repr, missing))}")
    cats = out["category"]
    if not cats.isin(CATEGORIES).all():
        cats = _canonical_categories(cats)
    bad = ~cats.isin(CATEGORIES).to_numpy()
    if bad.any():
        i = first_index(bad)
        value = cats.iloc[i]
        raise DataError(
            f"{src}:{where(i)}: field 'category'={show_value(value)} is not a BBQ category"
            f"{_category_hint(value)}; expected a BBQ category or an alias such as "
            f"'gender' ({int(bad.sum())} row(s) affected)"
        )
    out["category"] = cats.astype(str)
    out["example_id"] = _integer_column(out, "example_id", src, where)
    out["pred_index"] = _integer_column(out, "pred_index", src, where, allowed=(0, 1, 2))
    present = [c for c in SCORE_COLUMNS if c in out.columns]
    if present:
        absent = [c for c in SCORE_COLUMNS if c not in out.columns]
        if absent:
            raise DataError(
                f"{src}: has {', '.join(present)} but not {', '.join(absent)}; "
                "per-option scores need all three columns score_0, score_1, score_2"
            )
        for col in SCORE_COLUMNS:
            vals = numeric(out[col])
            bad = np.isnan(vals) | (vals == np.inf) | bool_mask(out[col])
            if bad.any():
                i = first_index(bad)
                raise DataError(
                    f"{src}:{where(i)}: field {col!r}={show_value(out[col].iloc[i])}; expected a "
                    "log-probability (a finite number or -inf)"
                )
            out[col] = vals
    if PERMUTATION_COLUMN in out.columns:
        out[PERMUTATION_COLUMN] = _permutation_strings(out[PERMUTATION_COLUMN], src, where)
    keys = [*KEY_COLUMNS] + ([PERMUTATION_COLUMN] if PERMUTATION_COLUMN in out.columns else [])
    dup = out.duplicated(keys, keep=False).to_numpy()
    if dup.any():
        first_dup = out.duplicated(keys, keep="first").to_numpy()
        i = first_index(first_dup)
        key_vals = tuple(py_value(out[k].iloc[i]) for k in keys)
        same = np.ones(len(out), dtype=bool)
        for k, v in zip(keys, key_vals, strict=True):
            same &= (out[k] == v).to_numpy()
        j = first_index(same)
        shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key_vals, strict=True))
        per = " per permutation" if PERMUTATION_COLUMN in keys else ""
        raise DataError(
            f"{src}:{where(i)}: duplicate key {shown} (first at {_at(where(j))}); each item may "
            f"appear once{per} ({int(first_dup.sum())} duplicate row(s))"
        )
    return out


def _permutation_strings(col: pd.Series, src: str, where: Locator) -> pd.Series:
    """Permutation ids as the strings written: a CSV or JSON reader's number ``12`` is the id
    ``"012"`` again (three digits padded back when they then form a permutation of 012), and
    the legacy identity ``0`` is ``"012"``; other ids are kept as text. A missing id, a
    boolean or a non-finite number is refused."""

    def one(value: Any) -> str | None:
        if value is None or isinstance(value, (bool, np.bool_)):
            return None
        if isinstance(value, (float, np.floating)):
            if not math.isfinite(value):
                return None
            text = str(int(value)) if float(value).is_integer() else str(value)
        elif isinstance(value, (int, np.integer)):
            text = str(int(value))
        else:
            text = str(value).strip()
        if text == LEGACY_IDENTITY:
            return IDENTITY_PERMUTATION
        padded = text.zfill(3)
        if text.isdigit() and len(text) < 3 and sorted(padded) == ["0", "1", "2"]:
            return padded
        return text

    texts = [one(v) for v in col]
    bad = np.array([t is None or t == "" for t in texts], dtype=bool)
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"{src}:{where(i)}: field {PERMUTATION_COLUMN!r}={show_value(col.iloc[i])}; expected a "
            f"permutation id such as '012' ({int(bad.sum())} row(s) affected)"
        )
    return pd.Series(texts, index=col.index, dtype=object)


def pick_permutation(
    df: pd.DataFrame, src: str, permutation: str | None
) -> tuple[pd.DataFrame, str | None]:
    values = sorted(df[PERMUTATION_COLUMN].unique(), key=lambda v: (len(v), v))
    if permutation is not None:
        if permutation not in values:
            raise DataError(
                f"{src}: no rows with permutation {permutation!r}; the file has "
                f"{', '.join(map(repr, values[:10]))}{' ...' if len(values) > 10 else ''}"
            )
        kept = df[df[PERMUTATION_COLUMN] == permutation]
        note = None
        if len(values) > 1:
            note = f"{src}: using permutation {permutation!r} ({len(kept)} of {len(df)} rows)"
        return kept, note
    if len(values) == 1:
        return df, None
    if IDENTITY_PERMUTATION not in values:
        raise DataError(
            f"{src}: rows come from {len(values)} answer-order permutations "
            f"({', '.join(map(repr, values[:10]))}) and none is the identity "
            f"{IDENTITY_PERMUTATION!r}; choose one with --permutation"
        )
    kept = df[df[PERMUTATION_COLUMN] == IDENTITY_PERMUTATION]
    note = (
        f"{src}: rows come from {len(values)} answer-order permutations; using the identity "
        f"permutation {IDENTITY_PERMUTATION!r} ({len(kept)} of {len(df)} rows); "
        "pass --permutation to choose another"
    )
    return kept, note


def _item_frame(bbq: BBQData | pd.DataFrame) -> pd.DataFrame:
    if isinstance(bbq, BBQData):
        return bbq.frame()
    needed = [c for c in JOINED_REQUIRED if c != "pred_index"]
    missing = [c for c in needed if c not in bbq.columns]
    if missing:
        raise DataError(f"BBQ item frame lacks column(s) {', '.join(map(repr, missing))}")
    return bbq


def _show_keys(df: pd.DataFrame, limit: int = 5) -> str:
    shown = ", ".join(
        f"{c}/{e}" for c, e in zip(df["category"][:limit], df["example_id"][:limit], strict=True)
    )
    more = f" and {len(df) - limit} more" if len(df) > limit else ""
    return shown + more


def join_with_bbq(preds: pd.DataFrame, bbq: BBQData | pd.DataFrame) -> pd.DataFrame:
    """Attach BBQ's item attributes to predictions by ``(category, example_id)``.

    BBQ is authoritative: item columns the prediction file already carries are
    checked and replaced. A disagreeing ``label`` is an error (the file was made
    for other items); other disagreements are logged as warnings.

    Args:
        preds: Output of :func:`read_predictions` (or any frame with its columns).
        bbq: Loaded BBQ, or an item frame shaped like :meth:`BBQData.frame`.

    Returns:
        The predictions with ``context_condition``, ``question_polarity``,
        ``label_type``, ``label``, ``target_loc`` (nullable Int64), ``unknown_loc``,
        ``question_index`` and ``subcategory`` added, in the order of ``preds``;
        ``attrs["notes"]`` holds the reading notes plus any replaced disagreements.

    Raises:
        DataError: predictions whose key is not in BBQ (the file and line of the first,
            how many, and a few), or labels that disagree with BBQ's.
    """
    src = str(preds.attrs.get("source", "predictions"))
    items = _item_frame(bbq)
    carried = [c for c in ITEM_COLUMNS if c in preds.columns and c in items.columns]
    notes = list(preds.attrs.get("notes", []))
    left = preds.reset_index(drop=True).copy()
    left["_row"] = np.arange(len(left))
    merged = left.merge(
        items, on=list(KEY_COLUMNS), how="left", suffixes=("_pred", ""), indicator=True
    )
    unmatched = merged[merged["_merge"] == "left_only"].sort_values("_row")
    if len(unmatched):
        place = place_of(preds, int(unmatched["_row"].iloc[0]))
        raise DataError(
            f"{src}{f':{place}' if place else ''}: {len(unmatched)} prediction(s) name items "
            "that are not in BBQ "
            f"(e.g. {_show_keys(unmatched)}); check the category names and example ids "
            "or load the BBQ categories the predictions were made on"
        )
    for col in carried:
        mine = merged[f"{col}_pred"]
        theirs = merged[col]
        if col == "target_loc":
            a = numeric(mine)
            b = theirs.to_numpy(dtype=float, na_value=np.nan)
            differ = ~((a == b) | (np.isnan(a) & np.isnan(b)))
        elif col in ("label", "unknown_loc", "question_index"):
            a = numeric(mine)
            differ = a != theirs.to_numpy(dtype=float)
        else:
            differ = (mine.astype(str) != theirs.astype(str)).to_numpy()
            differ = differ & ~(mine.isna() & theirs.isna()).to_numpy()
        if differ.any():
            bad = merged[differ]
            example = bad.iloc[0]
            detail = (
                f"{int(differ.sum())} prediction row(s) carry a {col!r} that disagrees with "
                f"BBQ (e.g. {example['category']}/{example['example_id']}: file says "
                f"{show_value(example[f'{col}_pred'])}, BBQ says {show_value(example[col])})"
            )
            if col == "label":
                raise DataError(
                    f"{src}: {detail}; BBQ's labels are authoritative: the file was made for "
                    "other items or its rows are misaligned"
                )
            if col in preds.attrs.get(STRICT_ATTR, ()):
                raise DataError(
                    f"{src}: {detail}; its predictions were mapped with the file's value, so "
                    "the file was made on other data than this BBQ"
                )
            # returned in attrs["notes"]; callers show it (the CLI prints it once)
            logger.debug("%s: %s; using BBQ's values", src, detail)
            notes.append(f"{src}: {detail}; using BBQ's values")
        merged = merged.drop(columns=[f"{col}_pred"])
    merged = merged.drop(columns=["_merge"]).sort_values("_row").drop(columns=["_row"])
    merged = merged.reset_index(drop=True)
    merged["target_loc"] = merged["target_loc"].astype("Int64")
    kept_attrs = {k: v for k, v in preds.attrs.items() if k not in (PLACES_ATTR, STRICT_ATTR)}
    merged.attrs = {**kept_attrs, "notes": notes}
    front = [c for c in (*KEY_COLUMNS, "pred_index", *ITEM_COLUMNS) if c in merged.columns]
    rest = [c for c in merged.columns if c not in front]
    return merged[front + rest]


def check_joined(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Validate an already-joined frame (columns, pred_index range, duplicate keys).

    Returns a copy with canonical dtypes. Raises DataError naming ``name``.
    """
    missing = [c for c in JOINED_REQUIRED if c not in df.columns]
    if missing:
        raise DataError(
            f"{name}: missing column(s) {', '.join(map(repr, missing))}; join the "
            "predictions with BBQ first (join_with_bbq) or read them with spillover.stats.compare_files"
        )
    if df.empty:
        raise DataError(f"{name}: no predictions")
    out = df.reset_index(drop=True).copy()
    pos: Locator = lambda i: f"row {i + 1}"  # noqa: E731
    out = validate(out, name, pos)
    dup = out.duplicated(list(KEY_COLUMNS), keep="first").to_numpy()
    if dup.any():
        i = first_index(dup)
        hint = (
            "; the rows come from several answer-order permutations: keep one"
            if PERMUTATION_COLUMN in out.columns
            else ""
        )
        raise DataError(
            f"{name}:{pos(i)}: duplicate key category={out['category'].iloc[i]!r}, "
            f"example_id={out['example_id'].iloc[i]} ({int(dup.sum())} duplicate row(s)){hint}"
        )
    for col in ("label", "unknown_loc"):
        out[col] = _integer_column(out, col, name, pos, allowed=(0, 1, 2))
    tl_vals = numeric(out["target_loc"])
    bad = (~np.isnan(tl_vals) & ~np.isin(tl_vals, (0.0, 1.0, 2.0))) | bool_mask(out["target_loc"])
    if bad.any():
        i = first_index(bad)
        raise DataError(
            f"{name}:{pos(i)}: field 'target_loc'={show_value(out['target_loc'].iloc[i])}; "
            "expected 0, 1, 2 or missing"
        )
    out["target_loc"] = pd.array(
        [pd.NA if math.isnan(v) else int(v) for v in tl_vals.tolist()], dtype="Int64"
    )
    if "question_index" in out.columns:
        out["question_index"] = _integer_column(out, "question_index", name, pos)
    return out


def position_frame(preds: pd.DataFrame) -> tuple[pd.DataFrame | None, list[str]]:
    """What the answer-position view needs of a BBQ predictions frame, from any system's file.

    Args:
        preds: :func:`~.read.read_predictions` with ``all_permutations=True``.

    Returns:
        A frame of ``permutation`` (the identity where the file names none),
        ``displayed_pred`` (the displayed position of the answer chosen: as written, else
        where ``pred_index`` stands in the permutation id) and ``correct`` (as written,
        else ``pred_index == label`` where the file carries BBQ's ``label``), or None with
        the columns it lacks, named as the file would carry them.
    """
    n = len(preds)
    perms = (
        preds[PERMUTATION_COLUMN].astype(str)
        if PERMUTATION_COLUMN in preds.columns
        else pd.Series([IDENTITY_PERMUTATION] * n, index=preds.index, dtype=object)
    )
    lacking: list[str] = []
    if "displayed_pred" in preds.columns:
        shown = numeric(preds["displayed_pred"])
    else:
        shown = np.array(
            [
                float(p.index(str(k))) if len(p) == 3 and str(k) in p else np.nan
                for p, k in zip(perms, preds["pred_index"], strict=True)
            ]
        )
    if np.isnan(shown).any() or not np.isin(shown, (0.0, 1.0, 2.0)).all():
        lacking.append("displayed_pred")
    if "correct" in preds.columns:
        correct = preds["correct"].astype(bool).to_numpy()
    elif "label" in preds.columns:
        correct = (numeric(preds["label"]) == preds["pred_index"].to_numpy()).astype(bool)
    else:
        correct = None
        lacking.append("correct")
    if lacking or correct is None:
        return None, lacking
    frame = pd.DataFrame(
        {"permutation": perms.to_numpy(), "displayed_pred": shown.astype(int), "correct": correct}
    )
    return frame, []
