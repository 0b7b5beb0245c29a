"""The spillover map beyond BBQ's format: sub-run x attribute, one panel per probe benchmark.

The sweep's rows are those of the BBQ map (:func:`.spillover_map.map_rows`: same labels,
same order); each likelihood-probe benchmark any sub-run compared (``stats/probes.json``)
is one panel, its columns the attributes it covers. A cell is the change of the
benchmark's own bias metric (CrowS-Pairs ``pct_stereotype``, StereoSet ``ss``, WinoBias
``diff``, Winogender ``gender_gap``; aligned - base, points), read from one record of the
sub-run's probe comparison:

- the attribute's own row pooled over the benchmark's natural subsets: CrowS-Pairs'
  attribute rows (its finest), StereoSet's attribute rows (both tasks pooled);
- for a benchmark whose records cover a single attribute (WinoBias and Winogender probe
  gender only), its overall row: their finer rows split gender by sentence type or pronoun
  gender, and Winogender's gap is undefined within one pronoun gender.

The colour is not the signed change but the change of the metric's distance from its
unbiased value (``delta_distance``: negative = toward it), so that blue reads "toward the
unbiased value" in every panel whatever the side the base model started on; the printed
number is the signed change. Marks: ``*`` where the benchmark's per-item outcome *is* its
bias metric's (CrowS-Pairs, StereoSet: the stereotype preferred) and the record's
corrected test is significant; ``†`` where the outcome is accuracy (WinoBias, Winogender:
their gaps are differences of accuracies, which the per-item test does not test) and the
change's cluster-bootstrap interval excludes 0 (uncorrected), as the BBQ map marks its
bias score. A sub-run without the benchmark, or a benchmark without the attribute, is
blank, never 0; an undefined value is hatched grey.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data import PROBES
from ..stats import ProbeComparison, ProbeRecord
from .config import ReportConfig
from .figures import FigureOut, _new_figure, _render
from .spillover_map import MapRow, draw_cell
from .values import AGGREGATE, UNDEFINED, category_order, number

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PROBE_MAP_NAME = "spillover_map_probes"
"""File stem of the figure inside the sweep's ``figures/`` (pruned with the BBQ map's)."""
PROBE_CMAP = "RdBu_r"
"""Diverging, colour-blind-safe: blue = toward the unbiased value, red = away from it."""
TESTED_OUTCOME = "stereotype_preferred"
"""The per-item outcome whose rate is the bias metric itself (CrowS-Pairs, StereoSet)."""
MARK_TEST = "*"
"""The record's corrected test of the outcome is significant (the metric's own test)."""
MARK_INTERVAL = "†"
"""The change's cluster-bootstrap interval excludes 0 (no test of the metric; uncorrected)."""
_FLOOR = 1.0
"""Smallest half-range of the colour scale, in points (tiny changes stay pale)."""


def probe_record(probes: ProbeComparison, benchmark: str, attribute: str) -> ProbeRecord | None:
    """The record standing for ``attribute`` on ``benchmark``: its row pooled over the
    natural subsets, else the overall row when the benchmark's records cover that attribute
    alone; None when the benchmark or the attribute is not in the comparison."""
    rows = [r for r in probes.rows if r.benchmark == benchmark]
    own = [r for r in rows if r.attribute == attribute and r.subset == AGGREGATE]
    if own:
        return own[0]
    covered = {r.attribute for r in rows if r.attribute != AGGREGATE}
    if covered == {attribute}:
        return next((r for r in rows if r.level == "overall"), None)
    return None


def probe_attributes(probes: ProbeComparison, benchmark: str) -> list[str]:
    """The attributes a comparison holds for ``benchmark``, in BBQ's order then others."""
    found = {r.attribute for r in probes.rows if r.benchmark == benchmark} - {AGGREGATE}
    return [a for a in category_order(found) if a in found]


@dataclass(frozen=True)
class ProbeMap:
    """What the map shows: the BBQ map's rows, the benchmarks and each one's cells."""

    rows: tuple[MapRow, ...]
    """The sub-runs, as the BBQ map orders and labels them."""
    benchmarks: tuple[str, ...]
    """The probe benchmarks any sub-run compared, in ``PROBES`` order (one panel each)."""
    columns: Mapping[str, tuple[str, ...]]
    """Per benchmark, the attributes any sub-run holds for it (the panel's columns)."""
    metric: Mapping[str, tuple[str, float]]
    """Per benchmark, its bias metric's name and unbiased value (from the records)."""
    cells: Mapping[str, Mapping[tuple[str, str], ProbeRecord]]
    """Per sub-run (``MapRow.name``), its records by ``(benchmark, attribute)``."""
    without: tuple[str, ...]
    """Sub-runs with no probe comparison (blank rows of the figure)."""

    @property
    def attributes(self) -> list[str]:
        """Every attribute of some panel, in BBQ's order then others (the table's lines)."""
        found = {a for cols in self.columns.values() for a in cols}
        return [a for a in category_order(found) if a in found]


def probe_map(
    rows: Sequence[MapRow], probes: Mapping[str, ProbeComparison | None]
) -> ProbeMap | None:
    """The map of ``rows`` (the BBQ map's) from each sub-run's probe comparison (by
    ``MapRow.name``); None when no sub-run has any probe record."""
    present = [p for p in probes.values() if p is not None and p.rows]
    if not present:
        return None
    benchmarks = tuple(b for b in PROBES if any(r.benchmark == b for p in present for r in p.rows))
    columns: dict[str, tuple[str, ...]] = {}
    metric: dict[str, tuple[str, float]] = {}
    for b in benchmarks:
        attrs = {a for p in present for a in probe_attributes(p, b)}
        columns[b] = tuple(a for a in category_order(attrs) if a in attrs)
        first = next(r for p in present for r in p.rows if r.benchmark == b)
        metric[b] = (first.metric, first.unbiased_value)
    cells: dict[str, dict[tuple[str, str], ProbeRecord]] = {}
    for row in rows:
        comparison = probes.get(row.name)
        found: dict[tuple[str, str], ProbeRecord] = {}
        if comparison is not None:
            for b in benchmarks:
                for a in columns[b]:
                    rec = probe_record(comparison, b, a)
                    if rec is not None:
                        found[(b, a)] = rec
        cells[row.name] = found
    without = tuple(r.name for r in rows if not cells[r.name])
    return ProbeMap(tuple(rows), benchmarks, columns, metric, cells, without)


def probe_mark(rec: ProbeRecord, alpha: float | None) -> str:
    """The cell's mark: :data:`MARK_TEST`, :data:`MARK_INTERVAL` or ``""`` (module doc)."""
    if rec.outcome == TESTED_OUTCOME:
        if alpha is None:
            return MARK_TEST if rec.significant else ""
        p = number(rec.p_adjusted)
        return MARK_TEST if p is not None and p < alpha else ""
    lo, hi = number(rec.delta_metric_ci_low), number(rec.delta_metric_ci_high)
    return MARK_INTERVAL if lo is not None and hi is not None and (lo > 0 or hi < 0) else ""


def _direction(rec: ProbeRecord) -> str:
    """``toward`` / ``away`` (from the unbiased value), empty when unchanged or undefined."""
    d = number(rec.delta_distance)
    return "" if d is None or d == 0 else "toward" if d < 0 else "away"


def probe_cell_text(rec: ProbeRecord | None, alpha: float | None) -> dict[str, Any]:
    """One table cell: the signed change (one decimal), its mark and its direction."""
    if rec is None:
        return {"text": "", "sig": False}
    value = number(rec.delta_metric)
    if value is None:
        return {"text": UNDEFINED, "sig": False}
    mark = probe_mark(rec, alpha)
    where = _direction(rec)
    return {"text": f"{value:+.1f}{mark}" + (f" ({where})" if where else ""), "sig": bool(mark)}


def probe_heading(pm: ProbeMap, benchmark: str) -> str:
    """A benchmark's column heading and panel title: its name and its metric's change."""
    return f"{PROBES[benchmark].title}: Δ {pm.metric[benchmark][0]}"


def probe_table(pm: ProbeMap) -> dict[str, Any]:
    """One line per sub-run with probe records x attribute; per benchmark, the change; and
    the data caveats of the benchmarks shown (repeated wherever their numbers appear)."""
    header = ["target", "run", "attribute", "role", *(probe_heading(pm, b) for b in pm.benchmarks)]
    lines = []
    for row in pm.rows:
        if row.name in pm.without:
            continue
        for attr in pm.attributes:
            values = [
                probe_cell_text(pm.cells[row.name].get((b, attr)), row.alpha) for b in pm.benchmarks
            ]
            role = "target" if attr in row.targets else "spillover"
            keys = ["+".join(row.targets) or "—", row.name, attr, role]
            lines.append({"keys": keys, "values": values, "cls": "own" if role == "target" else ""})
    caveats = [c for b in pm.benchmarks if (c := PROBES[b].caveat)]
    return {"header": header, "n_keys": 4, "rows": lines, "caveats": caveats}


def _grid(pm: ProbeMap, benchmark: str) -> Any:
    """A panel's colour values (``delta_distance``; NaN where blank or undefined), its
    printed changes and its undefined mask."""
    import numpy as np

    cols = pm.columns[benchmark]
    colour = np.full((len(pm.rows), len(cols)), np.nan)
    shown = np.full(colour.shape, np.nan)
    undefined = np.zeros(colour.shape, dtype=bool)
    for i, row in enumerate(pm.rows):
        for j, attr in enumerate(cols):
            rec = pm.cells[row.name].get((benchmark, attr))
            if rec is None:
                continue
            d, v = number(rec.delta_distance), number(rec.delta_metric)
            if d is None or v is None:
                undefined[i, j] = True
            else:
                colour[i, j], shown[i, j] = d, v
    return colour, shown, undefined


def _panel(ax: Axes, pm: ProbeMap, benchmark: str, norm: Any) -> None:
    """One benchmark's panel: coloured cells, signed changes, marks, target cells outlined."""
    import matplotlib
    import numpy as np

    cols = pm.columns[benchmark]
    colour, shown, undefined = _grid(pm, benchmark)
    ax.imshow(
        np.ma.masked_invalid(colour), cmap=matplotlib.colormaps[PROBE_CMAP], norm=norm,
        aspect="auto", interpolation="nearest",
    )  # fmt: skip
    for i, row in enumerate(pm.rows):
        for j, attr in enumerate(cols):
            rec = pm.cells[row.name].get((benchmark, attr))
            text = None
            if not undefined[i, j] and rec is not None and math.isfinite(shown[i, j]):
                mark = probe_mark(rec, row.alpha)
                text = (f"{shown[i, j]:+.1f}{mark}", bool(mark), float(norm(colour[i, j])))
            draw_cell(ax, i, j, bool(undefined[i, j]), text, attr in row.targets)
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(pm.rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.0)
    ax.tick_params(which="both", length=0)
    ax.set_xticks(range(len(cols)), list(cols))
    ax.tick_params(axis="x", labelrotation=50)
    for tick in ax.get_xticklabels():
        tick.set_horizontalalignment("right")
        tick.set_rotation_mode("anchor")
    name, unbiased = pm.metric[benchmark]
    ax.set_title(f"{PROBES[benchmark].title}\nΔ {name}\n(unbiased {unbiased:g})", fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)


def probe_figure(pm: ProbeMap, cfg: ReportConfig) -> FigureOut:
    """The map: one panel per benchmark side by side, one shared colour bar (points)."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import Normalize

    finite = [g[np.isfinite(g)] for b in pm.benchmarks for g in [_grid(pm, b)[0]]]
    half = max((float(np.max(np.abs(f))) for f in finite if f.size), default=0.0)
    norm = Normalize(vmin=-max(half, _FLOOR), vmax=max(half, _FLOOR))
    widths = [max(len(pm.columns[b]), 2) for b in pm.benchmarks]  # room for the title
    width = sum(0.42 * w + 0.5 for w in widths) + 3.2
    height = 0.3 * len(pm.rows) + 2.4
    fig = _new_figure(width, height)
    axes = fig.subplots(1, len(pm.benchmarks), squeeze=False, width_ratios=widths)[0]
    for k, (ax, b) in enumerate(zip(axes, pm.benchmarks, strict=True)):
        _panel(ax, pm, b, norm)
        ax.set_yticks(range(len(pm.rows)), [r.label for r in pm.rows] if k == 0 else [])
    mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap=matplotlib.colormaps[PROBE_CMAP])
    fig.colorbar(
        mappable, ax=list(axes), shrink=0.9, pad=0.01,
        label="Δ distance from unbiased (points)\nblue: toward, red: away",
    )  # fmt: skip
    out = FigureOut(PROBE_MAP_NAME, "Spillover map beyond BBQ's format", probe_caption())
    return _render(fig, out, cfg)


def probe_caption() -> str:
    """How to read the map (also the HTML figure caption)."""
    return (
        "Rows are the sweep's sub-runs, as in the BBQ map; one panel per likelihood-probe "
        "benchmark, its columns the attributes it probes. Each cell prints the change of the "
        "benchmark's own bias metric, aligned minus base, in points (CrowS-Pairs "
        "pct_stereotype and StereoSet ss, unbiased at 50; WinoBias diff = pro - anti "
        "accuracy and Winogender gender_gap = male - female accuracy, unbiased at 0). The "
        "colour is the change of the metric's distance from its unbiased value, on one "
        "diverging colour-blind-safe scale centred at 0 for every panel: blue = moved toward "
        "the unbiased value, red = away from it, whichever side the base model was on (so a "
        "negative change can be red, when it overshoots). CrowS-Pairs and StereoSet cells are "
        "the attribute's row (StereoSet: both tasks pooled); WinoBias and Winogender probe "
        "gender only, and their cell is their overall row. * and bold: the sub-run's "
        "corrected test of the per-item outcome is significant (CrowS-Pairs, StereoSet: "
        "preferring the stereotype, the metric itself; clustered by writer or target term). "
        "† and bold: WinoBias, Winogender, whose per-item test is of accuracy, not of the "
        "gap: the gap's 95% cluster-bootstrap interval excludes 0 (uncorrected). Outlined: "
        "the target's own cells. Blank: the sub-run did not compare that benchmark or "
        "attribute (not zero); hatched grey: undefined. The table below lists the same "
        "numbers."
    )
