"""The spillover map of a sweep: target x evaluated attribute x context, one figure, one table.

Each sub-run of a sweep is one row (labelled by its alignment target); each BBQ attribute
evaluated is one column; the ambiguous and disambiguated contexts and the three metrics
(Δ accuracy, Δ unknown rate, Δ bias score, aligned - base) make the panels. A cell is marked
significant by the sub-run's own comparison: ``significant`` (accuracy) and
``significant_unknown`` (unknown rate) of its stratum record, that is the comparison's
corrected test (scenario-clustered by default); the bias score, which has no test, is marked
when its cluster-bootstrap interval excludes 0 and it rests on enough answers. A stratum that a
sub-run lacks is blank, never 0; a value the stats stage reports as undefined is hatched grey.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import CATEGORIES
from ..stats import Comparison, StratumRecord
from .config import ReportConfig
from .figures import FigureOut, _new_figure, _render
from .values import AGGREGATE, UNDEFINED, category_order, fmt_number, is_fine, number, targets_of

if TYPE_CHECKING:
    from matplotlib.axes import Axes

MAP_NAME = "spillover_map"
"""File stem of the map figure inside the sweep's ``figures/``."""
MAP_CONTEXTS: tuple[str, ...] = ("ambig", "disambig")
"""The contexts of the map, in panel order."""


@dataclass(frozen=True)
class MapMetric:
    """One metric of the map."""

    key: str
    """The :class:`StratumRecord` field (aligned - base)."""
    label: str
    """Heading in the figure and the table."""
    fmt: str
    """Table format: ``pp`` (points, from a proportion) or ``x100`` (one decimal)."""
    scale: float
    """Factor from the record's unit to the figure's (proportion -> points)."""
    cmap: str
    """Diverging, colour-blind-safe matplotlib colormap, centred at 0."""
    floor: float
    """Smallest half-range of the colour scale (so that tiny changes stay pale)."""


MAP_METRICS: tuple[MapMetric, ...] = (
    # accuracy: blue = better; bias: red = more stereotyped; unknown: purple/orange, no valence
    MapMetric("delta_accuracy", "Δ accuracy (pp)", "pp", 100.0, "RdBu", 1.0),
    MapMetric("delta_unknown_rate", "Δ unknown rate (pp)", "pp", 100.0, "PuOr_r", 1.0),
    MapMetric("delta_bias_score", "Δ bias score", "x100", 1.0, "RdBu_r", 1.0),
)
_CONTEXT_NAMES = {"ambig": "ambiguous", "disambig": "disambiguated"}


@dataclass(frozen=True)
class MapRow:
    """One sub-run of the map."""

    name: str
    """The sub-run's folder, relative to the sweep."""
    label: str
    """The row label: the targets joined with ``+`` (the run's name when unrecorded)."""
    targets: tuple[str, ...]
    """The alignment targets recorded in its comparison."""
    cells: dict[tuple[str, str], StratumRecord]
    """Its attribute x context strata, by ``(category, context)``."""
    alpha: float | None
    """The report's ``alpha`` override (None: the comparison's own verdicts)."""


def run_name(sweep_dir: Path, run_dir: Path) -> str:
    """A sub-run's folder relative to the sweep, with ``/`` (:attr:`MapRow.name`)."""
    return os.path.relpath(run_dir.resolve(), sweep_dir.resolve()).replace(os.sep, "/")


def map_rows(
    sweep_dir: Path, loaded: Sequence[tuple[Path, Comparison]], cfg: ReportConfig
) -> list[MapRow]:
    """The map's rows: single targets in BBQ's order, then multi-attribute ones, then others."""
    rows = []
    for run_dir, comparison in loaded:
        name = run_name(sweep_dir, run_dir)
        targets = tuple(targets_of(comparison))
        cells = {(r.category, r.context_condition): r for r in comparison.rows if is_fine(r)}
        rows.append(MapRow(name, "+".join(targets) or name, targets, cells, cfg.alpha))
    labels = [r.label for r in rows]
    rows = [
        MapRow(r.name, f"{r.label} · {r.name}", r.targets, r.cells, r.alpha)
        if labels.count(r.label) > 1
        else r
        for r in rows
    ]

    def rank(row: MapRow) -> tuple[int, list[int], str]:
        known = all(t in CATEGORIES for t in row.targets) and row.targets
        order = [CATEGORIES.index(t) for t in row.targets] if known else []
        return (0 if len(row.targets) == 1 and known else 1 if known else 2, order, row.label)

    return sorted(rows, key=rank)


def map_columns(rows: Sequence[MapRow]) -> list[str]:
    """The evaluated attributes: BBQ's in order, then any others, present in some sub-run."""
    present = {cat for row in rows for cat, _ in row.cells}
    return [c for c in category_order(present) if c in present and c != AGGREGATE]


def is_marked(rec: StratumRecord, metric: MapMetric, alpha: float | None) -> bool:
    """Whether the map marks the stratum's change of ``metric`` as significant."""
    if metric.key == "delta_bias_score":
        lo, hi = number(rec.delta_bias_score_ci_low), number(rec.delta_bias_score_ci_high)
        return lo is not None and hi is not None and (lo > 0 or hi < 0) and not rec.bias_low_support
    if metric.key == "delta_unknown_rate":
        p, verdict = rec.p_adjusted_unknown, rec.significant_unknown
    else:
        p, verdict = rec.p_adjusted, rec.significant
    if alpha is None:
        return bool(verdict)
    value = number(p)
    return value is not None and value < alpha


def _table_cell(
    rec: StratumRecord | None, metric: MapMetric, alpha: float | None
) -> dict[str, Any]:
    if rec is None:
        return {"text": "", "sig": False}
    value = number(getattr(rec, metric.key))
    if value is None:
        return {"text": UNDEFINED, "sig": False}
    sig = is_marked(rec, metric, alpha)
    shown = f"{value:+.1f}" if metric.fmt == "x100" else fmt_number(value, metric.fmt)
    return {"text": shown + ("*" if sig else ""), "sig": sig}


def map_table(rows: Sequence[MapRow], columns: Sequence[str]) -> dict[str, Any]:
    """One line per sub-run x evaluated attribute; per context, the three changes."""
    header = ["target", "run", "attribute", "role"]
    header += [f"{m.label}, {ctx}" for ctx in MAP_CONTEXTS for m in MAP_METRICS]
    lines = []
    for row in rows:
        for cat in columns:
            values = [
                _table_cell(row.cells.get((cat, ctx)), m, row.alpha)
                for ctx in MAP_CONTEXTS
                for m in MAP_METRICS
            ]
            role = "target" if cat in row.targets else "spillover"
            keys = ["+".join(row.targets) or "—", row.name, cat, role]
            lines.append({"keys": keys, "values": values, "cls": "own" if role == "target" else ""})
    return {"header": header, "n_keys": 4, "rows": lines}


def _values(rows: Sequence[MapRow], columns: Sequence[str], ctx: str, metric: MapMetric) -> Any:
    """The panel's values (NaN where absent or undefined) and the absent / undefined masks."""
    import numpy as np

    values = np.full((len(rows), len(columns)), np.nan)
    undefined = np.zeros(values.shape, dtype=bool)
    for i, row in enumerate(rows):
        for j, cat in enumerate(columns):
            rec = row.cells.get((cat, ctx))
            if rec is None:
                continue
            v = number(getattr(rec, metric.key))
            if v is None:
                undefined[i, j] = True
            else:
                values[i, j] = v * metric.scale
    return values, undefined


def _panel(
    ax: Axes,
    rows: Sequence[MapRow],
    columns: Sequence[str],
    ctx: str,
    metric: MapMetric,
    norm: Any,
) -> None:
    """One context x metric panel: coloured cells, values, marks, the target's cells outlined."""
    import matplotlib
    import numpy as np

    values, undefined = _values(rows, columns, ctx, metric)
    ax.imshow(
        np.ma.masked_invalid(values), cmap=matplotlib.colormaps[metric.cmap], norm=norm,
        aspect="auto", interpolation="nearest",
    )  # fmt: skip
    for i, row in enumerate(rows):
        for j, cat in enumerate(columns):
            rec = row.cells.get((cat, ctx))
            text = None
            if not undefined[i, j] and rec is not None and math.isfinite(values[i, j]):
                sig = is_marked(rec, metric, row.alpha)
                label = f"{values[i, j]:+.1f}" + ("*" if sig else "")
                text = (label, sig, float(norm(values[i, j])))
            draw_cell(ax, i, j, bool(undefined[i, j]), text, cat in row.targets)
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="both", length=0)
    ax.set_title(f"{metric.label}, {_CONTEXT_NAMES[ctx]}")
    for spine in ax.spines.values():
        spine.set_visible(False)


def draw_cell(
    ax: Axes,
    i: int,
    j: int,
    undefined: bool,
    text: tuple[str, bool, float] | None,
    target: bool,
) -> None:
    """One map cell's marks: hatched grey when undefined, else its text (label, bold when
    marked, the cell's colour position 0-1: white on dark colours), and a black outline
    for a target cell. Both maps draw their cells with it."""
    from matplotlib.patches import Rectangle

    if undefined:
        ax.add_patch(
            Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="#e6e6e6",
                      edgecolor="#a0a0a0", hatch="////", linewidth=0)
        )  # fmt: skip
    elif text is not None:
        label, bold, shade = text
        dark = abs(shade - 0.5) > 0.32
        ax.text(
            j, i, label, ha="center", va="center", fontsize=6.5,
            color="white" if dark else "black", fontweight="bold" if bold else "normal",
        )  # fmt: skip
    if target:
        ax.add_patch(
            Rectangle((j - 0.46, i - 0.46), 0.92, 0.92, facecolor="none",
                      edgecolor="black", linewidth=1.8)
        )  # fmt: skip


def _half_range(rows: Sequence[MapRow], columns: Sequence[str], metric: MapMetric) -> float:
    """The colour scale's half-range: the largest change of ``metric`` over both contexts."""
    import numpy as np

    finite = [
        v[np.isfinite(v)] for ctx in MAP_CONTEXTS for v in [_values(rows, columns, ctx, metric)[0]]
    ]
    top = max((float(np.max(np.abs(f))) for f in finite if f.size), default=0.0)
    return max(top, metric.floor)


def map_figure(rows: Sequence[MapRow], columns: Sequence[str], cfg: ReportConfig) -> FigureOut:
    """The map: one row of panels per metric, one column per context, a colour bar per metric."""
    import matplotlib
    from matplotlib.colors import Normalize

    width = 2 * (0.42 * len(columns) + 0.6) + 2.8
    height = len(MAP_METRICS) * (0.3 * len(rows) + 0.8) + 1.6
    fig = _new_figure(width, height)
    grid_axes = fig.subplots(len(MAP_METRICS), len(MAP_CONTEXTS), squeeze=False)
    for r, metric in enumerate(MAP_METRICS):
        half = _half_range(rows, columns, metric)
        norm = Normalize(vmin=-half, vmax=half)
        for c, ctx in enumerate(MAP_CONTEXTS):
            ax = grid_axes[r][c]
            _panel(ax, rows, columns, ctx, metric, norm)
            ax.set_yticks(range(len(rows)), [row.label for row in rows] if c == 0 else [])
            last = r == len(MAP_METRICS) - 1
            ax.set_xticks(range(len(columns)), list(columns) if last else [])
            if last:
                ax.tick_params(axis="x", labelrotation=50)
                for tick in ax.get_xticklabels():
                    tick.set_horizontalalignment("right")
                    tick.set_rotation_mode("anchor")
        mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=matplotlib.colormaps[metric.cmap])
        fig.colorbar(mappable, ax=list(grid_axes[r]), shrink=0.9, pad=0.01, label=metric.label)
    return _render(fig, FigureOut(MAP_NAME, "Spillover map", map_caption()), cfg)


def map_caption() -> str:
    """How to read the map (also the HTML figure caption)."""
    return (
        "Rows are the sweep's sub-runs, labelled by their alignment target (several attributes "
        "joined with +); columns are the BBQ attributes evaluated; one panel per metric and "
        "context. Each cell is aligned minus base: accuracy and the 'unknown' answer rate in "
        "percentage points, the bias score in its own units (x100). Diverging colour-blind-safe "
        "scales centred at 0, shared by both contexts of a metric: accuracy blue = better, red = "
        "worse; bias score red = more stereotyped answers; unknown rate orange = more 'unknown' "
        "answers, purple = fewer. * and bold: significant in the sub-run's comparison (accuracy "
        "and unknown rate: its corrected test, scenario-clustered by default; bias score: the "
        "95% cluster-bootstrap interval excludes 0, uncorrected). Outlined: the target's own "
        "cells; every other cell is a possible spillover. Blank: the sub-run has no such "
        "stratum; hatched grey: undefined (not zero). The table below lists the same numbers."
    )
