"""The report's figures: heatmaps, forest plot, flag panels, training curves, answer positions.

Figures are built with matplotlib's object API (no pyplot, no global backend switch):
PNG is rendered by the Agg canvas, SVG by the SVG canvas; output is deterministic.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..stats import Comparison, Flag, StratumRecord
from .config import ReportConfig
from .load import PositionBias
from .values import (
    AGGREGATE,
    CONTEXT_LABELS,
    GRID_COLUMNS,
    POSITIONS,
    UNDEFINED,
    category_order,
    direction,
    fmt_p,
    grid,
    number,
    stars,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FIGURES_DIR = "figures"
"""Folder (inside the run directory) that receives the figure files."""
FIGURE_PREFIXES = ("heatmap_", "forest_", "flag_", "training_", "position_", "spillover_map")
"""Name prefixes of the files this module writes (stale ones are pruned)."""

# colours: degradation / improvement / neutral (colour-blind safe pair from RdBu)
_BAD = "#b2182b"
_GOOD = "#2166ac"
_NEUTRAL = "#8c8c8c"
_BASE_COLOR = "#7f7f7f"
_ALIGNED_COLOR = "#d95f02"

MPL_RC: dict[str, Any] = {
    "svg.hashsalt": "spillover-report",
    "svg.fonttype": "path",
    "text.parse_math": False,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "figure.dpi": 100,
    "savefig.dpi": 100,
    "path.simplify": True,
}


@dataclass
class FigureOut:
    """One rendered figure."""

    name: str
    """File stem inside ``figures/``."""
    title: str
    """Heading shown above the figure."""
    caption: str
    """How to read it (plain text)."""
    png: bytes | None = None
    """PNG bytes, when PNG is among the figure formats."""
    svg: str | None = None
    """SVG text, when SVG is among the figure formats or needed for inlining."""
    files: list[str] = field(default_factory=list)
    """Paths (relative to the run directory) of the files written for it."""
    data: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    """What a line figure plots, per series: its x and y values (the training figure's
    log-history keys, e.g. ``eval_loss``: steps and values)."""

    @property
    def png_b64(self) -> str:
        """The PNG as base64 (for a data URI)."""
        return base64.b64encode(self.png or b"").decode("ascii")

    @property
    def svg_inline(self) -> str:
        """The SVG without XML declaration and DOCTYPE, to inline in HTML."""
        text = self.svg or ""
        text = re.sub(r"<\?xml[^>]*\?>\s*", "", text)
        text = re.sub(r"<!DOCTYPE[^>]*>\s*", "", text)
        text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
        return text.strip()


def _render(fig: Figure, out: FigureOut, cfg: ReportConfig) -> FigureOut:
    if "png" in cfg.figure_formats:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=cfg.dpi, metadata={"Software": None})
        out.png = buf.getvalue()
    if "svg" in cfg.figure_formats or "png" not in cfg.figure_formats:
        sbuf = io.StringIO()
        fig.savefig(sbuf, format="svg", metadata={"Date": None, "Creator": None})
        out.svg = sbuf.getvalue()
    out.files = [f"{FIGURES_DIR}/{out.name}.{ext}" for ext in cfg.figure_formats]
    return out


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _row_labels(rows: Sequence[str], targets: Sequence[str]) -> list[str]:
    out = []
    for r in rows:
        if r == AGGREGATE:
            out.append("all attributes")
        elif r in targets:
            out.append(f"{r} (target)")
        else:
            out.append(r)
    return out


def _style_target_ticks(ax: Axes, rows: Sequence[str], targets: Sequence[str]) -> None:
    for tick, row in zip(ax.get_yticklabels(), rows, strict=True):
        if row in targets:
            tick.set_fontweight("bold")
            tick.set_color(_ALIGNED_COLOR)
        elif row == AGGREGATE:
            tick.set_fontweight("bold")


def heatmap(
    comparison: Comparison,
    targets: Sequence[str],
    alpha: float,
    cfg: ReportConfig,
    *,
    metric: str,
) -> FigureOut:
    """A category x context grid of ``delta_accuracy`` or ``delta_bias_score``."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import Normalize

    cells = grid(comparison)
    rows = category_order(c for c, _ in cells)
    cols = list(GRID_COLUMNS)
    is_acc = metric == "delta_accuracy"
    values = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            rec = cells.get((r, c))
            v = number(getattr(rec, metric)) if rec is not None else None
            if v is not None:
                values[i, j] = v * 100 if is_acc else v
    finite = values[np.isfinite(values)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = max(vmax, 1.0 if is_acc else 0.01)
    # accuracy: blue = better; bias score: red = more stereotyped answers
    cmap = matplotlib.colormaps["RdBu" if is_acc else "RdBu_r"]
    norm = Normalize(vmin=-vmax, vmax=vmax)
    fig = _new_figure(7.2, 6.4)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            _heatmap_cell(ax, i, j, cells.get((r, c)), values[i, j], norm, is_acc, alpha)
    ax.set_xticks(range(len(cols)), [CONTEXT_LABELS[c] for c in cols])
    ax.set_yticks(range(len(rows)), _row_labels(rows, targets))
    _style_target_ticks(ax, rows, targets)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    ax.axhline(len(rows) - 1.5, color="black", linewidth=1.2)
    ax.axvline(len(cols) - 1.5, color="black", linewidth=1.2)
    for spine in ax.spines.values():
        spine.set_visible(False)
    cbar = fig.colorbar(
        matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.8, pad=0.02
    )
    label, name, title, caption = _heatmap_text(is_acc, alpha)
    cbar.set_label(label)
    return _render(fig, FigureOut(name, title, caption), cfg)


def _heatmap_cell(
    ax: Axes,
    i: int,
    j: int,
    rec: StratumRecord | None,
    v: float,
    norm: Any,
    is_acc: bool,
    alpha: float,
) -> None:
    """Draw one heatmap cell's label: the value with its mark, ``undefined`` or ``no data``."""
    import math

    from matplotlib.patches import Rectangle

    if rec is None:
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="none"))
        ax.text(j, i, "no data", ha="center", va="center", color="#999999", fontsize=8)
        return
    if not math.isfinite(v):
        ax.add_patch(
            Rectangle(
                (j - 0.5, i - 0.5),
                1,
                1,
                facecolor="#e6e6e6",
                edgecolor="#a0a0a0",
                hatch="///",
                linewidth=0,
            )
        )
        ax.text(
            j,
            i,
            UNDEFINED,
            ha="center",
            va="center",
            fontsize=8,
            color="#404040",
            bbox={"facecolor": "#e6e6e6", "edgecolor": "none", "pad": 1.0},
        )
        return
    if is_acc:
        mark = stars(rec, alpha)
        label = f"{v:+.1f}{mark}"
    else:
        lo, hi = rec.delta_bias_score_ci_low, rec.delta_bias_score_ci_high
        excludes = lo is not None and hi is not None and (lo > 0 or hi < 0)
        mark = "†" if excludes and not rec.bias_low_support else ""
        label = f"{v:+.3f}{mark}" + ("\nlow n" if rec.bias_low_support else "")
    dark = abs(float(norm(v)) - 0.5) > 0.32
    ax.text(
        j,
        i,
        label,
        ha="center",
        va="center",
        fontsize=9,
        color="white" if dark else "black",
        fontweight="bold" if mark else "normal",
    )


def _heatmap_text(is_acc: bool, alpha: float) -> tuple[str, str, str, str]:
    """Colour-bar label, file name, title and caption of a heatmap."""
    if is_acc:
        caption = (
            "Each cell is the aligned model's accuracy minus the base model's, in percentage "
            "points, on one BBQ attribute (row) and context condition (column). Blue: the "
            "aligned model answers more items correctly; red: fewer. The colour scale is "
            f"centred at 0. * adjusted p < {alpha:g}, ** adjusted p < {alpha / 5:g} (the "
            "comparison's test, scenario-clustered by default, multiple-comparison corrected). "
            "The bottom row and the right column "
            "aggregate over attributes and contexts; compare them with the cells they "
            "summarise to spot gains that hide losses."
        )
        return (
            "Δ accuracy, aligned − base (percentage points)",
            "heatmap_delta_accuracy",
            "Δ accuracy by attribute × context",
            caption,
        )
    caption = (
        "Each cell is the change in the BBQ bias score (aligned − base). Red: answers "
        "lean more towards the stereotyped option after alignment; blue: less. Hatched grey "
        "cells are undefined (for example no non-unknown answer to score); they are not "
        "zero. † the 95% cluster-bootstrap interval of the change excludes 0 (not corrected for "
        "multiple comparisons); never shown for a score resting on fewer than 10 non-unknown "
        "answers ('low n'), where one answer moves it by 20 points or more."
    )
    return (
        "Δ bias score, aligned − base",
        "heatmap_delta_bias_score",
        "Δ bias score by attribute × context",
        caption,
    )


def forest(
    comparison: Comparison, targets: Sequence[str], alpha: float, cfg: ReportConfig
) -> FigureOut:
    cells = grid(comparison)
    rows = category_order(c for c, _ in cells)
    fig = _new_figure(10.5, 6.2)
    axes = fig.subplots(1, len(GRID_COLUMNS), sharey=True, sharex=True)
    ys = list(range(len(rows)))
    for ax, ctx in zip(axes, GRID_COLUMNS, strict=True):
        for y, r in zip(ys, rows, strict=True):
            if r in targets:
                ax.axhspan(y - 0.5, y + 0.5, color=_ALIGNED_COLOR, alpha=0.10, linewidth=0)
            rec = cells.get((r, ctx))
            if rec is None:
                continue
            d = rec.delta_accuracy
            moved = direction(rec, alpha)
            color = _BAD if moved == "degraded" else _GOOD if moved else _NEUTRAL
            lo, hi = rec.delta_accuracy_ci_low, rec.delta_accuracy_ci_high
            ax.plot([lo * 100, hi * 100], [y, y], color=color, linewidth=2 if moved else 1.2)
            ax.plot(
                [d * 100],
                [y],
                marker="D" if moved else "o",
                markersize=6 if moved else 4.5,
                color=color,
                markeredgecolor="black" if moved else color,
                markeredgewidth=0.6,
                linestyle="none",
            )
        ax.axvline(0, color="black", linewidth=0.8)
        ax.axhline(len(rows) - 1.5, color="#444444", linewidth=0.6, linestyle=":")
        ax.set_title(CONTEXT_LABELS[ctx])
        ax.set_xlabel("Δ accuracy (pp), 95% CI")
        ax.grid(axis="x", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
    axes[0].set_yticks(ys, _row_labels(rows, targets))
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    _style_target_ticks(axes[0], rows, targets)
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_BAD, marker="D", markeredgecolor="black", label="significant loss"),
        Line2D([], [], color=_GOOD, marker="D", markeredgecolor="black", label="significant gain"),
        Line2D([], [], color=_NEUTRAL, marker="o", label="not significant"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    caption = (
        "Change in accuracy (aligned − base) with its 95% confidence interval, one panel per "
        "context condition, one row per attribute. Diamonds mark strata whose corrected "
        f"p-value (the comparison's test) is below {alpha:g} (red: loss, blue: gain); grey circles are not "
        "significant. Shaded rows are the alignment target(s); every other row is a possible "
        "spillover. The intervals are not multiplicity-adjusted, so an interval can exclude 0 "
        "while the corrected test is not significant."
    )
    return _render(
        fig,
        FigureOut("forest_delta_accuracy", "Δ accuracy with confidence intervals", caption),
        cfg,
    )


def _slug(text: str) -> str:
    """A file-name-safe form of ``text``."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:40] or "x"


def flag_title(flag: Flag) -> str:
    """``Masking: Age · all``."""
    where = " · ".join(flag.aggregate.get(k, AGGREGATE) for k in ("category", "context_condition"))
    return f"{flag.kind.capitalize()}: {where}"


def _flag_bars(
    flag: Flag, cells: Mapping[tuple[str, str], StratumRecord]
) -> list[tuple[str, float | None, float | None, float | None, bool]]:
    """``(label, delta, n, p_adjusted, is_aggregate)`` for the aggregate and each stratum."""
    key = (
        flag.aggregate.get("category", AGGREGATE),
        flag.aggregate.get("context_condition", AGGREGATE),
    )
    rec = cells.get(key)
    p = rec.p_adjusted if rec is not None else None
    bars: list[tuple[str, float | None, float | None, float | None, bool]] = [
        (f"{key[0]} · {key[1]} (aggregate)", flag.aggregate_delta, float(flag.aggregate_n), p, True)
    ]
    for s in flag.strata:
        key = (str(s.get("category")), str(s.get("context_condition")))
        rec = cells.get(key)
        p = number(s["p_adjusted"]) if "p_adjusted" in s else (rec.p_adjusted if rec else None)
        bars.append((f"{key[0]} · {key[1]}", number(s.get("delta")), number(s.get("n")), p, False))
    return bars


def flag_panel(
    index: int,
    flag: Flag,
    cells: Mapping[tuple[str, str], StratumRecord],
    alpha: float,
    cfg: ReportConfig,
) -> FigureOut:
    bars = _flag_bars(flag, cells)
    is_acc = flag.metric == "accuracy"
    scale = 100.0 if is_acc else 1.0
    fig = _new_figure(7.2, 1.0 + 0.62 * max(len(bars), 1))
    ax = fig.add_subplot()
    ns = [n for _, _, n, _, _ in bars if n]
    n_max = max(ns) if ns else 1.0
    for y, (_, d, n, p, is_agg) in enumerate(bars):
        height = 0.25 + 0.55 * ((n or 0) / n_max)
        if d is None:
            ax.text(0, y, UNDEFINED, va="center", ha="left", fontsize=8)
            continue
        sig = p is not None and p < alpha
        color = (_BAD if d < 0 else _GOOD) if sig else _NEUTRAL
        ax.barh(
            y,
            d * scale,
            height=height,
            color=color,
            alpha=0.55 if is_agg else 0.9,
            edgecolor="black",
            linewidth=1.2 if is_agg else 0.4,
            hatch="//" if is_agg else None,
        )
        value = f"{d * scale:+.1f} pp" if is_acc else f"{d:+.3f}"
        ax.annotate(
            value,
            (d * scale, y),
            xytext=(4 if d >= 0 else -4, 0),
            textcoords="offset points",
            ha="left" if d >= 0 else "right",
            va="center",
            fontsize=8.5,
            fontweight="bold" if sig else "normal",
        )
    labels = []
    for label, _, n, p, _ in bars:
        n_txt = f"n={round(n):,}" if n is not None else "n=?"
        p_txt = f"p adj.={fmt_p(p)}" if p is not None else f"p adj. {UNDEFINED}"
        labels.append(f"{label}\n{n_txt}, {p_txt}")
    ax.set_yticks(range(len(bars)), labels)
    ax.set_ylim(len(bars) - 0.5, -0.5)
    ax.axvline(0, color="black", linewidth=0.8)
    vals = [abs(b[1] * scale) for b in bars if b[1] is not None]
    lim = max(vals) if vals else 1.0
    ax.set_xlim(-lim * 1.35, lim * 1.35)
    ax.set_xlabel("Δ accuracy (pp)" if is_acc else f"Δ {flag.metric.replace('_', ' ')}")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    title = flag_title(flag)
    caption = (
        "The hatched bar is the aggregate, the others are the strata it pools; bar "
        "thickness is proportional to the stratum size n (its weight in the aggregate). "
        f"Coloured bars are significant after correction (adjusted p < {alpha:g}; red loss, "
        "blue gain)."
    )
    where = _slug(flag.aggregate.get("category", AGGREGATE))
    name = f"flag_{index:02d}_{_slug(flag.kind)}_{where}"
    return _render(fig, FigureOut(name, title, caption), cfg)


_TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Loss", ("loss", "eval_loss")),
    ("Reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("Reward margin", ("rewards/margins", "eval_rewards/margins")),
    ("Rewards", ("rewards/chosen", "rewards/rejected")),
)


def training_figure(history: Sequence[Mapping[str, Any]], cfg: ReportConfig) -> FigureOut | None:
    panels: list[tuple[str, list[tuple[str, list[float], list[float]]]]] = []
    for title, keys in _TRAINING_PANELS:
        series = []
        for key in keys:
            pts = [
                (s, v)
                for rec in history
                if (s := number(rec.get("step"))) is not None
                and (v := number(rec.get(key))) is not None
            ]
            if pts:
                series.append((key, [p[0] for p in pts], [p[1] for p in pts]))
        if series:
            panels.append((title, series))
    if not panels:
        return None
    fig = _new_figure(10.5, 2.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, series) in zip(axes, panels, strict=True):
        for i, (key, xs, ys) in enumerate(series):
            held_out = key.startswith("eval_")
            ax.plot(
                xs,
                ys,
                linewidth=1.4,
                color=("#1b9e77", "#d95f02", "#7570b3")[i % 3],
                label="held-out pairs" if held_out else "training" if len(series) > 1 else key,
                marker="o" if held_out else None,
                markersize=4,
                linestyle="--" if held_out else "-",
            )
            if title == "Rewards":
                ax.lines[-1].set_label(key)
        if title == "Reward accuracy":
            ax.axhline(0.5, color="#999999", linewidth=0.8, linestyle="--")
        if title in ("Reward margin", "Rewards"):
            ax.axhline(0, color="#999999", linewidth=0.8, linestyle="--")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(color="#eeeeee", linewidth=0.6)
        if len(series) > 1 or title == "Rewards":
            ax.legend(fontsize=7, frameon=False)
    caption = (
        "Preference-optimisation training as logged by the trainer. Loss should fall; reward "
        "accuracy is the share of training pairs whose chosen answer the policy prefers over "
        "the rejected one relative to the reference model (0.5 dashed = chance); the margin is "
        "the mean reward gap between chosen and rejected answers. A reward accuracy near 1 "
        "with a still-growing margin can mean the model is memorising the target attribute."
    )
    if any(key.startswith("eval_") for _, series in panels for key, _, _ in series):
        caption += (
            " Dashed lines with dots: the same measures on a sample of the held-out pairs "
            "(scenarios never trained on), evaluated during training; training points that "
            "improve while held-out ones do not are overfitting to the training scenarios."
        )
    out = FigureOut("training_curves", "Training curves", caption)
    out.data = {key: (xs, ys) for _, series in panels for key, xs, ys in series}
    return _render(fig, out, cfg)


def position_figure(pb: PositionBias, cfg: ReportConfig) -> FigureOut:
    import numpy as np

    fig = _new_figure(10.5, 3.2)
    ax1, ax2 = fig.subplots(1, 2)
    models = [m for m in ("base", "aligned") if m in pb.shares]
    colors = {"base": _BASE_COLOR, "aligned": _ALIGNED_COLOR}
    width = 0.38
    x = np.arange(3)
    for i, m in enumerate(models):
        offs = (i - (len(models) - 1) / 2) * width
        bars = ax1.bar(x + offs, [s * 100 for s in pb.shares[m]], width, color=colors[m], label=m)
        ax1.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax1.axhline(100 / 3, color="black", linewidth=0.8, linestyle="--")
    ax1.set_xticks(x, [f"position {p}" for p in POSITIONS])
    ax1.set_ylabel("share of answers (%)")
    ax1.set_title("Which displayed position is picked")
    top = max(max(v) for v in pb.shares.values()) * 100
    ax1.set_ylim(0, max(top * 1.25, 40))
    ax1.legend(frameon=False, fontsize=8, loc="upper right", ncols=2)
    xp = np.arange(len(pb.permutations))
    for i, m in enumerate(models):
        offs = (i - (len(models) - 1) / 2) * width
        vals = [pb.accuracy[m].get(p, float("nan")) * 100 for p in pb.permutations]
        bars = ax2.bar(xp + offs, vals, width, color=colors[m], label=m)
        ax2.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax2.set_xticks(xp, [f"order {p}" for p in pb.permutations])
    ax2.set_ylabel("accuracy (%)")
    ax2.set_ylim(0, 115)
    ax2.legend(frameon=False, fontsize=8, loc="upper right", ncols=2)
    ax2.set_title("Accuracy per answer order")
    for ax in (ax1, ax2):
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    caption = (
        "Left: share of answers at each displayed position (A, B, C) over all items and answer "
        "orders; with orders balanced, an unbiased model picks each position a third of the "
        "time (dashed line). Right: accuracy under each answer order (the digits give which "
        "original option is shown at A, B, C). Differences between orders are position "
        "bias, not knowledge; a change in position bias after alignment can masquerade as a "
        "fairness change."
    )
    return _render(fig, FigureOut("position_bias", "Answer-position bias", caption), cfg)
