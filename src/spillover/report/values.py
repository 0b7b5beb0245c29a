"""How the report reads and formats comparison values: undefined vs absent, signs, stars."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..data import CATEGORIES
from ..stats import Comparison, StratumRecord

GRID_COLUMNS: tuple[str, ...] = ("ambig", "disambig", "all")
"""Column order of the stratum grids (the contexts, then their pool)."""
CONTEXT_LABELS: Mapping[str, str] = {
    "ambig": "ambiguous",
    "disambig": "disambiguated",
    "all": "all contexts",
}
AGGREGATE = "all"
"""Value of ``category`` / ``context_condition`` in rows aggregated over that field."""
POSITIONS = ("A", "B", "C")
"""Labels of the three displayed answer positions."""

UNDEFINED = "undefined"
"""Shown for a value the stats stage reports as null (undefined), never 0."""
ABSENT = "—"
"""Shown for a value the artifact does not carry at all."""

_CORRECTION_NAMES: Mapping[str, str] = {
    "holm": "Holm",
    "bonferroni": "Bonferroni",
    "bh": "Benjamini–Hochberg",
    "none": "no",
}


def number(value: Any) -> float | None:
    """A finite number, else None (null, NaN, not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def text(value: Any) -> str:
    """Any value as display text (None is empty)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def cell(rec: StratumRecord, key: str, fmt: str) -> str:
    """Format a field of ``rec``: ``undefined`` when null."""
    value = getattr(rec, key)
    if isinstance(value, str):
        return value
    num = number(value)
    if num is None:
        return UNDEFINED
    return fmt_number(num, fmt)


def fmt_number(x: float, fmt: str) -> str:
    """``pct`` (12.3%), ``pp`` (+1.2 pp), ``int``, ``p`` (p-value), ``signed`` or plain."""
    if fmt == "pct":
        return f"{x * 100:.1f}%"
    if fmt == "pp":
        return f"{x * 100:+.1f} pp"
    if fmt == "pts":
        return f"{x * 100:.1f} pp"
    if fmt == "int":
        return f"{round(x):,}"
    if fmt == "p":
        return fmt_p(x)
    if fmt == "signed":
        return f"{x:+.3f}"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}"


def fmt_p(p: float) -> str:
    """A p-value: 3 decimals, or scientific below 0.001."""
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.3f}"


def interval(rec: StratumRecord, low: str, high: str, fmt: str) -> str:
    """Format the interval held in fields ``low`` and ``high``."""
    lo, hi = number(getattr(rec, low)), number(getattr(rec, high))
    if lo is None or hi is None:
        return UNDEFINED
    if fmt == "pp":
        return f"[{lo * 100:+.1f}, {hi * 100:+.1f}] pp"
    if fmt == "signed":
        return f"[{lo:+.3f}, {hi:+.3f}]"
    return f"[{fmt_number(lo, fmt)}, {fmt_number(hi, fmt)}]"


def polarity(rec: StratumRecord) -> str | None:
    """The row's question polarity, when it is split by one."""
    value = rec.question_polarity
    return None if value in (None, AGGREGATE) else value


def is_main(rec: StratumRecord) -> bool:
    """A row not split by question polarity (the grid rows)."""
    return polarity(rec) is None


def is_fine(rec: StratumRecord) -> bool:
    """One of the attribute x context strata (not an aggregate, not a polarity split)."""
    return (
        is_main(rec)
        and rec.category != AGGREGATE
        and rec.context_condition in ("ambig", "disambig")
    )


def direction(rec: StratumRecord, alpha: float) -> str | None:
    """``degraded`` / ``improved`` when the adjusted p-value is below ``alpha``, else None."""
    p = number(rec.p_adjusted)
    d = rec.delta_accuracy
    if p is None or p >= alpha or d == 0:
        return None
    return "degraded" if d < 0 else "improved"


def stars(rec: StratumRecord, alpha: float) -> str:
    """``**`` when p_adj < alpha/5 (0.01 at alpha 0.05), ``*`` when p_adj < alpha."""
    p = number(rec.p_adjusted)
    if p is None:
        return ""
    if p < alpha / 5:
        return "**"
    return "*" if p < alpha else ""


def category_order(categories: Iterable[str]) -> list[str]:
    """BBQ's categories, then any others, then the aggregate row."""
    present = set(categories)
    extra = sorted(c for c in present if c not in CATEGORIES and c != AGGREGATE)
    return [*CATEGORIES, *extra, AGGREGATE]


def sort_key(rec: StratumRecord) -> tuple[int, str, int, str]:
    """Table order: category, then context, then polarity."""
    cat, ctx = rec.category, rec.context_condition
    cat_rank = (
        CATEGORIES.index(cat)
        if cat in CATEGORIES
        else (len(CATEGORIES) + 1 if cat == AGGREGATE else len(CATEGORIES))
    )
    ctx_rank = GRID_COLUMNS.index(ctx) if ctx in GRID_COLUMNS else len(GRID_COLUMNS)
    return (cat_rank, cat, ctx_rank, ctx + "|" + (polarity(rec) or ""))


def targets_of(comparison: Comparison) -> list[str]:
    """The categories the alignment targeted, as recorded by the stats stage."""
    return list(comparison.config.targets or ())


def correction_name(comparison: Comparison) -> str:
    """The correction's display name (``Holm``, ``Benjamini–Hochberg``, ...)."""
    name = comparison.config.correction
    return _CORRECTION_NAMES.get(name, name)


def method_text(comparison: Comparison) -> str:
    """The comparison's tests in words, for the report's first line."""
    cfg = comparison.config
    if cfg.resolved_test == "signflip":
        return (
            f"{cfg.cluster}-clustered sign-flip tests (the item-level mid-p McNemar test "
            "beside them)"
        )
    beside = " (the scenario-clustered test beside them)" if cfg.cluster == "item" else ""
    return f"item-level {cfg.resolved_test} McNemar tests{beside}"


def grid(comparison: Comparison) -> dict[tuple[str, str], StratumRecord]:
    """The rows not split by polarity, by ``(category, context)``."""
    out: dict[tuple[str, str], StratumRecord] = {}
    for rec in comparison.rows:
        if is_main(rec):
            out.setdefault((rec.category, rec.context_condition), rec)
    return out
