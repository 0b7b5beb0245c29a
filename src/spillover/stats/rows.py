"""One row of a comparison: the paired table, tests, intervals, power and bias scores.

Everything a row needs comes from a :class:`Panel`: per-cell sums of the pair statistics
(items, discordant pairs, per-side counts) and per-cell x per-cluster totals of the
paired differences, so a row (a union of cells) sums cells and its clusters' totals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .bootstrap import percentile_interval
from .clustered import (
    heterogeneity_test,
    minimum_detectable_change,
    signflip_interval,
    signflip_test,
)
from .config import CompareConfig
from .keys import level_name
from .metrics import Cells, RowSpec, bias_score, bias_values, item_indicators
from .records import MIN_BIAS_SUPPORT
from .tests import (
    CI_METHOD,
    discordant_odds_ratio,
    mcnemar_test,
    paired_difference_ci,
)

SIDES = ("base", "aligned")
PAIR_STATS: tuple[str, ...] = (
    "n",
    "both",
    "b",
    "c",
    "neither",
    "n_target",
    "unk_b",
    "unk_c",
    *(
        f"{s}_{side}"
        for s in ("correct", "unknown", "correct_t", "biased", "nonunk_t")
        for side in SIDES
    ),
)
"""Per-cell sums of a comparison: pair counts (``unk_b``/``unk_c``: only the base / only the
aligned run answers "unknown"), then per-side counts."""
STAT = {name: i for i, name in enumerate(PAIR_STATS)}


def pair_stats(b: pd.DataFrame, a: pd.DataFrame) -> np.ndarray:
    """``(items, len(PAIR_STATS))`` per-item indicators of a paired comparison."""
    ib, ia = item_indicators(b), item_indicators(a)
    cb, ca = ib["correct"].astype(bool), ia["correct"].astype(bool)
    ub, ua = ib["unknown"].astype(bool), ia["unknown"].astype(bool)
    cols = {
        "n": ib["n"],
        "both": (cb & ca).astype(np.int64),
        "b": (cb & ~ca).astype(np.int64),
        "c": (~cb & ca).astype(np.int64),
        "neither": (~cb & ~ca).astype(np.int64),
        "n_target": ib["n_target"],
        "unk_b": (ub & ~ua).astype(np.int64),
        "unk_c": (~ub & ua).astype(np.int64),
    }
    for s in ("correct", "unknown", "correct_t", "biased", "nonunk_t"):
        cols[f"{s}_base"] = ib[s]
        cols[f"{s}_aligned"] = ia[s]
    return np.stack([cols[name] for name in PAIR_STATS], axis=1)


@dataclass(frozen=True)
class Panel:
    """The per-cell numbers every row of a comparison is summed from."""

    sums: np.ndarray
    """``(cells, len(PAIR_STATS))`` sums."""
    acc: np.ndarray
    """``(cells, clusters)`` totals of ``correct_aligned - correct_base``."""
    unk: np.ndarray
    """``(cells, clusters)`` totals of ``unknown_aligned - unknown_base``."""
    cnt: np.ndarray
    """``(cells, clusters)`` item counts."""
    unit: str | None
    """What the clusters are (``scenario``, ``template``), or None: each item alone."""
    boot: np.ndarray | None
    """``(B, cells, len(PAIR_STATS))`` bootstrap replicates of ``sums``, or None."""

    @classmethod
    def build(
        cls,
        stats: np.ndarray,
        cells: Cells,
        cluster: np.ndarray,
        unit: str | None,
        boot: np.ndarray | None,
    ) -> Panel:
        """From per-item statistics, their cells and their cluster index (0..G-1)."""
        n_cells, n_clusters = cells.count, int(cluster.max()) + 1 if cluster.size else 0
        flat = cells.item_cell * n_clusters + cluster

        def grid(values: np.ndarray) -> np.ndarray:
            out = np.bincount(flat, weights=values, minlength=n_cells * n_clusters)
            return out.reshape(n_cells, n_clusters)

        acc = stats[:, STAT["c"]] - stats[:, STAT["b"]]
        unk = stats[:, STAT["unk_c"]] - stats[:, STAT["unk_b"]]
        sums = np.stack([cells.sums(stats[:, j]) for j in range(stats.shape[1])], axis=1)
        return cls(sums, grid(acc), grid(unk), grid(np.ones(len(cluster))), unit, boot)


def paired_change(
    d: np.ndarray,
    n: np.ndarray,
    pairs: tuple[int, int, int, int],
    cfg: CompareConfig,
    unit: str | None,
) -> tuple[float | None, float, float, str, str | None]:
    """``(clustered p, ci low, ci high, ci method, note)`` of one paired change of a
    proportion, from its per-cluster totals ``d`` and counts ``n``.

    ``pairs`` is ``(both, aligned only, base only, neither)``: the item-level 2x2 table, in
    the order of :func:`paired_difference_ci` (the change is aligned minus base). ``unit``
    names the clusters (``scenario``, ``template``, ``writer``, ...; None: there are none);
    the interval is clustered unless ``cfg.clustered`` is false (Newcombe's then).
    """
    test = signflip_test(d, unit=unit) if unit is not None else None
    item = paired_difference_ci(*pairs, confidence=cfg.confidence)
    if not cfg.clustered:
        return (test.pvalue if test else None), item[0], item[1], CI_METHOD, None
    assert test is not None and unit is not None
    ci = signflip_interval(d, n, confidence=cfg.confidence, item_interval=item, unit=unit)
    notes = [x for x in (test.note, ci.note) if x and x != "no discordant pairs"]
    return test.pvalue, ci.low, ci.high, ci.method, "; ".join(notes) or None


def _tests(
    t: dict[str, int], d: np.ndarray, n: np.ndarray, cfg: CompareConfig, unit: str | None
) -> tuple[dict[str, Any], list[str]]:
    """The accuracy and unknown-rate tests and intervals of a row, and their notes."""
    item = mcnemar_test(t["b"], t["c"], "midp")
    p_cl, lo, hi, method, cl_note = paired_change(
        d[0], n, (t["both"], t["c"], t["b"], t["neither"]), cfg, unit
    )
    if cfg.resolved_test == "signflip":
        assert p_cl is not None
        test, statistic, p_value = "signflip", float(t["c"] - t["b"]), p_cl
    else:
        chosen = mcnemar_test(t["b"], t["c"], cfg.resolved_test)
        test, statistic, p_value = chosen.method, chosen.statistic, chosen.pvalue
    nlo, nhi = paired_difference_ci(
        t["both"], t["c"], t["b"], t["neither"], confidence=cfg.confidence
    )
    # the unknown-rate change: the same paired structure, another outcome
    both_u = t["unknown_base"] - t["unk_b"]
    pairs_u = (both_u, t["unk_c"], t["unk_b"], t["n"] - both_u - t["unk_b"] - t["unk_c"])
    p_unk_cl, ulo, uhi, _, _ = paired_change(d[1], n, pairs_u, cfg, unit)
    p_unk = (
        p_unk_cl
        if cfg.clustered and p_unk_cl is not None
        else mcnemar_test(
            t["unk_b"], t["unk_c"], cfg.resolved_test if not cfg.clustered else "midp"
        ).pvalue
    )
    out = {
        "delta_accuracy_ci_low": lo,
        "delta_accuracy_ci_high": hi,
        "ci_method": method,
        "delta_accuracy_newcombe_low": nlo,
        "delta_accuracy_newcombe_high": nhi,
        "test": test,
        "statistic": statistic,
        "p_value": p_value,
        "p_value_item": item.pvalue,
        "p_value_clustered": p_cl,
        "cluster_unit": unit or "item",
        "n_clusters": int(n.size),
        "n_informative_clusters": int(np.count_nonzero(d[0])),
        "delta_unknown_ci_low": ulo,
        "delta_unknown_ci_high": uhi,
        "p_value_unknown": float(p_unk),
    }
    return out, [x for x in (item.note, cl_note) if x]


def row_record(
    spec: RowSpec, panel: Panel, cfg: CompareConfig, by: Sequence[str], fine: bool
) -> dict[str, Any]:
    """Every field of a :class:`~spillover.stats.StratumRecord` but the corrected ones."""
    tot = panel.sums[spec.cells].sum(axis=0)
    t = {name: int(tot[i]) for name, i in STAT.items()}
    n = t["n"]
    keep = panel.cnt[spec.cells].sum(axis=0) > 0
    d = np.stack([panel.acc[spec.cells].sum(axis=0)[keep], panel.unk[spec.cells].sum(axis=0)[keep]])
    rec = spec.record_keys(by)
    rec.setdefault("question_polarity", None)
    rec.setdefault("label_type", None)
    tests, notes = _tests(t, d, panel.cnt[spec.cells].sum(axis=0)[keep], cfg, panel.unit)
    orr = discordant_odds_ratio(t["b"], t["c"], confidence=cfg.confidence)
    if orr.note and t["b"] + t["c"]:
        notes.append(orr.note)
    rec.update(
        n=n,
        n_both_correct=t["both"],
        b=t["b"],
        c=t["c"],
        n_both_wrong=t["neither"],
        acc_base=t["correct_base"] / n,
        acc_aligned=t["correct_aligned"] / n,
        delta_accuracy=(t["correct_aligned"] - t["correct_base"]) / n,
        **tests,
        p_adjusted=None,
        correction=cfg.correction,
        family=level_name(spec.level),
        family_size=None,
        significant=None,
        p_adjusted_item=None,
        significant_item=None,
        p_adjusted_clustered=None,
        significant_clustered=None,
        mdc_accuracy=None,
        odds_ratio=orr.estimate,
        odds_ratio_ci_low=orr.low,
        odds_ratio_ci_high=orr.high,
        unknown_rate_base=t["unknown_base"] / n,
        unknown_rate_aligned=t["unknown_aligned"] / n,
        delta_unknown_rate=(t["unknown_aligned"] - t["unknown_base"]) / n,
        p_adjusted_unknown=None,
        significant_unknown=None,
        n_target=t["n_target"],
        n_non_unknown_base=t["nonunk_t_base"],
        n_non_unknown_aligned=t["nonunk_t_aligned"],
        bias_low_support=False,
        heterogeneity_q=None,
        heterogeneity_df=None,
        heterogeneity_p=None,
    )
    _bias_fields(rec, t, spec, panel, cfg, notes)
    rec["flags"] = []
    rec["note"] = "; ".join(notes) if notes else None
    return rec


def _bias_fields(
    rec: dict[str, Any],
    t: dict[str, int],
    spec: RowSpec,
    panel: Panel,
    cfg: CompareConfig,
    notes: list[str],
) -> None:
    """Bias scores per side, their change, its bootstrap interval and its support."""
    ctx = spec.context
    rec.update(
        bias_score_base=None,
        bias_score_aligned=None,
        delta_bias_score=None,
        delta_bias_score_ci_low=None,
        delta_bias_score_ci_high=None,
        delta_accuracy_boot_ci_low=None,
        delta_accuracy_boot_ci_high=None,
    )
    if ctx is not None:
        for side in SIDES:
            score = bias_score(
                ctx,
                t["n_target"],
                t[f"correct_t_{side}"],
                t[f"biased_{side}"],
                t[f"nonunk_t_{side}"],
            )
            rec[f"bias_score_{side}"] = score.value
            if score.note:
                notes.append(f"{side}: {score.note}")
        if rec["bias_score_base"] is not None and rec["bias_score_aligned"] is not None:
            rec["delta_bias_score"] = rec["bias_score_aligned"] - rec["bias_score_base"]
        support = min(t["nonunk_t_base"], t["nonunk_t_aligned"])
        if rec["delta_bias_score"] is not None and support < MIN_BIAS_SUPPORT:
            rec["bias_low_support"] = True
            notes.append(
                f"low support: a bias score rests on {support} non-unknown answer(s) "
                f"(< {MIN_BIAS_SUPPORT}); its change is not marked significant"
            )
    else:
        notes.append("bias scores are per context: see this stratum's rows per context")
    if panel.boot is None:
        return
    boot = panel.boot[:, spec.cells, :].sum(axis=1)
    col = {name: boot[:, i] for name, i in STAT.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        dacc = (col["correct_aligned"] - col["correct_base"]) / col["n"]
    lo, hi, _ = percentile_interval(dacc, cfg.confidence)
    rec["delta_accuracy_boot_ci_low"], rec["delta_accuracy_boot_ci_high"] = lo, hi
    if ctx is None or rec["delta_bias_score"] is None:
        return
    vals = {
        side: bias_values(
            ctx,
            col["n_target"],
            col[f"correct_t_{side}"],
            col[f"biased_{side}"],
            col[f"nonunk_t_{side}"],
        )
        for side in SIDES
    }
    lo, hi, undefined = percentile_interval(vals["aligned"] - vals["base"], cfg.confidence)
    rec["delta_bias_score_ci_low"], rec["delta_bias_score_ci_high"] = lo, hi
    if undefined:
        notes.append(
            f"{undefined} of {cfg.bootstrap} bootstrap resamples had an undefined bias score "
            "and were left out of its interval"
        )


def fine_row_power(rec: dict[str, Any], spec: RowSpec, panel: Panel, alpha: float) -> None:
    """The row's minimum detectable loss of accuracy at ``alpha`` (80 % power), with the
    clustered test (the scenarios, or each item when there are none)."""
    keep = panel.cnt[spec.cells].sum(axis=0) > 0
    d = panel.acc[spec.cells].sum(axis=0)[keep]
    n = panel.cnt[spec.cells].sum(axis=0)[keep]
    # a loss of accuracy can only flip correct answers: the aligned accuracy bounds it
    mdc = minimum_detectable_change(d, n, alpha=alpha, flippable=rec["acc_aligned"] or None)
    rec["mdc_accuracy"] = mdc if math.isfinite(mdc) else None
    if not math.isfinite(mdc):
        msg = (
            "no loss of accuracy is detectable with 80 % power here, not even of every "
            "correct answer (too few items or scenarios)"
        )
        rec["note"] = f"{rec['note']}; {msg}" if rec["note"] else msg


def heterogeneity_fields(
    rec: dict[str, Any], children: Sequence[RowSpec], panel: Panel, seed: int
) -> None:
    """Equal accuracy changes across ``children``? (aggregate rows, clustered only)."""
    if len(children) < 2:
        return
    d = np.stack([panel.acc[c.cells].sum(axis=0) for c in children], axis=1)
    n = np.stack([panel.cnt[c.cells].sum(axis=0) for c in children], axis=1)
    used = n.sum(axis=1) > 0
    result = heterogeneity_test(d[used], n[used], seed=seed)
    if result is not None:
        rec.update(
            heterogeneity_q=result.statistic,
            heterogeneity_df=result.df,
            heterogeneity_p=result.pvalue,
        )
