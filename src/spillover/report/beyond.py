"""The report section "Beyond BBQ's format": per attribute, BBQ's change beside each
likelihood-probe benchmark's, and what that pattern says.

The reading rule (``docs/report.md``): a change on BBQ only points to *format* (the model
learned how to answer BBQ-style questions); a change on BBQ and on another format points
to *content* (less, or more, stereotyping of the group); a change on another format only is
said as such; no change anywhere is "none detected", with the smallest change each
benchmark could have detected, so that it is never read as "no change".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..data import PROBES
from ..stats import Comparison, ProbeComparison, ProbeRecord, StratumRecord
from .values import CONTEXT_LABELS, fmt_number, fmt_p, is_fine

READING_RULE = (
    "How to read this: a change on BBQ only suggests the alignment taught BBQ's format (how "
    "to answer its questions); a change on BBQ and on another format suggests content (how "
    "the model treats the group); a change on another format only is reported as such; no "
    "significant change anywhere is 'none detected', which is not 'no change' (each cell's "
    "smallest detectable change is given). Significance is after correction: BBQ's cells "
    "within BBQ's family, the probes' within one family over every probe benchmark."
)

_METRIC_LABEL = {
    "pct_stereotype": "Δ pct_stereotype",
    "ss": "Δ SS",
    "diff": "Δ pro−anti accuracy",
    "gender_gap": "Δ male−female accuracy",
}


def _num(x: Any, fmt: str = "+.1f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "undefined"
    return fmt_number(float(x), fmt)


def _bbq_cells(comparison: Comparison, attribute: str, alpha: float) -> tuple[list[str], bool]:
    """BBQ's change per context for one attribute, and whether any is significant."""
    cells, moved = [], False
    for ctx in ("ambig", "disambig"):
        rec = next(
            (
                r
                for r in comparison.rows
                if is_fine(r) and r.category == attribute and r.context_condition == ctx
            ),
            None,
        )
        if rec is None:
            cells.append("—")
            continue
        sig = rec.p_adjusted is not None and rec.p_adjusted < alpha
        moved = moved or sig
        cells.append(_bbq_text(rec, sig))
    return cells, moved


def _bbq_text(rec: StratumRecord, sig: bool) -> str:
    lo, hi = rec.delta_accuracy_ci_low, rec.delta_accuracy_ci_high
    ci = "" if lo is None or hi is None else f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    p = "" if rec.p_adjusted is None else f", p adj {fmt_p(rec.p_adjusted)}"
    return f"{100 * rec.delta_accuracy:+.1f} pp{ci}{p}{' *' if sig else ''}"


def _probe_rows(probes: ProbeComparison, benchmark: str, attribute: str) -> list[ProbeRecord]:
    """The fine rows standing for one attribute on one benchmark (WinoBias and Winogender
    probe gender only: their fine rows are its subsets)."""
    rows = [r for r in probes.rows if r.benchmark == benchmark and r.family == "fine"]
    own = [r for r in rows if r.attribute == attribute]
    return own


def _probe_text(rows: Sequence[ProbeRecord], alpha: float) -> tuple[str, bool]:
    if not rows:
        return "—", False
    parts, moved = [], False
    for r in rows:
        sig = r.p_adjusted is not None and r.p_adjusted < alpha
        moved = moved or sig
        ci = (
            ""
            if r.delta_metric_ci_low is None or r.delta_metric_ci_high is None
            else f" [{_num(r.delta_metric_ci_low)}, {_num(r.delta_metric_ci_high)}]"
        )
        p = "" if r.p_adjusted is None else f", p adj {fmt_p(r.p_adjusted)}"
        where = "" if r.subset in ("all", "") else f"{r.subset}: "
        mdc = "" if r.mdc_outcome is None else f", detectable {100 * r.mdc_outcome:.0f} pp"
        parts.append(f"{where}{_num(r.delta_metric)}{ci}{p}{mdc}{' *' if sig else ''}")
    return "; ".join(parts), moved


def _reading(bbq: bool, other: bool) -> str:
    if bbq and other:
        return "content: changed on BBQ and on another format"
    if bbq:
        return "format: changed on BBQ only"
    if other:
        return "changed on another format only"
    return "none detected"


def beyond_section(
    probes: ProbeComparison | None, comparison: Comparison, alpha: float
) -> dict[str, Any] | None:
    """The section's table (one row per attribute a probe benchmark covers), the reading
    rule and the data caveats; None without probe results."""
    if probes is None or not probes.rows:
        return None
    benchmarks = [b for b in PROBES if any(r.benchmark == b for r in probes.rows)]
    attributes: list[str] = []
    for r in probes.rows:
        if r.family == "fine" and r.attribute not in attributes:
            attributes.append(r.attribute)
    metric = {b: next(r.metric for r in probes.rows if r.benchmark == b) for b in benchmarks}
    header = [
        "attribute",
        f"BBQ {CONTEXT_LABELS['ambig']}: Δ accuracy",
        f"BBQ {CONTEXT_LABELS['disambig']}: Δ accuracy",
        *(f"{PROBES[b].title}: {_METRIC_LABEL.get(metric[b], metric[b])}" for b in benchmarks),
        "reading",
    ]
    rows = []
    for attribute in attributes:
        bbq_cells, bbq_moved = _bbq_cells(comparison, attribute, alpha)
        cells, other = [], False
        for b in benchmarks:
            text, moved = _probe_text(_probe_rows(probes, b, attribute), alpha)
            cells.append(text)
            other = other or moved
        target = attribute in (comparison.config.targets or ())
        name = f"{attribute} (target)" if target else attribute
        rows.append(
            {
                "cells": [name, *bbq_cells, *cells, _reading(bbq_moved, other)],
                "cls": "target" if target else "",
            }
        )
    caveats = [PROBES[b].caveat for b in benchmarks if PROBES[b].caveat]
    directions = [f"{PROBES[b].title}: {PROBES[b].unbiased}" for b in benchmarks]
    return {
        "table": {"header": header, "rows": rows},
        "rule": READING_RULE,
        "caveats": caveats,
        "directions": directions,
        "n_items": dict(_n_items(probes.summary)),
    }


def _n_items(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    n = summary.get("n_items")
    return n if isinstance(n, Mapping) else {}
