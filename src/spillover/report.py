"""Report stage: tables, figures, HTML and Markdown from a run's artifacts.

The report is rebuilt from files alone (no model, no torch). It reads, from a
run directory:

* ``stats/comparison.json`` (required): per-stratum paired comparisons of the
  base and aligned models, Simpson flags, a summary and warnings;
* ``manifest.json`` (optional): versions, models, configuration, BBQ
  verification, timings;
* ``align/log_history.json`` (optional): the trainer's log history;
* ``eval/{base,aligned}/predictions.parquet`` (optional): per-item predictions,
  used for the answer-position view when several answer orders were evaluated.

It writes ``report.html`` (self-contained: figures embedded, CSS inline, no
script, no external request), ``report.md`` (Markdown tables, figures linked)
and ``figures/``. Every file is written to a temporary file and renamed, and
nothing is written before all content is built: a failed build leaves the
previous report as it was. Output is deterministic: the same artifacts give the
same bytes.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._io import atomic_write_bytes, atomic_write_text
from ._rundir import COMPARISON_FILE, LOG_HISTORY_FILE, MANIFEST_FILE, PREDICTION_FILES
from .data import CATEGORIES
from .errors import ConfigError, DataError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

FIGURES_DIR = "figures"
"""Folder (inside the run directory) that receives the figure files."""

CONTEXTS: tuple[str, ...] = ("ambig", "disambig", "all")
"""Column order of the stratum grids."""
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

_FORMATS = ("html", "md")
_FIGURE_FORMATS = ("png", "svg")
_FIGURE_PREFIXES = ("heatmap_", "forest_", "flag_", "training_", "position_")

# colours: degradation / improvement / neutral (colour-blind safe pair from RdBu)
_BAD = "#b2182b"
_GOOD = "#2166ac"
_NEUTRAL = "#8c8c8c"
_BASE_COLOR = "#7f7f7f"
_ALIGNED_COLOR = "#d95f02"

_MPL_RC: dict[str, Any] = {
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


@dataclass(frozen=True)
class ReportConfig:
    """Options of :func:`write_report`; every field has a sensible default."""

    alpha: float | None = None
    """Significance level applied to adjusted p-values. None: the level recorded in the
    comparison (``summary.alpha``, else ``config.alpha``), else 0.05."""
    formats: tuple[str, ...] = ("html", "md")
    """Documents to write: any of ``html`` and ``md``."""
    figure_formats: tuple[str, ...] = ("png",)
    """Figure files to write into ``figures/``: any of ``png`` and ``svg``. The HTML embeds
    the PNG when ``png`` is listed, else inlines the SVG."""
    title: str | None = None
    """Report title. None: ``Bias spillover report: <run directory name>``."""
    dpi: int = 110
    """Resolution of PNG figures."""
    max_flag_panels: int = 24
    """At most this many Simpson-flag panels are drawn (all flags are still listed)."""

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            raise ConfigError(f"report alpha={self.alpha!r}; expected a number in (0, 1)")
        bad = [f for f in self.formats if f not in _FORMATS]
        if bad or not self.formats:
            raise ConfigError(
                f"report formats={list(self.formats)!r}; expected one or more of {list(_FORMATS)}"
            )
        bad = [f for f in self.figure_formats if f not in _FIGURE_FORMATS]
        if bad or not self.figure_formats:
            raise ConfigError(
                f"figure formats={list(self.figure_formats)!r}; expected one or more of "
                f"{list(_FIGURE_FORMATS)}"
            )
        if not 30 <= self.dpi <= 600:
            raise ConfigError(f"report dpi={self.dpi!r}; expected 30..600")
        if self.max_flag_panels < 0:
            raise ConfigError(f"max_flag_panels={self.max_flag_panels!r}; expected >= 0")


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Comparison:
    """The parts of ``stats/comparison.json`` the report uses (extra keys are ignored)."""

    strata: list[dict[str, Any]]
    """Stratum records, as in the file."""
    flags: list[dict[str, Any]]
    """Simpson flag records, as in the file."""
    summary: dict[str, Any]
    """The ``summary`` object (may be empty)."""
    warnings: list[str]
    """Warnings recorded by the stats stage."""
    config: dict[str, Any]
    """The ``config`` object (may be empty)."""
    path: Path
    """Where it was read from."""


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {what}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); {what}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {what}"
        ) from None


def load_comparison(path: Path) -> Comparison:
    """Read and check ``stats/comparison.json``.

    Args:
        path: The comparison file.

    Returns:
        The comparison, with every stratum record holding ``category`` and
        ``context_condition`` strings.

    Raises:
        DataError: The file is missing, is not JSON, or lacks the expected shape.
    """
    what = "expected the comparison written by the stats stage (`spillover compare`); rerun it"
    obj = _read_json(path, what)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: top level is {type(obj).__name__}; expected an object")
    strata = obj.get("strata")
    if not isinstance(strata, list):
        raise DataError(f"{path}: `strata` is missing or not a list; {what}")
    for i, rec in enumerate(strata):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: strata[{i}] is {type(rec).__name__}; expected an object")
        for key in ("category", "context_condition"):
            if not isinstance(rec.get(key), str):
                raise DataError(f"{path}: strata[{i}].{key} is {rec.get(key)!r}; expected a string")
    flags = obj.get("flags") or []
    if not isinstance(flags, list):
        raise DataError(f"{path}: `flags` is {type(flags).__name__}; expected a list")
    summary = obj.get("summary") or {}
    config = obj.get("config") or {}
    warnings = obj.get("warnings") or []
    return Comparison(
        strata=strata,
        flags=[f for f in flags if isinstance(f, dict)],
        summary=summary if isinstance(summary, dict) else {},
        warnings=[_text(w) for w in warnings] if isinstance(warnings, list) else [_text(warnings)],
        config=config if isinstance(config, dict) else {},
        path=path,
    )


# --------------------------------------------------------------------------- values


def _num(rec: Mapping[str, Any], key: str) -> float | None:
    """A finite number from ``rec[key]``, else None (null, NaN, missing, not a number)."""
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        msg = value.get("message") or value.get("text")
        if isinstance(msg, str):
            return msg
    return json.dumps(value, sort_keys=True, default=str)


def _cell(rec: Mapping[str, Any], key: str, fmt: str) -> str:
    """Format ``rec[key]``: ``undefined`` when null, ``—`` when the key is absent."""
    if key not in rec:
        return ABSENT
    value = rec[key]
    if isinstance(value, str) and fmt != "num":
        return value
    number = _num(rec, key)
    if number is None:
        return UNDEFINED if value is None or isinstance(value, float) else _text(value)
    return _fmt(number, fmt)


def _fmt(x: float, fmt: str) -> str:
    if fmt == "pct":
        return f"{x * 100:.1f}%"
    if fmt == "pp":
        return f"{x * 100:+.1f} pp"
    if fmt == "int":
        return f"{round(x):,}"
    if fmt == "p":
        return _fmt_p(x)
    if fmt == "signed":
        return f"{x:+.3f}"
    return f"{x:.3g}" if abs(x) < 1e4 else f"{x:.4g}"


def _fmt_p(p: float) -> str:
    if p < 0.001:
        return f"{p:.1e}"
    return f"{p:.3f}"


def _ci(rec: Mapping[str, Any], low: str, high: str, fmt: str) -> str:
    if low not in rec and high not in rec:
        return ABSENT
    lo, hi = _num(rec, low), _num(rec, high)
    if lo is None or hi is None:
        return UNDEFINED
    if fmt == "pp":
        return f"[{lo * 100:+.1f}, {hi * 100:+.1f}] pp"
    if fmt == "signed":
        return f"[{lo:+.3f}, {hi:+.3f}]"
    return f"[{_fmt(lo, fmt)}, {_fmt(hi, fmt)}]"


def _polarity(rec: Mapping[str, Any]) -> str | None:
    value = rec.get("question_polarity")
    if value is None or value == AGGREGATE:
        return None
    return str(value)


def _is_main(rec: Mapping[str, Any]) -> bool:
    """A row not split by question polarity (the grid rows)."""
    return _polarity(rec) is None


def _is_fine(rec: Mapping[str, Any]) -> bool:
    """One of the attribute x context strata (not an aggregate, not a polarity split)."""
    return (
        _is_main(rec)
        and rec["category"] != AGGREGATE
        and rec["context_condition"] in ("ambig", "disambig")
    )


def _delta(rec: Mapping[str, Any]) -> float | None:
    d = _num(rec, "delta_accuracy")
    if d is None:
        b, c, n = _num(rec, "b"), _num(rec, "c"), _num(rec, "n")
        if b is not None and c is not None and n:
            d = (c - b) / n
    return d


def _direction(rec: Mapping[str, Any], alpha: float) -> str | None:
    """``degraded`` / ``improved`` when the adjusted p-value is below ``alpha``, else None."""
    p = _num(rec, "p_adjusted")
    if p is None:
        p = _num(rec, "p_value") if "p_adjusted" not in rec else None
    d = _delta(rec)
    if p is None or d is None or p >= alpha or d == 0:
        return None
    return "degraded" if d < 0 else "improved"


def _stars(rec: Mapping[str, Any], alpha: float) -> str:
    """``**`` when p_adj < alpha/5 (0.01 at alpha 0.05), ``*`` when p_adj < alpha."""
    p = _num(rec, "p_adjusted")
    if p is None:
        return ""
    if p < alpha / 5:
        return "**"
    return "*" if p < alpha else ""


def _category_order(categories: Iterable[str]) -> list[str]:
    present = set(categories)
    known = [c for c in CATEGORIES]
    extra = sorted(c for c in present if c not in CATEGORIES and c != AGGREGATE)
    return [*known, *extra, AGGREGATE]


def _sort_key(rec: Mapping[str, Any]) -> tuple[int, str, int, str]:
    cat = str(rec["category"])
    ctx = str(rec["context_condition"])
    cat_rank = (
        CATEGORIES.index(cat)
        if cat in CATEGORIES
        else (len(CATEGORIES) + 1 if cat == AGGREGATE else len(CATEGORIES))
    )
    ctx_rank = CONTEXTS.index(ctx) if ctx in CONTEXTS else len(CONTEXTS)
    return (cat_rank, cat, ctx_rank, ctx + "|" + (_polarity(rec) or ""))


def _targets(comparison: Comparison, manifest: Mapping[str, Any] | None) -> list[str]:
    sources: list[Mapping[str, Any]] = [comparison.summary, comparison.config]
    if manifest is not None and isinstance(manifest.get("config"), Mapping):
        sources.append(manifest["config"])
    for src in sources:
        for key in ("targets", "target", "target_categories", "target_category"):
            value = src.get(key)
            if isinstance(value, str) and value:
                return [value]
            if isinstance(value, list) and value:
                return [str(v) for v in value]
    return []


def _alpha(cfg: ReportConfig, comparison: Comparison) -> float:
    if cfg.alpha is not None:
        return cfg.alpha
    for src in (comparison.summary, comparison.config):
        a = _num(src, "alpha")
        if a is not None and 0 < a < 1:
            return a
    return 0.05


_CORRECTION_NAMES: Mapping[str, str] = {
    "holm": "Holm",
    "bonferroni": "Bonferroni",
    "bh": "Benjamini–Hochberg",
    "fdr_bh": "Benjamini–Hochberg",
    "by": "Benjamini–Yekutieli",
    "fdr_by": "Benjamini–Yekutieli",
    "hochberg": "Hochberg",
    "none": "no",
}


def _correction(comparison: Comparison) -> str | None:
    names = sorted(
        {
            _CORRECTION_NAMES.get(str(r["correction"]).lower(), str(r["correction"]))
            for r in comparison.strata
            if r.get("correction")
        }
    )
    if names:
        return ", ".join(names)
    value = comparison.config.get("correction")
    return str(value) if value else None


def _label(rec: Mapping[str, Any]) -> str:
    pol = _polarity(rec)
    base = f"{rec.get('category')} · {rec.get('context_condition')}"
    return f"{base} · {pol}" if pol else base


# --------------------------------------------------------------------------- figures


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


def _grid(comparison: Comparison) -> dict[tuple[str, str], dict[str, Any]]:
    grid: dict[tuple[str, str], dict[str, Any]] = {}
    for rec in comparison.strata:
        if _is_main(rec):
            grid.setdefault((rec["category"], rec["context_condition"]), rec)
    return grid


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


def _heatmap(
    comparison: Comparison,
    targets: Sequence[str],
    alpha: float,
    cfg: ReportConfig,
    *,
    metric: str,
) -> FigureOut:
    import numpy as np
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    grid = _grid(comparison)
    rows = _category_order(c for c, _ in grid)
    cols = list(CONTEXTS)
    is_acc = metric == "delta_accuracy"
    values = np.full((len(rows), len(cols)), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            rec = grid.get((r, c))
            if rec is not None:
                v = _delta(rec) if is_acc else _num(rec, metric)
                if v is not None:
                    values[i, j] = v * 100 if is_acc else v
    finite = values[np.isfinite(values)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = max(vmax, 1.0 if is_acc else 0.01)
    # accuracy: blue = better; bias score: red = more stereotyped answers
    cmap_name = "RdBu" if is_acc else "RdBu_r"
    import matplotlib

    cmap = matplotlib.colormaps[cmap_name]
    norm = Normalize(vmin=-vmax, vmax=vmax)
    fig = _new_figure(7.2, 6.4)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            rec = grid.get((r, c))
            if rec is None:
                ax.add_patch(
                    Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="white", edgecolor="none")
                )
                ax.text(j, i, "no data", ha="center", va="center", color="#999999", fontsize=8)
                continue
            v = values[i, j]
            if not np.isfinite(v):
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
                continue
            if is_acc:
                mark = _stars(rec, alpha)
                label = f"{v:+.1f}{mark}"
            else:
                lo, hi = _num(rec, "delta_bias_score_ci_low"), _num(rec, "delta_bias_score_ci_high")
                mark = "†" if lo is not None and hi is not None and (lo > 0 or hi < 0) else ""
                label = f"{v:+.3f}{mark}"
            dark = abs(float(norm(v)) - 0.5) > 0.32
            weight = "bold" if mark else "normal"
            ax.text(
                j,
                i,
                label,
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
                fontweight=weight,
            )
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
    if is_acc:
        cbar.set_label("Δ accuracy, aligned − base (percentage points)")
        name, title = "heatmap_delta_accuracy", "Δ accuracy by attribute × context"
        caption = (
            "Each cell is the aligned model's accuracy minus the base model's, in percentage "
            "points, on one BBQ attribute (row) and context condition (column). Blue: the "
            "aligned model answers more items correctly; red: fewer. The colour scale is "
            f"centred at 0. * adjusted p < {alpha:g}, ** adjusted p < {alpha / 5:g} (McNemar "
            "test, multiple-comparison corrected). The bottom row and the right column "
            "aggregate over attributes and contexts; compare them with the cells they "
            "summarise to spot gains that hide losses."
        )
    else:
        cbar.set_label("Δ bias score, aligned − base")
        name, title = "heatmap_delta_bias_score", "Δ bias score by attribute × context"
        caption = (
            "Each cell is the change in the BBQ bias score (aligned − base). Red: answers "
            "lean more towards the stereotyped option after alignment; blue: less. Hatched grey "
            "cells are undefined (for example no non-unknown answer to score); they are not "
            "zero. † the 95% confidence interval of the change excludes 0 (not corrected for "
            "multiple comparisons)."
        )
    return _render(fig, FigureOut(name, title, caption), cfg)


def _forest(
    comparison: Comparison, targets: Sequence[str], alpha: float, cfg: ReportConfig
) -> FigureOut:
    grid = _grid(comparison)
    rows = _category_order(c for c, _ in grid)
    fig = _new_figure(10.5, 6.2)
    axes = fig.subplots(1, len(CONTEXTS), sharey=True, sharex=True)
    ys = list(range(len(rows)))
    for ax, ctx in zip(axes, CONTEXTS, strict=True):
        for y, r in zip(ys, rows, strict=True):
            if r in targets:
                ax.axhspan(y - 0.5, y + 0.5, color=_ALIGNED_COLOR, alpha=0.10, linewidth=0)
            rec = grid.get((r, ctx))
            if rec is None:
                continue
            d = _delta(rec)
            if d is None:
                ax.text(0, y, UNDEFINED, ha="center", va="center", fontsize=7, color="#555555")
                continue
            direction = _direction(rec, alpha)
            color = _BAD if direction == "degraded" else _GOOD if direction else _NEUTRAL
            lo, hi = _num(rec, "delta_accuracy_ci_low"), _num(rec, "delta_accuracy_ci_high")
            if lo is not None and hi is not None:
                ax.plot(
                    [lo * 100, hi * 100], [y, y], color=color, linewidth=2 if direction else 1.2
                )
            ax.plot(
                [d * 100],
                [y],
                marker="D" if direction else "o",
                markersize=6 if direction else 4.5,
                color=color,
                markeredgecolor="black" if direction else color,
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
        f"McNemar p-value is below {alpha:g} (red: loss, blue: gain); grey circles are not "
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
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return slug[:40] or "x"


def _flag_title(flag: Mapping[str, Any]) -> str:
    agg = flag.get("aggregate") if isinstance(flag.get("aggregate"), Mapping) else {}
    assert isinstance(agg, Mapping)
    kind = _text(flag.get("kind")) or "flag"
    where = " · ".join(
        _text(agg.get(k)) for k in ("category", "context_condition") if agg.get(k) is not None
    )
    return f"{kind.capitalize()}: {where}" if where else kind.capitalize()


def _flag_bars(
    flag: Mapping[str, Any], grid: Mapping[tuple[str, str], Mapping[str, Any]]
) -> list[tuple[str, float | None, float | None, float | None, bool]]:
    """``(label, delta, n, p_adjusted, is_aggregate)`` for the aggregate and each stratum."""
    bars: list[tuple[str, float | None, float | None, float | None, bool]] = []
    agg = flag.get("aggregate")
    if isinstance(agg, Mapping):
        key = (_text(agg.get("category")), _text(agg.get("context_condition")))
        rec = grid.get(key, {})
        d = _num(agg, "delta")
        d = d if d is not None else _delta(rec) if rec else None
        n = _num(agg, "n") if _num(agg, "n") is not None else _num(rec, "n")
        p = _num(agg, "p_adjusted") if "p_adjusted" in agg else _num(rec, "p_adjusted")
        bars.append((f"{key[0]} · {key[1]} (aggregate)", d, n, p, True))
    for s in flag.get("strata") or []:
        if not isinstance(s, Mapping):
            continue
        key = (_text(s.get("category")), _text(s.get("context_condition")))
        rec = grid.get(key, {})
        d = _num(s, "delta")
        d = d if d is not None else _delta(rec) if rec else None
        n = _num(s, "n") if _num(s, "n") is not None else _num(rec, "n")
        p = _num(s, "p_adjusted") if "p_adjusted" in s else _num(rec, "p_adjusted")
        bars.append((f"{key[0]} · {key[1]}", d, n, p, False))
    return bars


def _flag_panel(
    index: int,
    flag: Mapping[str, Any],
    grid: Mapping[tuple[str, str], Mapping[str, Any]],
    alpha: float,
    cfg: ReportConfig,
) -> FigureOut:
    bars = _flag_bars(flag, grid)
    metric = _text(flag.get("metric")) or "delta_accuracy"
    is_acc = metric == "delta_accuracy"
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
        p_txt = f"p adj.={_fmt_p(p)}" if p is not None else f"p adj. {UNDEFINED}"
        labels.append(f"{label}\n{n_txt}, {p_txt}")
    ax.set_yticks(range(len(bars)), labels)
    ax.set_ylim(len(bars) - 0.5, -0.5)
    ax.axvline(0, color="black", linewidth=0.8)
    vals = [abs(b[1] * scale) for b in bars if b[1] is not None]
    lim = max(vals) if vals else 1.0
    ax.set_xlim(-lim * 1.35, lim * 1.35)
    ax.set_xlabel("Δ accuracy (pp)" if is_acc else f"Δ {metric}")
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    title = _flag_title(flag)
    caption = (
        "The hatched bar is the aggregate, the others are the strata it pools; bar "
        "thickness is proportional to the stratum size n (its weight in the aggregate). "
        f"Coloured bars are significant after correction (adjusted p < {alpha:g}; red loss, "
        "blue gain)."
    )
    kind = _slug(_text(flag.get("kind")) or "flag")
    agg = flag.get("aggregate")
    where = _slug(_text(agg.get("category"))) if isinstance(agg, Mapping) else "x"
    name = f"flag_{index:02d}_{kind}_{where}"
    return _render(fig, FigureOut(name, title, caption), cfg)


_TRAINING_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Loss", ("loss", "eval_loss")),
    ("Reward accuracy", ("rewards/accuracies", "eval_rewards/accuracies")),
    ("Reward margin", ("rewards/margins", "eval_rewards/margins")),
    ("Rewards", ("rewards/chosen", "rewards/rejected")),
)


def _training(history: Sequence[Mapping[str, Any]], cfg: ReportConfig) -> FigureOut | None:
    panels: list[tuple[str, list[tuple[str, list[float], list[float]]]]] = []
    for title, keys in _TRAINING_PANELS:
        series = []
        for key in keys:
            pts = [
                (s, v)
                for rec in history
                if (s := _num(rec, "step")) is not None and (v := _num(rec, key)) is not None
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
            ax.plot(
                xs, ys, linewidth=1.4, color=("#1b9e77", "#d95f02", "#7570b3")[i % 3], label=key
            )
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
    return _render(fig, FigureOut("training_curves", "Training curves", caption), cfg)


@dataclass(frozen=True)
class PositionBias:
    """Answer-position statistics per model from per-item predictions."""

    shares: dict[str, list[float]]
    """Per model (``base``/``aligned``): share of picks at displayed positions A, B, C."""
    accuracy: dict[str, dict[str, float]]
    """Per model: accuracy per permutation label."""
    counts: dict[str, int]
    """Per model: number of prediction rows used."""
    permutations: list[str]
    """Permutation labels, sorted."""


def _position_bias(frames: Mapping[str, Any]) -> PositionBias:
    shares: dict[str, list[float]] = {}
    accuracy: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    perms: set[str] = set()
    for model, df in frames.items():
        picked = df["displayed_pred"].dropna().astype(int)
        total = len(picked)
        shares[model] = [float((picked == k).sum()) / total if total else 0.0 for k in range(3)]
        grouped = df.groupby(df["permutation"].astype(str))["correct"]
        accuracy[model] = {str(k): float(v) for k, v in grouped.mean().sort_index().items()}
        perms.update(accuracy[model])
        counts[model] = len(df)
    return PositionBias(shares, accuracy, counts, sorted(perms))


def _position_figure(pb: PositionBias, cfg: ReportConfig) -> FigureOut:
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


# --------------------------------------------------------------------------- tables

_MAIN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n", "n", "int"),
    ("b", "b (base ✓, aligned ✗)", "int"),
    ("c", "c (base ✗, aligned ✓)", "int"),
    ("n_both_correct", "both ✓", "int"),
    ("n_both_wrong", "both ✗", "int"),
    ("acc_base", "acc. base", "pct"),
    ("acc_aligned", "acc. aligned", "pct"),
    ("delta_accuracy", "Δ acc.", "pp"),
)
_TEST_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("test", "test", "str"),
    ("statistic", "statistic", "num"),
    ("p_value", "p", "p"),
    ("p_adjusted", "p adj.", "p"),
    ("correction", "correction", "str"),
    ("family_size", "family", "int"),
)


def _table_main(strata: Sequence[Mapping[str, Any]], alpha: float) -> dict[str, Any]:
    header = ["category", "context", "polarity"]
    header += [h for _, h, _ in _MAIN_COLUMNS] + ["Δ acc. 95% CI"]
    header += [h for _, h, _ in _TEST_COLUMNS] + ["flags"]
    rows = []
    for rec in strata:
        cells = [
            _text(rec.get("category")),
            _text(rec.get("context_condition")),
            _polarity(rec) or AGGREGATE,
        ]
        cells += [_cell(rec, k, f) for k, _, f in _MAIN_COLUMNS]
        cells.append(_ci(rec, "delta_accuracy_ci_low", "delta_accuracy_ci_high", "pp"))
        cells += [_cell(rec, k, f) for k, _, f in _TEST_COLUMNS]
        flags = rec.get("flags")
        cells.append(
            ", ".join(_text(f) for f in flags) if isinstance(flags, list) else _text(flags)
        )
        rows.append({"cells": cells, "cls": _direction(rec, alpha) or ""})
    return {"header": header, "rows": rows}


def _table_effects(strata: Sequence[Mapping[str, Any]], alpha: float) -> dict[str, Any]:
    header = [
        "category",
        "context",
        "polarity",
        "CI method",
        "odds ratio",
        "odds ratio 95% CI",
        "bias score base",
        "bias score aligned",
        "Δ bias score",
        "Δ bias 95% CI",
        "note",
    ]
    rows = []
    for rec in strata:
        cells = [
            _text(rec.get("category")),
            _text(rec.get("context_condition")),
            _polarity(rec) or AGGREGATE,
            _cell(rec, "ci_method", "str"),
            _cell(rec, "odds_ratio", "num"),
            _ci(rec, "odds_ratio_ci_low", "odds_ratio_ci_high", "num"),
            _cell(rec, "bias_score_base", "signed"),
            _cell(rec, "bias_score_aligned", "signed"),
            _cell(rec, "delta_bias_score", "signed"),
            _ci(rec, "delta_bias_score_ci_low", "delta_bias_score_ci_high", "signed"),
            _text(rec.get("note")),
        ]
        rows.append({"cells": cells, "cls": _direction(rec, alpha) or ""})
    return {"header": header, "rows": rows}


def _table_significant(
    strata: Sequence[Mapping[str, Any]], targets: Sequence[str], alpha: float
) -> dict[str, Any]:
    header = ["category", "context", "polarity", "role", "Δ acc.", "95% CI", "p adj.", "change"]
    rows = []
    for rec in strata:
        direction = _direction(rec, alpha)
        if direction is None:
            continue
        cat = _text(rec.get("category"))
        role = "aggregate" if cat == AGGREGATE else "target" if cat in targets else "spillover"
        rows.append(
            {
                "cells": [
                    cat,
                    _text(rec.get("context_condition")),
                    _polarity(rec) or AGGREGATE,
                    role,
                    _cell(rec, "delta_accuracy", "pp"),
                    _ci(rec, "delta_accuracy_ci_low", "delta_accuracy_ci_high", "pp"),
                    _cell(rec, "p_adjusted", "p"),
                    direction,
                ],
                "cls": direction,
            }
        )
    return {"header": header, "rows": rows}


# --------------------------------------------------------------------------- summary


def _summary(comparison: Comparison, targets: Sequence[str], alpha: float) -> list[dict[str, str]]:
    """Plain-language bullet points: ``{"text": ..., "cls": "bad"|"good"|""}``."""
    fine = [r for r in comparison.strata if _is_fine(r)]
    correction = _correction(comparison)
    corr_txt = f"{correction} correction" if correction else "correction"
    out: list[dict[str, str]] = []
    if targets:
        out.append({"text": f"Alignment target: {', '.join(targets)}.", "cls": ""})
    else:
        out.append({"text": "Alignment target: not recorded in the artifacts.", "cls": ""})
    if not fine:
        out.append(
            {"text": "The comparison holds no attribute × context strata to summarise.", "cls": ""}
        )
    else:
        counts: dict[str, dict[str, int]] = {
            "degraded": {"ambig": 0, "disambig": 0},
            "improved": {"ambig": 0, "disambig": 0},
        }
        for rec in fine:
            d = _direction(rec, alpha)
            if d is not None:
                counts[d][rec["context_condition"]] += 1
        n_deg = sum(counts["degraded"].values())
        n_imp = sum(counts["improved"].values())
        out.append(
            {
                "text": (
                    f"After {corr_txt} (α = {alpha:g}), {n_deg} of {len(fine)} attribute × context "
                    f"strata lost accuracy significantly (ambiguous: {counts['degraded']['ambig']}, "
                    f"disambiguated: {counts['degraded']['disambig']}) and {n_imp} gained "
                    f"(ambiguous: {counts['improved']['ambig']}, disambiguated: "
                    f"{counts['improved']['disambig']})."
                ),
                "cls": "bad" if n_deg else "",
            }
        )
        spill = [r for r in fine if r["category"] not in targets]
        bad = [r for r in spill if _direction(r, alpha) == "degraded"]
        good = [r for r in spill if _direction(r, alpha) == "improved"]
        if targets:
            if bad:
                worst = ", ".join(
                    f"{r['category']} · {r['context_condition']} ({_cell(r, 'delta_accuracy', 'pp')}, "
                    f"p adj. {_cell(r, 'p_adjusted', 'p')})"
                    for r in sorted(bad, key=lambda r: _delta(r) or 0.0)
                )
                out.append(
                    {"text": f"Spillover losses on non-target attributes: {worst}.", "cls": "bad"}
                )
            else:
                out.append(
                    {
                        "text": "No non-target attribute × context stratum lost accuracy "
                        "significantly.",
                        "cls": "",
                    }
                )
            if good:
                names = ", ".join(f"{r['category']} · {r['context_condition']}" for r in good)
                out.append(
                    {"text": f"Spillover gains on non-target attributes: {names}.", "cls": "good"}
                )
    overall = _grid(comparison).get((AGGREGATE, AGGREGATE))
    if overall is not None:
        d = _cell(overall, "delta_accuracy", "pp")
        p = _cell(overall, "p_adjusted", "p")
        out.append(
            {
                "text": f"Over all attributes and contexts, accuracy changed by {d} "
                f"(p adj. {p}): read it together with the strata above, not instead of them.",
                "cls": "",
            }
        )
    if comparison.flags:
        kinds = sorted({_text(f.get("kind")) or "flag" for f in comparison.flags})
        out.append(
            {
                "text": f"{len(comparison.flags)} Simpson's-paradox flag(s) ({', '.join(kinds)}): "
                "an aggregate hides or reverses what its strata show. See “Simpson flags”.",
                "cls": "bad",
            }
        )
    else:
        out.append({"text": "No Simpson's-paradox flag (masking or reversal).", "cls": ""})
    return out


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and all(not isinstance(v, Mapping | list) for v in value):
        return [(prefix, ", ".join(_text(v) if not isinstance(v, str) else v for v in value))]
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            out += _flatten(v, f"{prefix}[{i}]")
        return out
    if value is None:
        return [(prefix, UNDEFINED)]
    return [(prefix, value if isinstance(value, str) else _text(value))]


def _provenance(manifest: Mapping[str, Any] | None, comparison: Comparison) -> list[list[str]]:
    rows: list[list[str]] = []
    if manifest is not None:
        for key in ("spillover_version", "git_revision"):
            if key in manifest:
                rows.append([key, _text(manifest[key]) or UNDEFINED])
        models = manifest.get("models")
        if isinstance(models, list):
            for i, m in enumerate(models):
                if isinstance(m, Mapping):
                    role = _text(m.get("role")) or f"model {i}"
                    rest = ", ".join(f"{k}={_text(v)}" for k, v in m.items() if k != "role")
                    rows.append([f"models.{role}", rest])
                else:
                    rows.append([f"models[{i}]", _text(m)])
        elif models is not None:
            rows += [list(kv) for kv in _flatten(models, "models")]
        for key in ("bbq", "seeds", "config", "libraries", "timings"):
            if key in manifest:
                value = manifest[key]
                if key == "timings" and isinstance(value, Mapping):
                    value = {
                        k: (f"{v:.1f} s" if isinstance(v, int | float) else v)
                        for k, v in value.items()
                    }
                rows += [list(kv) for kv in _flatten(value, key)]
    rows += [list(kv) for kv in _flatten(comparison.config, "stats.config")]
    return rows


# --------------------------------------------------------------------------- build


@dataclass
class _Report:
    title: str
    run_name: str
    alpha: float
    targets: list[str]
    summary: list[dict[str, str]]
    warnings: list[str]
    notes: list[str]
    flags: list[dict[str, Any]]
    figures: dict[str, FigureOut]
    flag_figures: dict[int, FigureOut]
    significant: dict[str, Any]
    table_main: dict[str, Any]
    table_effects: dict[str, Any]
    provenance: list[list[str]]
    position: dict[str, Any] | None
    n_strata: int
    embed_png: bool


def _load_optional_json(path: Path, label: str, notes: list[str], warnings: list[str]) -> Any:
    if not path.is_file():
        notes.append(f"{label} not found ({path.name}): that part of the report is skipped.")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"{label} ({path.name}) could not be read and is skipped: {exc}"
        logger.warning(msg)
        warnings.append(msg)
        return None


def _load_predictions(run_dir: Path, notes: list[str], warnings: list[str]) -> PositionBias | None:
    paths = {m: run_dir / p for m, p in PREDICTION_FILES.items()}
    missing = [p for p in PREDICTION_FILES.values() if not (run_dir / p).is_file()]
    if len(missing) == len(paths):
        notes.append("No per-item predictions (eval/*/predictions.parquet): position view skipped.")
        return None
    if missing:
        notes.append(f"{', '.join(missing)} not found: position view shows the other model only.")
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        notes.append("pandas is not installed: position view skipped.")
        return None
    frames: dict[str, Any] = {}
    need = {"permutation", "displayed_pred", "correct"}
    for model, path in paths.items():
        if not path.is_file():
            continue
        try:
            df = pd.read_parquet(path, columns=None)
        except Exception as exc:  # pyarrow raises many types for bad files
            msg = f"{PREDICTION_FILES[model]} could not be read and is skipped: {exc}"
            logger.warning(msg)
            warnings.append(msg)
            continue
        lacking = sorted(need - set(df.columns))
        if lacking:
            notes.append(
                f"{PREDICTION_FILES[model]} has no column(s) {', '.join(lacking)}: "
                "position view skipped for it."
            )
            continue
        frames[model] = df
    if not frames:
        return None
    n_perm = max(int(df["permutation"].astype(str).nunique()) for df in frames.values())
    if n_perm < 2:
        notes.append("Predictions hold a single answer order: position view skipped.")
        return None
    return _position_bias(frames)


def _build(run_dir: Path, cfg: ReportConfig) -> _Report:
    comparison = load_comparison(run_dir / COMPARISON_FILE)
    notes: list[str] = []
    warnings: list[str] = list(comparison.warnings)
    manifest_obj = _load_optional_json(run_dir / MANIFEST_FILE, "Manifest", notes, warnings)
    manifest = manifest_obj if isinstance(manifest_obj, dict) else None
    if manifest is not None:
        bbq = manifest.get("bbq")
        if isinstance(bbq, Mapping):
            if bbq.get("verified") is False:
                warnings.insert(
                    0,
                    "BBQ data NOT verified: the files differ from the pinned release (SHA-256), "
                    "so these results are not comparable with published BBQ numbers.",
                )
            for w in bbq.get("warnings") or []:
                warnings.append(f"BBQ: {_text(w)}")
        for w in manifest.get("warnings") or []:
            warnings.append(_text(w))
    summary_warn = comparison.summary.get("warnings")
    if isinstance(summary_warn, list):
        warnings += [_text(w) for w in summary_warn]
    dropped = comparison.summary.get("dropped")
    if isinstance(dropped, Mapping):
        lost = {k: v for k, v in dropped.items() if v}
        if lost:
            warnings.append(
                "Items dropped before testing: "
                + ", ".join(f"{k}: {_text(v)}" for k, v in lost.items())
            )
    # keep order, drop duplicates
    warnings = list(dict.fromkeys(w for w in warnings if w))

    history_obj = _load_optional_json(
        run_dir / LOG_HISTORY_FILE, "Training log history", notes, warnings
    )
    if isinstance(history_obj, Mapping):
        history_obj = history_obj.get("log_history")
    history = (
        [h for h in history_obj if isinstance(h, Mapping)] if isinstance(history_obj, list) else []
    )
    position = _load_predictions(run_dir, notes, warnings)

    alpha = _alpha(cfg, comparison)
    targets = _targets(comparison, manifest)
    strata = sorted(comparison.strata, key=_sort_key)

    import matplotlib

    # Figures are built with the object API (no pyplot, no global backend switch):
    # PNG is rendered by the Agg canvas, SVG by the SVG canvas.
    rc: Any = _MPL_RC
    with matplotlib.rc_context(rc):
        figures: dict[str, FigureOut] = {}
        figures["heatmap_acc"] = _heatmap(comparison, targets, alpha, cfg, metric="delta_accuracy")
        figures["heatmap_bias"] = _heatmap(
            comparison, targets, alpha, cfg, metric="delta_bias_score"
        )
        figures["forest"] = _forest(comparison, targets, alpha, cfg)
        grid = _grid(comparison)
        flag_figures: dict[int, FigureOut] = {}
        for i, flag in enumerate(comparison.flags[: cfg.max_flag_panels]):
            flag_figures[i] = _flag_panel(i + 1, flag, grid, alpha, cfg)
        if len(comparison.flags) > cfg.max_flag_panels:
            notes.append(
                f"{len(comparison.flags)} Simpson flags; panels drawn for the first "
                f"{cfg.max_flag_panels} (all are listed)."
            )
        if history:
            fig = _training(history, cfg)
            if fig is not None:
                figures["training"] = fig
            else:
                notes.append("The log history has no loss or reward values: curves skipped.")
        elif history_obj is not None:
            notes.append("The training log history is empty: curves skipped.")
        position_ctx: dict[str, Any] | None = None
        if position is not None:
            figures["position"] = _position_figure(position, cfg)
            models = [m for m in ("base", "aligned") if m in position.shares]
            position_ctx = {
                "header": ["", *models],
                "rows": [
                    [
                        f"picks at position {p}",
                        *(f"{position.shares[m][k] * 100:.1f}%" for m in models),
                    ]
                    for k, p in enumerate(POSITIONS)
                ]
                + [
                    [
                        f"accuracy, order {perm}",
                        *(
                            f"{position.accuracy[m][perm] * 100:.1f}%"
                            if perm in position.accuracy[m]
                            else ABSENT
                            for m in models
                        ),
                    ]
                    for perm in position.permutations
                ]
                + [["prediction rows", *(f"{position.counts[m]:,}" for m in models)]],
            }

    flags_ctx = []
    for i, flag in enumerate(comparison.flags):
        flags_ctx.append(
            {
                "title": _flag_title(flag),
                "explanation": _text(flag.get("explanation")) or "(no explanation recorded)",
                "figure": flag_figures.get(i),
            }
        )
    title = cfg.title or f"Bias spillover report: {run_dir.resolve().name}"
    return _Report(
        title=title,
        run_name=run_dir.resolve().name,
        alpha=alpha,
        targets=targets,
        summary=_summary(comparison, targets, alpha),
        warnings=warnings,
        notes=notes,
        flags=flags_ctx,
        figures=figures,
        flag_figures=flag_figures,
        significant=_table_significant(strata, targets, alpha),
        table_main=_table_main(strata, alpha),
        table_effects=_table_effects(strata, alpha),
        provenance=_provenance(manifest, comparison),
        position=position_ctx,
        n_strata=len(strata),
        embed_png="png" in cfg.figure_formats,
    )


def _md_escape(value: Any) -> str:
    """Escape text for a Markdown table cell or paragraph (no raw HTML survives)."""
    text = _text(value) if not isinstance(value, str) else value
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    text = re.sub(r"([\\`*_\[\]])", r"\\\1", text.replace("\\|", "\x00")).replace("\x00", "\\|")
    return text


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = _md_escape
    return env


def _render_documents(report: _Report, cfg: ReportConfig, template_stem: str) -> dict[str, str]:
    env = _environment()
    docs: dict[str, str] = {}
    ctx = {
        "r": report,
        "figure_formats": list(cfg.figure_formats),
        "contexts": CONTEXT_LABELS,
        "UNDEFINED": UNDEFINED,
    }
    if "html" in cfg.formats:
        docs["report.html"] = env.get_template(f"{template_stem}.html.j2").render(**ctx)
    if "md" in cfg.formats:
        docs["report.md"] = env.get_template(f"{template_stem}.md.j2").render(**ctx)
    return docs


def _write_outputs(
    out_dir: Path,
    figures: Iterable[FigureOut],
    docs: Mapping[str, str],
    cfg: ReportConfig,
    *,
    prune: bool = True,
) -> None:
    fig_dir = out_dir / FIGURES_DIR
    written: set[str] = set()
    for fig in figures:
        if "png" in cfg.figure_formats and fig.png is not None:
            atomic_write_bytes(fig_dir / f"{fig.name}.png", fig.png)
            written.add(f"{fig.name}.png")
        if "svg" in cfg.figure_formats and fig.svg is not None:
            atomic_write_text(fig_dir / f"{fig.name}.svg", fig.svg)
            written.add(f"{fig.name}.svg")
    # the documents last: until they are replaced, the previous report stays whole
    for name in sorted(docs, key=lambda n: n.endswith(".html")):
        atomic_write_text(out_dir / name, docs[name])
    # figures of an earlier build that this one no longer references
    if prune and fig_dir.is_dir():
        for stale in sorted(fig_dir.iterdir()):
            if (
                stale.is_file()
                and stale.suffix in (".png", ".svg")
                and stale.name.startswith(_FIGURE_PREFIXES)
                and stale.name not in written
            ):
                stale.unlink()


def write_report(run_dir: Path, cfg: ReportConfig | None = None) -> Path:
    """Build the report of one run from its artifacts.

    Args:
        run_dir: The run directory (holding ``stats/comparison.json``).
        cfg: Options; defaults to :class:`ReportConfig()`.

    Returns:
        The path of ``report.html`` (written when ``html`` is among the formats).

    Raises:
        DataError: ``stats/comparison.json`` is missing or malformed.
        ConfigError: An option is invalid.
    """
    cfg = cfg or ReportConfig()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a directory; expected a run directory")
    report = _build(run_dir, cfg)
    docs = _render_documents(report, cfg, "report")
    figures = [*report.figures.values(), *report.flag_figures.values()]
    _write_outputs(run_dir, figures, docs, cfg)
    logger.info("report written to %s (%d figures)", run_dir / "report.html", len(figures))
    return run_dir / "report.html"


# --------------------------------------------------------------------------- sweeps


@dataclass
class _SubRun:
    name: str
    link: str | None
    md_link: str | None
    targets: list[str]
    n_fine: int
    n_degraded: int
    n_improved: int
    n_flags: int
    warnings: int


def write_combined_report(
    sweep_dir: Path, run_dirs: list[Path], cfg: ReportConfig | None = None
) -> Path:
    """Build each sub-run's report and a combined page linking them.

    The combined page lists every sub-run (targets, significant losses and gains
    among the attribute x context strata, Simpson flags) and one table of the
    significant spillovers: strata of non-target attributes whose corrected test
    is significant.

    Args:
        sweep_dir: Folder receiving the combined ``report.html`` / ``report.md``.
        run_dirs: The sub-run directories (each with ``stats/comparison.json``).
        cfg: Options applied to every sub-report and the combined page.

    Returns:
        The path of the combined ``report.html``.

    Raises:
        DataError: A sub-run lacks a readable comparison, or ``run_dirs`` is empty.
    """
    cfg = cfg or ReportConfig()
    sweep_dir = Path(sweep_dir)
    if not run_dirs:
        raise DataError(f"{sweep_dir}: no sub-runs given; expected run directories to combine")
    # check every sub-run first: nothing is written when one is unusable
    loaded = [(Path(d), load_comparison(Path(d) / COMPARISON_FILE)) for d in run_dirs]
    subs: list[_SubRun] = []
    spill_rows: list[dict[str, Any]] = []
    alphas = []
    warnings: list[str] = []
    for run_dir, comparison in loaded:
        write_report(run_dir, cfg)
        manifest_path = run_dir / MANIFEST_FILE
        manifest: dict[str, Any] | None = None
        if manifest_path.is_file():
            try:
                obj = json.loads(manifest_path.read_text(encoding="utf-8"))
                manifest = obj if isinstance(obj, dict) else None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                manifest = None
        alpha = _alpha(cfg, comparison)
        alphas.append(alpha)
        targets = _targets(comparison, manifest)
        name = os.path.relpath(run_dir.resolve(), sweep_dir.resolve()).replace(os.sep, "/")
        fine = [r for r in comparison.strata if _is_fine(r)]
        dirs = [_direction(r, alpha) for r in fine]
        html = f"{name}/report.html" if "html" in cfg.formats else None
        md = f"{name}/report.md" if "md" in cfg.formats else None
        n_warn = len(comparison.warnings)
        bbq = manifest.get("bbq") if manifest is not None else None
        if isinstance(bbq, Mapping) and bbq.get("verified") is False:
            warnings.append(f"{name}: BBQ data NOT verified against the pinned release.")
            n_warn += 1
        subs.append(
            _SubRun(
                name=name,
                link=html,
                md_link=md,
                targets=targets,
                n_fine=len(fine),
                n_degraded=dirs.count("degraded"),
                n_improved=dirs.count("improved"),
                n_flags=len(comparison.flags),
                warnings=n_warn,
            )
        )
        for rec in sorted(fine, key=_sort_key):
            direction = _direction(rec, alpha)
            if direction is None or rec["category"] in targets:
                continue
            spill_rows.append(
                {
                    "cells": [
                        name,
                        ", ".join(targets) or ABSENT,
                        _text(rec["category"]),
                        _text(rec["context_condition"]),
                        _cell(rec, "delta_accuracy", "pp"),
                        _ci(rec, "delta_accuracy_ci_low", "delta_accuracy_ci_high", "pp"),
                        _cell(rec, "p_adjusted", "p"),
                        direction,
                    ],
                    "cls": direction,
                }
            )
    ctx = {
        "title": cfg.title or f"Bias spillover sweep: {sweep_dir.resolve().name}",
        "subs": subs,
        "alpha": ", ".join(sorted({f"{a:g}" for a in alphas})),
        "warnings": warnings,
        "spill": {
            "header": [
                "run",
                "target",
                "category",
                "context",
                "Δ acc.",
                "95% CI",
                "p adj.",
                "change",
            ],
            "rows": spill_rows,
        },
    }
    env = _environment()
    docs: dict[str, str] = {}
    if "html" in cfg.formats:
        docs["report.html"] = env.get_template("combined.html.j2").render(**ctx)
    if "md" in cfg.formats:
        docs["report.md"] = env.get_template("combined.md.j2").render(**ctx)
    _write_outputs(sweep_dir, [], docs, cfg, prune=False)
    return sweep_dir / "report.html"


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Sub-run directories of a sweep: direct children holding ``stats/comparison.json``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / COMPARISON_FILE).is_file())


__all__ = [
    "COMPARISON_FILE",
    "LOG_HISTORY_FILE",
    "MANIFEST_FILE",
    "PREDICTION_FILES",
    "Comparison",
    "ReportConfig",
    "find_run_dirs",
    "load_comparison",
    "write_combined_report",
    "write_report",
]
