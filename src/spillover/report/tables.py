"""The report's tables and summary sentences, built from the typed comparison records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..stats import Comparison, StratumRecord
from .values import (
    ABSENT,
    AGGREGATE,
    UNDEFINED,
    cell,
    correction_name,
    direction,
    grid,
    interval,
    is_fine,
    polarity,
    text,
)

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
    ("p_adjusted_item", "p adj. (item-level)", "p"),
    ("p_adjusted_clustered", "p adj. (clustered)", "p"),
    ("n_clusters", "clusters", "int"),
    ("mdc_accuracy", "detectable Δ (80% power)", "pts"),
    ("correction", "correction", "str"),
    ("family_size", "family", "int"),
)
_UNKNOWN_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("unknown_rate_base", "unknown base", "pct"),
    ("unknown_rate_aligned", "unknown aligned", "pct"),
    ("delta_unknown_rate", "Δ unknown", "pp"),
    ("p_adjusted_unknown", "Δ unknown p adj.", "p"),
)


def _keys(rec: StratumRecord) -> list[str]:
    return [rec.category, rec.context_condition, polarity(rec) or AGGREGATE]


def table_main(strata: Sequence[StratumRecord], alpha: float) -> dict[str, Any]:
    """Every stratum's 2x2 table, accuracies, interval and test."""
    header = ["category", "context", "polarity"]
    header += [h for _, h, _ in _MAIN_COLUMNS] + ["Δ acc. 95% CI"]
    header += [h for _, h, _ in _TEST_COLUMNS] + [h for _, h, _ in _UNKNOWN_COLUMNS] + ["flags"]
    rows = []
    for rec in strata:
        cells = _keys(rec)
        cells += [cell(rec, k, f) for k, _, f in _MAIN_COLUMNS]
        cells.append(interval(rec, "delta_accuracy_ci_low", "delta_accuracy_ci_high", "pp"))
        cells += [
            ABSENT if k == "mdc_accuracy" and getattr(rec, k) is None and not is_fine(rec)
            else cell(rec, k, f)
            for k, _, f in _TEST_COLUMNS
        ]  # fmt: skip
        cells += [cell(rec, k, f) for k, _, f in _UNKNOWN_COLUMNS]
        cells.append(", ".join(rec.flags))
        rows.append({"cells": cells, "cls": direction(rec, alpha) or ""})
    return {"header": header, "rows": rows}


def table_effects(strata: Sequence[StratumRecord], alpha: float) -> dict[str, Any]:
    """Every stratum's odds ratio and bias scores with intervals."""
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
            *_keys(rec),
            cell(rec, "ci_method", "str"),
            cell(rec, "odds_ratio", "num"),
            interval(rec, "odds_ratio_ci_low", "odds_ratio_ci_high", "num"),
            cell(rec, "bias_score_base", "signed"),
            cell(rec, "bias_score_aligned", "signed"),
            cell(rec, "delta_bias_score", "signed"),
            interval(rec, "delta_bias_score_ci_low", "delta_bias_score_ci_high", "signed"),
            text(rec.note),
        ]
        rows.append({"cells": cells, "cls": direction(rec, alpha) or ""})
    return {"header": header, "rows": rows}


def table_significant(
    strata: Sequence[StratumRecord], targets: Sequence[str], alpha: float
) -> dict[str, Any]:
    """The strata whose corrected test is significant, with their role (target or spillover)."""
    header = ["category", "context", "polarity", "role", "Δ acc.", "95% CI", "p adj.", "change"]
    rows = []
    for rec in strata:
        moved = direction(rec, alpha)
        if moved is None:
            continue
        cat = rec.category
        role = "aggregate" if cat == AGGREGATE else "target" if cat in targets else "spillover"
        rows.append(
            {
                "cells": [
                    *_keys(rec)[:3],
                    role,
                    cell(rec, "delta_accuracy", "pp"),
                    interval(rec, "delta_accuracy_ci_low", "delta_accuracy_ci_high", "pp"),
                    cell(rec, "p_adjusted", "p"),
                    moved,
                ],
                "cls": moved,
            }
        )
    return {"header": header, "rows": rows}


def summary_lines(
    comparison: Comparison, targets: Sequence[str], alpha: float
) -> list[dict[str, str]]:
    """Plain-language bullet points: ``{"text": ..., "cls": "bad"|"good"|""}``."""
    fine = [r for r in comparison.rows if is_fine(r)]
    out: list[dict[str, str]] = _abstention_lines(comparison)
    if targets:
        out.append({"text": f"Alignment target: {', '.join(targets)}.", "cls": ""})
    else:
        out.append({"text": "Alignment target: not recorded in the artifacts.", "cls": ""})
    if not fine:
        out.append(
            {"text": "The comparison holds no attribute × context strata to summarise.", "cls": ""}
        )
    else:
        out += _strata_lines(fine, targets, alpha, correction_name(comparison))
    out += _robustness_lines(fine, comparison)
    overall = grid(comparison).get((AGGREGATE, AGGREGATE))
    if overall is not None:
        d = cell(overall, "delta_accuracy", "pp")
        p = cell(overall, "p_adjusted", "p")
        out.append(
            {
                "text": f"Over all attributes and contexts, accuracy changed by {d} "
                f"(p adj. {p}): read it together with the strata above, not instead of them.",
                "cls": "",
            }
        )
    simpson = [f for f in comparison.flags if f.kind in ("masking", "reversal")]
    if simpson:
        kinds = sorted({f.kind for f in simpson})
        out.append(
            {
                "text": f"{len(simpson)} Simpson's-paradox flag(s) ({', '.join(kinds)}): "
                "an aggregate hides or reverses what its strata show. See “Flags”.",
                "cls": "bad",
            }
        )
    else:
        out.append({"text": "No Simpson's-paradox flag (masking or reversal).", "cls": ""})
    abstaining = [f for f in comparison.flags if f.kind == "over_abstention"]
    if abstaining:
        out.append(
            {
                "text": f"{len(abstaining)} stratum(s) of disambiguated items with significantly "
                "more 'unknown' answers (over_abstention). See “Flags”.",
                "cls": "bad",
            }
        )
    return out


def _abstention_lines(comparison: Comparison) -> list[dict[str, str]]:
    """First, when it fires: over-abstention over all disambiguated items."""
    pooled = grid(comparison).get((AGGREGATE, "disambig"))
    if pooled is None or "over_abstention" not in pooled.flags:
        return []
    return [
        {
            "text": (
                f"Over-abstention: the aligned model answers 'unknown' on "
                f"{100 * pooled.unknown_rate_aligned:.0f}% of disambiguated items, up from "
                f"{100 * pooled.unknown_rate_base:.0f}% (adjusted p "
                f"{cell(pooled, 'p_adjusted_unknown', 'p')}). In disambiguated contexts the "
                "answer is never 'unknown': gains in ambiguous contexts are abstention, not "
                "fairness, until shown otherwise."
            ),
            "cls": "bad",
        }
    ]


def _robustness_lines(
    fine: Sequence[StratumRecord], comparison: Comparison
) -> list[dict[str, str]]:
    """What the tests can and cannot show: item-level-only findings, and power."""
    out: list[dict[str, str]] = []
    cfg = comparison.config
    only = [r for r in fine if "item_level_only" in r.flags]
    if only:
        names = ", ".join(f"{r.category} · {r.context_condition}" for r in only)
        out.append(
            {
                "text": f"Significant at the item level only, not with the "
                f"{cfg.cluster if cfg.clustered else 'scenario'}-clustered test: not robust "
                f"to the clustering of BBQ's items: {names}.",
                "cls": "",
            }
        )
    mdcs = sorted(r.mdc_accuracy for r in fine if r.mdc_accuracy is not None)
    if mdcs:
        mid = mdcs[len(mdcs) // 2]
        out.append(
            {
                "text": (
                    f"Power: with these items, a stratum's loss of accuracy is detected with 80% "
                    f"power only from about {100 * mid:.0f} points (median over strata; "
                    f"{100 * mdcs[0]:.0f} to {100 * mdcs[-1]:.0f}). No significant change in a "
                    "stratum does not mean no change: see 'detectable Δ' in the tables."
                ),
                "cls": "",
            }
        )
    elif fine:
        out.append(
            {"text": "Power: too few scenarios for any stratum to detect a change.", "cls": "bad"}
        )
    return out


def _strata_lines(
    fine: Sequence[StratumRecord], targets: Sequence[str], alpha: float, correction: str
) -> list[dict[str, str]]:
    """Counts of significant changes, then the spillover losses and gains."""
    counts: dict[str, dict[str, int]] = {
        "degraded": {"ambig": 0, "disambig": 0},
        "improved": {"ambig": 0, "disambig": 0},
    }
    for rec in fine:
        d = direction(rec, alpha)
        if d is not None:
            counts[d][rec.context_condition] += 1
    n_deg = sum(counts["degraded"].values())
    n_imp = sum(counts["improved"].values())
    out = [
        {
            "text": (
                f"After {correction} correction (α = {alpha:g}), {n_deg} of {len(fine)} "
                f"attribute × context strata lost accuracy significantly (ambiguous: "
                f"{counts['degraded']['ambig']}, disambiguated: {counts['degraded']['disambig']}) "
                f"and {n_imp} gained (ambiguous: {counts['improved']['ambig']}, disambiguated: "
                f"{counts['improved']['disambig']})."
            ),
            "cls": "bad" if n_deg else "",
        }
    ]
    if not targets:
        return out
    spill = [r for r in fine if r.category not in targets]
    bad = [r for r in spill if direction(r, alpha) == "degraded"]
    good = [r for r in spill if direction(r, alpha) == "improved"]
    if bad:
        worst = ", ".join(
            f"{r.category} · {r.context_condition} ({cell(r, 'delta_accuracy', 'pp')}, "
            f"p adj. {cell(r, 'p_adjusted', 'p')})"
            for r in sorted(bad, key=lambda r: r.delta_accuracy)
        )
        out.append({"text": f"Spillover losses on non-target attributes: {worst}.", "cls": "bad"})
    else:
        out.append(
            {
                "text": "No non-target attribute × context stratum lost accuracy significantly.",
                "cls": "",
            }
        )
    if good:
        names = ", ".join(f"{r.category} · {r.context_condition}" for r in good)
        out.append({"text": f"Spillover gains on non-target attributes: {names}.", "cls": "good"})
    return out


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, Mapping):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and all(not isinstance(v, Mapping | list) for v in value):
        return [(prefix, ", ".join(text(v) for v in value))]
    if isinstance(value, list):
        out = []
        for i, v in enumerate(value):
            out += _flatten(v, f"{prefix}[{i}]")
        return out
    if value is None:
        return [(prefix, UNDEFINED)]
    return [(prefix, text(value))]


def provenance_rows(manifest: Mapping[str, Any] | None, comparison: Comparison) -> list[list[str]]:
    """Key/value rows: versions, models, BBQ, seeds, config, libraries, environment (CPU,
    accelerator), timings, stats config."""
    rows: list[list[str]] = []
    if manifest is not None:
        for key in ("spillover_version", "git_revision"):
            if key in manifest:
                rows.append([key, text(manifest[key]) or UNDEFINED])
        for i, m in enumerate(manifest.get("models") or []):
            if isinstance(m, Mapping):
                role = text(m.get("role")) or f"model {i}"
                rest = ", ".join(f"{k}={text(v)}" for k, v in m.items() if k != "role")
                rows.append([f"models.{role}", rest])
        for key in ("bbq", "seeds", "config", "libraries", "environment", "timings"):
            if key in manifest:
                value = manifest[key]
                if key == "timings" and isinstance(value, Mapping):
                    value = {
                        k: (f"{v:.1f} s" if isinstance(v, int | float) else v)
                        for k, v in value.items()
                    }
                rows += [list(kv) for kv in _flatten(value, key)]
    rows += [list(kv) for kv in _flatten(comparison.config.to_dict(), "stats.config")]
    return rows
