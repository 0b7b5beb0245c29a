"""Simpson's-paradox flags: aggregates whose change disagrees with the strata under them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .config import CompareConfig
from .keys import ALL, KEY_ORDER
from .metrics import RowSpec
from .records import FLAG_DEGRADATION, FLAG_MASKING, FLAG_OVER_ABSTENTION, FLAG_REVERSAL, Flag


def label_of(keys: Mapping[str, str], by: Sequence[str]) -> str:
    """A row's name in messages: ``Age / ambig``, ``all categories / ambig``, ``overall``."""
    parts = [keys[k] for k in KEY_ORDER if k in by and keys.get(k, ALL) != ALL]
    if not parts:
        return "overall"
    if "category" in by and keys.get("category", ALL) == ALL:
        parts.insert(0, "all categories")
    return " / ".join(parts)


def _stratum_info(rec: Mapping[str, Any], by: Sequence[str], metric: str) -> dict[str, Any]:
    info: dict[str, Any] = {k: rec[k] for k in ("category", "context_condition")}
    for k in by:
        info[k] = rec[k]
    info["n"] = rec["n"]
    if metric == "accuracy":
        info.update(
            weight=rec["n"],
            delta=rec["delta_accuracy"],
            b=rec["b"],
            c=rec["c"],
            acc_base=rec["acc_base"],
            acc_aligned=rec["acc_aligned"],
            p_adjusted=rec["p_adjusted"],
        )
    else:
        info.update(
            weight=rec["n_target"],
            delta=rec["delta_bias_score"],
            bias_score_base=rec["bias_score_base"],
            bias_score_aligned=rec["bias_score_aligned"],
        )
    return info


def simpson_flags(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    finest: tuple[str, ...],
    by: Sequence[str],
    cfg: CompareConfig,
) -> list[Flag]:
    """Masking and reversal flags of every aggregate row, and over-abstention flags; the
    rows' ``flags`` lists get ``masking`` / ``reversal`` / ``over_abstention`` added.

    Notes:
        A paired accuracy change is the exact weighted average of its strata's changes,
        so an accuracy aggregate can hide significant losses (masking) but never move
        against every stratum; only s_DIS, whose denominator (the non-unknown answers)
        moves between runs, can truly reverse. Hence ``masking`` is about accuracy and
        ``reversal`` about s_DIS only.
    """
    fine = [i for i, s in enumerate(specs) if s.level == finest]
    flags: list[Flag] = []
    for i, spec in enumerate(specs):
        if spec.level != finest:
            cells = set(spec.cells.tolist())
            children = [j for j in fine if set(specs[j].cells.tolist()) <= cells]
            candidates = (_masking(records, specs, i, children, by, cfg),
                          _reversal(records, specs, i, children, by))  # fmt: skip
        else:
            candidates = (None, None)
        for flag in (*candidates, _over_abstention(records, specs, i, by, cfg)):
            if flag is not None:
                flags.append(flag)
                records[i]["flags"].append(flag.kind)
    return flags


def _p(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2g}"


def _masking(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    i: int,
    children: Sequence[int],
    by: Sequence[str],
    cfg: CompareConfig,
) -> Flag | None:
    """No significant loss in the aggregate, a significant loss in a stratum under it."""
    agg = records[i]
    worse = [j for j in children if FLAG_DEGRADATION in records[j]["flags"]]
    if not worse or FLAG_DEGRADATION in agg["flags"]:
        return None
    info = tuple(_stratum_info(records[j], by, "accuracy") for j in worse)
    share = sum(records[j]["n"] for j in worse) / agg["n"]
    listed = "; ".join(
        f"{label_of(specs[j].keys, by)} (n={records[j]['n']}, b={records[j]['b']}, "
        f"c={records[j]['c']}, {100 * records[j]['delta_accuracy']:+.1f} points, "
        f"adjusted p={_p(records[j]['p_adjusted'])})"
        for j in worse
    )
    delta = 100 * agg["delta_accuracy"]
    what = "rises" if agg["significant"] and delta > 0 else "does not fall significantly"
    msg = (
        f"Accuracy of {label_of(specs[i].keys, by)} {what} ({delta:+.1f} points, n={agg['n']}, "
        f"adjusted p={_p(agg['p_adjusted'])}), but {len(worse)} stratum(s) under it fall "
        f"significantly after {cfg.correction} correction: {listed}."
    )
    if agg["heterogeneity_p"] is not None:
        msg += (
            f" Equal changes across its strata: heterogeneity Q={agg['heterogeneity_q']:.3g}, "
            f"p={agg['heterogeneity_p']:.2g}."
        )
    ci = (agg["delta_accuracy_ci_low"], agg["delta_accuracy_ci_high"])
    return Flag(
        FLAG_MASKING, "accuracy", keys_of(agg, by), agg["n"], agg["delta_accuracy"], info,
        "any", share, ci, agg["heterogeneity_p"], msg,
    )  # fmt: skip


def _reversal(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    i: int,
    children: Sequence[int],
    by: Sequence[str],
) -> Flag | None:
    """The aggregate's s_DIS change, its interval excluding 0, opposes every stratum's."""
    agg, spec = records[i], specs[i]
    delta = agg["delta_bias_score"]
    lo, hi = agg["delta_bias_score_ci_low"], agg["delta_bias_score_ci_high"]
    if spec.context != "disambig" or delta is None or delta == 0 or lo is None or hi is None:
        return None
    if not (lo > 0 or hi < 0) or agg["bias_low_support"]:
        return None
    moved = [
        j
        for j in children
        if records[j]["delta_bias_score"] is not None and records[j]["delta_bias_score"] != 0
    ]
    if len(moved) < 2 or any(
        np.sign(records[j]["delta_bias_score"]) == np.sign(delta) for j in moved
    ):
        return None
    info = tuple(_stratum_info(records[j], by, "bias_score") for j in moved)
    listed = ", ".join(
        f"{label_of(specs[j].keys, by)} {records[j]['delta_bias_score']:+.3g} "
        f"(n={records[j]['n_target']})"
        for j in moved
    )
    direction, other = ("rises", "fall") if delta > 0 else ("falls", "rise")
    msg = (
        f"The disambiguated bias score s_DIS of {label_of(spec.keys, by)} {direction} by "
        f"{delta:+.3g} (base {agg['bias_score_base']:.2f}, aligned "
        f"{agg['bias_score_aligned']:.2f}; cluster bootstrap interval [{lo:+.2f}, {hi:+.2f}]), "
        f"yet all {len(moved)} strata under it {other}: {listed}. The denominators (the "
        "non-unknown answers) moved between the runs."
    )
    return Flag(
        FLAG_REVERSAL, "bias_score", keys_of(agg, by), agg["n"], delta, info, "all", 1.0,
        (lo, hi), agg["heterogeneity_p"], msg,
    )  # fmt: skip


def _over_abstention(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    i: int,
    by: Sequence[str],
    cfg: CompareConfig,
) -> Flag | None:
    """In disambiguated contexts the answer is never "unknown": a significant rise of it
    is over-abstention, and the ambiguous-context gains it brings are not fairness."""
    rec = records[i]
    if specs[i].context != "disambig" or not rec["significant_unknown"]:
        return None
    if rec["delta_unknown_rate"] <= 0:
        return None
    msg = (
        f"In {label_of(specs[i].keys, by)} the aligned model answers 'unknown' on "
        f"{100 * rec['unknown_rate_aligned']:.0f}% of disambiguated items, up from "
        f"{100 * rec['unknown_rate_base']:.0f}% (adjusted p={_p(rec['p_adjusted_unknown'])}, "
        f"{cfg.correction}): there the correct answer is never 'unknown', so gains in "
        "ambiguous contexts may be abstention, not fairness."
    )
    ci = (rec["delta_unknown_ci_low"], rec["delta_unknown_ci_high"])
    return Flag(
        FLAG_OVER_ABSTENTION, "unknown_rate", keys_of(rec, by), rec["n"],
        rec["delta_unknown_rate"], (), "row", 1.0, ci, None, msg,
    )  # fmt: skip


def keys_of(rec: Mapping[str, Any], by: Sequence[str]) -> dict[str, str]:
    """The stratification keys of a row, as strings."""
    out = {k: str(rec[k]) for k in ("category", "context_condition")}
    for k in by:
        out[k] = str(rec[k])
    return out
