"""Simpson's-paradox flags: aggregates whose change disagrees with the strata under them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from .config import CompareConfig
from .keys import ALL, KEY_ORDER
from .metrics import RowSpec
from .records import FLAG_DEGRADATION, FLAG_MASKING, FLAG_REVERSAL, Flag


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
    """Masking and reversal flags of every aggregate row; the aggregates' ``flags`` lists
    get ``masking`` / ``reversal`` added."""
    fine = [i for i, s in enumerate(specs) if s.level == finest]
    flags: list[Flag] = []
    for i, spec in enumerate(specs):
        if spec.level == finest:
            continue
        cells = set(spec.cells.tolist())
        children = [j for j in fine if set(specs[j].cells.tolist()) <= cells]
        for make in (_masking, _reversal):
            flag = make(records, specs, i, children, by, cfg)
            if flag is not None:
                flags.append(flag)
                records[i]["flags"].append(flag.kind)
    return flags


def _masking(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    i: int,
    children: Sequence[int],
    by: Sequence[str],
    cfg: CompareConfig,
) -> Flag | None:
    """The aggregate's accuracy improves while a stratum under it degrades significantly."""
    agg = records[i]
    worse = [j for j in children if FLAG_DEGRADATION in records[j]["flags"]]
    if not (agg["delta_accuracy"] > 0 and worse):
        return None
    info = tuple(_stratum_info(records[j], by, "accuracy") for j in worse)
    share = sum(records[j]["n"] for j in worse) / agg["n"]
    listed = "; ".join(
        f"{label_of(specs[j].keys, by)} (n={records[j]['n']}, b={records[j]['b']}, "
        f"c={records[j]['c']}, {100 * records[j]['delta_accuracy']:+.1f} points, "
        f"adjusted p={records[j]['p_adjusted']:.2g})"
        for j in worse
    )
    msg = (
        f"Accuracy of {label_of(specs[i].keys, by)} rises by "
        f"{100 * agg['delta_accuracy']:+.1f} points (n={agg['n']}), but {len(worse)} "
        f"stratum(s) under it fall significantly after {cfg.correction} correction: {listed}."
    )
    ci = (agg["delta_accuracy_ci_low"], agg["delta_accuracy_ci_high"])
    return Flag(
        FLAG_MASKING, "accuracy", keys_of(agg, by), agg["n"], agg["delta_accuracy"], info,
        "any", share, ci, msg,
    )  # fmt: skip


def _reversal(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    i: int,
    children: Sequence[int],
    by: Sequence[str],
    cfg: CompareConfig,
) -> Flag | None:
    """The aggregate's bias-score change opposes all, or a weighted majority, of its strata."""
    agg, spec = records[i], specs[i]
    delta = agg["delta_bias_score"]
    if spec.context is None or delta is None or delta == 0:
        return None
    moved = [
        j
        for j in children
        if records[j]["delta_bias_score"] is not None and records[j]["delta_bias_score"] != 0
    ]
    if len(moved) < 2:
        return None
    opposite = [j for j in moved if np.sign(records[j]["delta_bias_score"]) != np.sign(delta)]
    total_w = sum(records[j]["n_target"] for j in moved)
    opp_w = sum(records[j]["n_target"] for j in opposite)
    if not opposite or total_w == 0:
        return None
    scope: Literal["all", "weighted_majority"]
    if len(opposite) == len(moved):
        scope = "all"
    elif opp_w > total_w / 2:
        scope = "weighted_majority"
    else:
        return None
    info = tuple(_stratum_info(records[j], by, "bias_score") for j in opposite)
    listed = ", ".join(
        f"{label_of(specs[j].keys, by)} {records[j]['delta_bias_score']:+.3g} "
        f"(n={records[j]['n_target']})"
        for j in opposite
    )
    direction = "rises" if delta > 0 else "falls"
    other = "fall" if delta > 0 else "rise"
    which = (
        f"all {len(moved)} strata under it {other}"
        if scope == "all"
        else f"{len(opposite)} of {len(moved)} strata under it, carrying "
        f"{100 * opp_w / total_w:.0f}% of the items with a known biased answer, {other}"
    )
    ci = None
    if agg["delta_bias_score_ci_low"] is not None:
        ci = (agg["delta_bias_score_ci_low"], agg["delta_bias_score_ci_high"])
    span = f"; its bootstrap interval is [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    msg = (
        f"The {spec.context} bias score of {label_of(spec.keys, by)} {direction} by "
        f"{delta:+.3g} (base {agg['bias_score_base']:.2f}, aligned "
        f"{agg['bias_score_aligned']:.2f}{span}), yet {which}: {listed}."
    )
    return Flag(
        FLAG_REVERSAL, "bias_score", keys_of(agg, by), agg["n"], delta, info, scope,
        opp_w / total_w, ci, msg,
    )  # fmt: skip


def keys_of(rec: Mapping[str, Any], by: Sequence[str]) -> dict[str, str]:
    """The stratification keys of a row, as strings."""
    out = {k: str(rec[k]) for k in ("category", "context_condition")}
    for k in by:
        out[k] = str(rec[k])
    return out
