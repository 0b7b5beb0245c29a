"""Paired comparison of two runs: tests, intervals, corrections, Simpson flags, CLI.

Small tests build BBQ-like frames (or a tiny BBQ folder) in memory; tests marked
``fulldata`` read BBQ from ``$SPILLOVER_BBQ_DIR`` and skip without it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest, norm
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

import spillover
from cli_runner import invoke
from spillover.data import CATEGORIES, BBQData
from spillover.errors import ConfigError, DataError
from spillover.predictions.bbq import join_with_bbq
from spillover.stats import CompareConfig, Comparison, compare_runs
from spillover.stats.bootstrap import bootstrap_cell_sums
from spillover.stats.tests import (
    adjust_pvalues,
    discordant_odds_ratio,
    mcnemar_midp,
    mcnemar_test,
    paired_difference_ci,
    resolve_test,
)

REFERENCE = Path(__file__).parent / "reference"


# --------------------------------------------------------------------------- builders


def bbq_like_items(per_cell: int = 200, templates: int = 10, seed: int = 0) -> pd.DataFrame:
    """All 11 categories x 2 contexts, ``per_cell`` items each, with BBQ's structure.

    The unknown option is the label in ambiguous contexts; disambiguated labels are a
    non-unknown option; the target (biased answer) is a non-unknown option.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for cat in CATEGORIES:
        eid = 0
        for ctx in ("ambig", "disambig"):
            for k in range(per_cell):
                unk = int(rng.integers(0, 3))
                others = [i for i in range(3) if i != unk]
                target = int(rng.choice(others))
                label = unk if ctx == "ambig" else int(rng.choice(others))
                rows.append(
                    {
                        "category": cat,
                        "example_id": eid,
                        "question_index": k % templates,
                        "scenario": k % templates,
                        "context_condition": ctx,
                        "question_polarity": "neg" if k % 2 else "nonneg",
                        "label_type": "label",
                        "label": label,
                        "target_loc": target,
                        "unknown_loc": unk,
                        "subcategory": None,
                    }
                )
                eid += 1
    df = pd.DataFrame(rows)
    df["target_loc"] = df["target_loc"].astype("Int64")
    return df


def base_predictions(items: pd.DataFrame, accuracy: float = 0.6) -> np.ndarray:
    """Deterministic: the first ``accuracy`` share of each cell right, the rest wrong.

    Wrong answers pick the biased answer when that is wrong, else the unknown option.
    """
    label = items["label"].to_numpy()
    target = items["target_loc"].to_numpy(dtype=int)
    unk = items["unknown_loc"].to_numpy()
    rank = items.groupby(["category", "context_condition"]).cumcount().to_numpy()
    size = items.groupby(["category", "context_condition"])["example_id"].transform("size")
    right = rank < accuracy * size.to_numpy()
    wrong = np.where(target != label, target, unk)
    return np.where(right, label, wrong)


def improve(items: pd.DataFrame, pred: np.ndarray, share: float = 0.5) -> np.ndarray:
    """Fix ``share`` of the biased wrong answers in every cell (accuracy up, bias down)."""
    label = items["label"].to_numpy()
    target = items["target_loc"].to_numpy(dtype=int)
    fixable = (pred != label) & (pred == target)
    rank = (
        pd.Series(fixable.astype(int))
        .groupby([items["category"], items["context_condition"]])
        .cumsum()
        .to_numpy()
    )
    total = (
        pd.Series(fixable.astype(int))
        .groupby([items["category"], items["context_condition"]])
        .transform("sum")
        .to_numpy()
    )
    chosen = fixable & (rank <= share * total)
    out = pred.copy()
    out[chosen] = label[chosen]
    return out


def degrade(items: pd.DataFrame, pred: np.ndarray, category: str, context: str, share: float):
    """Turn ``share`` of the correct answers of one cell into the biased answer."""
    label = items["label"].to_numpy()
    target = items["target_loc"].to_numpy(dtype=int)
    cell = ((items["category"] == category) & (items["context_condition"] == context)).to_numpy()
    idx = np.flatnonzero(cell & (pred == label) & (target != label))
    out = pred.copy()
    out[idx[: int(share * len(idx))]] = target[idx[: int(share * len(idx))]]
    return out


def planted_pair(items: pd.DataFrame, *, mask: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    base = base_predictions(items)
    aligned = improve(items, base)
    if mask:
        aligned = degrade(items, aligned, "Physical_appearance", "ambig", 0.5)
    return items.assign(pred_index=base), items.assign(pred_index=aligned)


def row(result: Comparison, **keys: str) -> pd.Series:
    df = result.strata
    sel = np.ones(len(df), dtype=bool)
    want = {"category": "all", "context_condition": "all", **keys}
    for k, v in want.items():
        sel &= (df[k] == v).to_numpy()
    assert sel.sum() == 1, want
    return df[sel].iloc[0]


@pytest.fixture(scope="module")
def items() -> pd.DataFrame:
    return bbq_like_items()


@pytest.fixture(scope="module")
def bbq_full(full_bbq: BBQData) -> BBQData:
    return full_bbq


# --------------------------------------------------------------------------- McNemar family


def test_pvalues_equal_statsmodels_on_random_tables():
    rng = np.random.default_rng(20240601)
    small = rng.integers(0, 40, size=(1500, 2))
    large = rng.integers(0, 3000, size=(300, 2))
    tables = [(int(b), int(c)) for b, c in np.vstack([small, large]) if b + c > 0]
    assert len(tables) >= 1000
    n_cc = 0
    for b, c in tables:
        t = [[7, b], [c, 11]]
        ref_exact = mcnemar(t, exact=True).pvalue
        ref_chi2 = mcnemar(t, exact=False, correction=False).pvalue
        assert mcnemar_test(b, c, "exact").pvalue == pytest.approx(ref_exact, abs=1e-12, rel=0)
        assert mcnemar_test(b, c, "chi2").pvalue == pytest.approx(ref_chi2, abs=1e-12, rel=0)
        if b != c:  # at b == c statsmodels corrects past zero; see the next test
            ref_cc = mcnemar(t, exact=False, correction=True)
            got = mcnemar_test(b, c, "chi2-cc")
            assert got.pvalue == pytest.approx(ref_cc.pvalue, abs=1e-12, rel=0)
            assert got.statistic == pytest.approx(ref_cc.statistic, abs=1e-12)
            n_cc += 1
    assert n_cc >= 1000


def test_continuity_correction_is_not_applied_past_zero():
    # statsmodels gives (|3 - 3| - 1)^2 / 6 = 1/6 -> p = 0.68; a tie is no evidence: p = 1
    assert mcnemar([[5, 3], [3, 5]], exact=False, correction=True).pvalue < 0.7
    res = mcnemar_test(3, 3, "chi2-cc")
    assert res.statistic == 0.0 and res.pvalue == 1.0


@pytest.mark.parametrize("case", json.loads((REFERENCE / "mcnemar_hand.json").read_text())["cases"])
def test_exact_and_midp_against_hand_fractions(case):
    b, c = case["b"], case["c"]
    exact = Fraction(*case["exact"])
    midp = Fraction(*case["midp"])
    assert mcnemar_test(b, c, "exact").pvalue == pytest.approx(float(exact), abs=1e-15)
    assert mcnemar_midp(b, c) == pytest.approx(float(midp), abs=1e-15)
    assert mcnemar_test(c, b, "midp").pvalue == pytest.approx(float(midp), abs=1e-15)
    if "chi2" in case:
        assert mcnemar_test(b, c, "chi2").statistic == case["chi2"]
        assert mcnemar_test(b, c, "chi2-cc").statistic == case["chi2_cc"]


def test_midp_brief_example():
    # b=1, c=5: exact = 2 * P(X <= 1 | n=6) = 2 * 7/64 = 0.21875; mid-p = 0.21875 - 6/64
    assert mcnemar_test(1, 5, "exact").pvalue == pytest.approx(0.21875, abs=1e-15)
    assert mcnemar_test(1, 5, "midp").pvalue == pytest.approx(0.125, abs=1e-15)


def test_no_discordant_pairs_gives_p_one_for_every_test():
    for method in ("exact", "midp", "chi2", "chi2-cc", "auto"):
        res = mcnemar_test(0, 0, method)
        assert res.pvalue == 1.0 and res.note == "no discordant pairs"
    # statsmodels' corrected chi-square gives p = 0 here; we must not inherit that
    with np.errstate(all="ignore"):
        assert mcnemar([[4, 0], [0, 6]], exact=False, correction=True).pvalue == 0.0


def test_auto_is_midp_and_bad_names_fail():
    assert resolve_test("auto") == "midp"
    assert mcnemar_test(1, 7, "auto").method == "midp"
    with pytest.raises(ConfigError, match="unknown test"):
        mcnemar_test(1, 2, "fisher")


# --------------------------------------------------------------------------- intervals


def _wilson(x: int, n: int, z: float) -> tuple[float, float]:
    # closed form (Wilson 1927), written independently of the library's statsmodels call
    p = x / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def _newcombe10(e: int, f: int, g: int, h: int, z: float) -> tuple[float, float]:
    n = e + f + g + h
    p1, p2 = (e + f) / n, (e + g) / n
    l1, u1 = _wilson(e + f, n, z)
    l2, u2 = _wilson(e + g, n, z)
    a = e * h - f * g
    if a > 0:
        a = max(a - n / 2, 0.0)
    denom = (e + f) * (g + h) * (e + g) * (f + h)
    phi = a / math.sqrt(denom) if denom else 0.0
    d1 = math.sqrt((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2)
    d2 = math.sqrt((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2)
    return p1 - p2 - d1, p1 - p2 + d2


@pytest.mark.parametrize(
    "ref", json.loads((REFERENCE / "newcombe1998_table3_method10.json").read_text())["rows"]
)
def test_paired_ci_matches_newcombe_table(ref):
    lo, hi = paired_difference_ci(*ref["cells"], z=1.96)
    assert lo == pytest.approx(ref["low"], abs=1e-4)
    assert hi == pytest.approx(ref["high"], abs=1e-4)


def test_paired_ci_matches_independent_computation_and_is_antisymmetric():
    rng = np.random.default_rng(7)
    z = float(norm.ppf(0.975))
    for _ in range(300):
        e, f, g, h = (int(v) for v in rng.integers(0, 60, size=4))
        if e + f + g + h == 0 or min(e + f, g + h, e + g, f + h) == 0:
            continue
        lo, hi = paired_difference_ci(e, f, g, h)
        ref = _newcombe10(e, f, g, h, z)
        assert lo == pytest.approx(ref[0], abs=1e-12) and hi == pytest.approx(ref[1], abs=1e-12)
        lo2, hi2 = paired_difference_ci(e, g, f, h)
        assert lo2 == pytest.approx(-hi, abs=1e-12) and hi2 == pytest.approx(-lo, abs=1e-12)
        assert lo <= (f - g) / (e + f + g + h) <= hi


def test_paired_ci_is_narrower_than_unpaired_when_runs_agree():
    # strongly concordant pairs: the paired interval must beat the independent-samples one
    e, f, g, h = 60, 6, 1, 33
    lo, hi = paired_difference_ci(e, f, g, h)
    n = e + f + g + h
    z = float(norm.ppf(0.975))
    l1, u1 = _wilson(e + f, n, z)
    l2, u2 = _wilson(e + g, n, z)
    d = (f - g) / n
    un_lo = d - math.hypot((e + f) / n - l1, u2 - (e + g) / n)
    un_hi = d + math.hypot(u1 - (e + f) / n, (e + g) / n - l2)
    assert hi - lo < (un_hi - un_lo) - 0.01


def test_odds_ratio_interval_is_transformed_clopper_pearson():
    for b, c in ((3, 11), (20, 5), (1, 1), (40, 37)):
        res = discordant_odds_ratio(b, c)
        ci = binomtest(b, b + c).proportion_ci(confidence_level=0.95, method="exact")
        assert res.estimate == pytest.approx(b / c)
        assert res.low == pytest.approx(ci.low / (1 - ci.low), rel=1e-9)
        assert res.high == pytest.approx(ci.high / (1 - ci.high), rel=1e-9)
        swapped = discordant_odds_ratio(c, b)
        assert swapped.low == pytest.approx(1 / res.high, rel=1e-9)
    zero_b = discordant_odds_ratio(0, 6)
    assert zero_b.estimate == 0.0 and zero_b.low == 0.0 and zero_b.high is not None
    zero_c = discordant_odds_ratio(6, 0)
    assert zero_c.estimate is None and zero_c.high is None and "infinite" in zero_c.note
    assert discordant_odds_ratio(0, 0).estimate is None


# --------------------------------------------------------------------------- corrections


@pytest.mark.parametrize(
    ("ours", "theirs"), [("holm", "holm"), ("bh", "fdr_bh"), ("bonferroni", "bonferroni")]
)
def test_adjusted_pvalues_equal_multipletests(items, ours, theirs):
    rng = np.random.default_rng(3)
    base = items.assign(pred_index=rng.integers(0, 3, len(items)))
    aligned = items.assign(pred_index=rng.integers(0, 3, len(items)))
    result = compare_runs(base, aligned, CompareConfig(correction=ours))
    fam = result.strata[result.strata["level"] == "category+context_condition"]
    assert len(fam) == 22 and (fam["family_size"] == 22).all()
    _, ref, _, _ = multipletests(fam["p_value"].to_numpy(), alpha=0.05, method=theirs)
    assert np.allclose(fam["p_adjusted"].to_numpy(), ref, atol=1e-15, rtol=0)
    assert (fam["correction"] == ours).all()
    cats = result.strata[result.strata["level"] == "category"]
    _, ref_c, _, _ = multipletests(cats["p_value"].to_numpy(), alpha=0.05, method=theirs)
    assert np.allclose(cats["p_adjusted"].to_numpy(), ref_c, atol=1e-15, rtol=0)
    assert (cats["family_size"] == 11).all()
    overall = result.strata.iloc[-1]
    assert overall["family_size"] == 1 and overall["p_adjusted"] == overall["p_value"]


def test_no_correction_keeps_raw_pvalues():
    adj, rej = adjust_pvalues([0.01, 0.2, 0.04], "none", 0.05)
    assert adj.tolist() == [0.01, 0.2, 0.04] and rej.tolist() == [True, False, True]
    with pytest.raises(ConfigError):
        adjust_pvalues([0.1], "sidak", 0.05)


# --------------------------------------------------------------------------- symmetry


@pytest.mark.parametrize("cluster", ["item", "template"])
def test_swapping_runs_keeps_pvalues_and_flips_effects(items, cluster):
    rng = np.random.default_rng(11)
    base = items.assign(pred_index=rng.integers(0, 3, len(items)))
    al = base_predictions(items)
    al = np.where(rng.random(len(items)) < 0.3, rng.integers(0, 3, len(items)), al)
    aligned = items.assign(pred_index=al)
    cfg = CompareConfig(bootstrap=300, seed=4, cluster=cluster)
    fwd = compare_runs(base, aligned, cfg).strata
    bwd = compare_runs(aligned, base, cfg).strata
    assert fwd["p_value"].tolist() == bwd["p_value"].tolist()
    assert fwd["p_adjusted"].tolist() == bwd["p_adjusted"].tolist()
    assert (fwd["b"] == bwd["c"]).all() and (fwd["c"] == bwd["b"]).all()
    assert np.allclose(fwd["delta_accuracy"], -bwd["delta_accuracy"], atol=1e-15)
    assert np.allclose(fwd["delta_accuracy_ci_low"], -bwd["delta_accuracy_ci_high"], atol=1e-12)
    assert np.allclose(fwd["delta_accuracy_ci_high"], -bwd["delta_accuracy_ci_low"], atol=1e-12)
    d_f = fwd["delta_bias_score"].astype(float)
    d_b = bwd["delta_bias_score"].astype(float)
    assert d_f.notna().sum() == 24
    assert np.allclose(d_f, -d_b, atol=1e-12, equal_nan=True)
    both = (fwd["b"] > 0) & (fwd["c"] > 0)
    log_or_f = np.log(fwd.loc[both, "odds_ratio"].astype(float))
    log_or_b = np.log(bwd.loc[both, "odds_ratio"].astype(float))
    assert np.allclose(log_or_f, -log_or_b, atol=1e-12)
    if cluster == "template":  # resamples do not depend on the predictions: exact mirror
        lo_f = fwd["delta_bias_score_ci_low"].astype(float)
        hi_b = bwd["delta_bias_score_ci_high"].astype(float)
        assert np.allclose(lo_f, -hi_b, atol=1e-9, equal_nan=True)


# --------------------------------------------------------------------------- Simpson flags


def test_planted_masking_is_flagged(items):
    base, aligned = planted_pair(items, mask=True)
    result = compare_runs(base, aligned)
    pa = row(result, category="Physical_appearance", context_condition="ambig")
    assert pa["delta_accuracy"] < -0.15
    assert "significant_degradation" in pa["flags"]
    overall = row(result)
    assert overall["delta_accuracy"] > 0 and "masking" in overall["flags"]
    ambig = row(result, context_condition="ambig")
    assert ambig["delta_accuracy"] > 0 and "masking" in ambig["flags"]
    masking = [f for f in result.flags if f.kind == "masking"]
    assert {(f.aggregate["category"], f.aggregate["context_condition"]) for f in masking} >= {
        ("all", "all"),
        ("all", "ambig"),
    }
    flag = next(
        f for f in masking if f.aggregate == {"category": "all", "context_condition": "all"}
    )
    assert [s["category"] for s in flag.strata] == ["Physical_appearance"]
    assert flag.strata[0]["b"] == pa["b"] and flag.strata[0]["n"] == 200
    assert "Physical_appearance / ambig" in flag.message and "rises" in flag.message
    degr = result.summary["by_context"]["ambig"]["degradations"]
    assert [d["category"] for d in degr] == ["Physical_appearance"]


def test_consistent_improvement_is_not_flagged(items):
    base, aligned = planted_pair(items, mask=False)
    result = compare_runs(base, aligned)
    assert result.flags == []
    fam = result.strata[result.strata["level"] == "category+context_condition"]
    assert (fam["delta_accuracy"] > 0).all()
    assert not any("masking" in f or "reversal" in f for f in result.strata["flags"])
    assert not any("significant_degradation" in f for f in result.strata["flags"])


def _reversal_frames(with_minority: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Disambiguated items where every category's s_DIS rises but the total falls.

    target 0, label 1, unknown 2. X: base 2 biased / 8 other / 90 unknown (s_DIS -60),
    aligned 30 / 70 / 0 (-40). Y: base 90 / 10 / 0 (+80), aligned 10 / 0 / 90 (+100).
    Pooled: base 92 of 110 non-unknown biased (+67.3), aligned 40 of 110 (-27.3).
    Z (optional, 20 items): base 10 / 10 (0), aligned 0 / 20 (-100): a small category
    moving with the total, so the opposite strata are a weighted majority, not all.
    """
    spec = {"Age": ([0] * 2 + [1] * 8 + [2] * 90, [0] * 30 + [1] * 70)}
    spec["Religion"] = ([0] * 90 + [1] * 10, [0] * 10 + [2] * 90)
    if with_minority:
        spec["SES"] = ([0] * 10 + [1] * 10, [1] * 20)
    rows, pb, pa = [], [], []
    for cat, (b, a) in spec.items():
        for i, (x, y) in enumerate(zip(b, a, strict=True)):
            rows.append(
                {
                    "category": cat,
                    "example_id": i,
                    "question_index": i % 5,
                    "scenario": i % 5,
                    "context_condition": "disambig",
                    "question_polarity": "neg",
                    "label_type": "label",
                    "label": 1,
                    "target_loc": 0,
                    "unknown_loc": 2,
                }
            )
            pb.append(x)
            pa.append(y)
    items = pd.DataFrame(rows)
    return items.assign(pred_index=pb), items.assign(pred_index=pa)


def test_reversal_all_strata():
    base, aligned = _reversal_frames(with_minority=False)
    result = compare_runs(base, aligned)
    age = row(result, category="Age", context_condition="disambig")
    rel = row(result, category="Religion", context_condition="disambig")
    assert age["bias_score_base"] == pytest.approx(-60) and age[
        "bias_score_aligned"
    ] == pytest.approx(-40)
    assert rel["bias_score_base"] == pytest.approx(80) and rel[
        "bias_score_aligned"
    ] == pytest.approx(100)
    total = row(result, context_condition="disambig")
    assert total["bias_score_base"] == pytest.approx(100 * (2 * 92 / 110 - 1))
    assert total["bias_score_aligned"] == pytest.approx(100 * (2 * 40 / 110 - 1))
    assert "reversal" in total["flags"]
    (flag,) = [f for f in result.flags if f.kind == "reversal"]
    assert flag.scope == "all" and flag.metric == "bias_score"
    assert flag.aggregate == {"category": "all", "context_condition": "disambig"}
    assert flag.aggregate_delta == pytest.approx(total["delta_bias_score"])
    assert {s["category"] for s in flag.strata} == {"Age", "Religion"}
    assert flag.weight_share == 1.0
    assert "falls" in flag.message and "all 2 strata under it rise" in flag.message


def test_no_reversal_from_a_weighted_majority():
    """A reversal needs every defined stratum against the aggregate: a weighted majority
    opposite to it (the former rule) is not one."""
    base, aligned = _reversal_frames(with_minority=True)
    result = compare_runs(base, aligned)
    assert [f for f in result.flags if f.kind == "reversal"] == []
    total = row(result, context_condition="disambig")
    assert total["delta_bias_score"] < 0 and "reversal" not in total["flags"]


def test_no_reversal_when_the_aggregate_interval_spans_zero():
    base, aligned = _reversal_frames(with_minority=False)
    result = compare_runs(base, aligned, CompareConfig(bootstrap=0))
    assert [f for f in result.flags if f.kind == "reversal"] == []


def test_no_reversal_when_strata_agree():
    base, _ = _reversal_frames(with_minority=False)
    result = compare_runs(base, base.assign(pred_index=0))  # everything biased: all rise
    assert [f for f in result.flags if f.kind == "reversal"] == []


# --------------------------------------------------------------------------- outputs


def test_json_is_strict_and_complete(items):
    base, aligned = planted_pair(items, mask=True)
    result = compare_runs(base, aligned, CompareConfig(bootstrap=200, targets=("appearance",)))
    payload = result.to_json()
    text = json.dumps(payload, allow_nan=False)
    assert set(payload) == {"strata", "flags", "summary", "warnings", "config"}
    rec = payload["strata"][0]
    for key in (
        "category", "context_condition", "n", "b", "c", "n_both_correct", "n_both_wrong",
        "acc_base", "acc_aligned", "test", "statistic", "p_value", "p_adjusted", "correction",
        "family_size", "delta_accuracy", "delta_accuracy_ci_low", "delta_accuracy_ci_high",
        "ci_method", "odds_ratio", "odds_ratio_ci_low", "odds_ratio_ci_high", "bias_score_base",
        "bias_score_aligned", "delta_bias_score", "delta_bias_score_ci_low",
        "delta_bias_score_ci_high", "flags", "note",
    ):  # fmt: skip
        assert key in rec, key
    for key in (
        "p_value_item", "p_adjusted_item", "significant_item", "p_value_clustered",
        "p_adjusted_clustered", "significant_clustered", "cluster_unit", "n_clusters",
        "n_informative_clusters", "mdc_accuracy", "delta_accuracy_newcombe_low",
        "delta_unknown_rate", "delta_unknown_ci_low", "p_value_unknown", "significant_unknown",
        "n_non_unknown_base", "bias_low_support", "heterogeneity_p",
    ):  # fmt: skip
        assert key in rec, key
    # the default: scenario-clustered sign-flip test and its score interval
    assert rec["test"] == "signflip" and rec["ci_method"] == "cluster-signflip"
    assert rec["cluster_unit"] == "scenario" and rec["n_clusters"] == 10
    assert rec["p_value"] == rec["p_value_clustered"]
    item = compare_runs(base, aligned, CompareConfig(cluster="item")).to_json()["strata"][0]
    assert item["test"] == "midp" and item["ci_method"] == "newcombe-10"
    assert item["p_value"] == item["p_value_item"]
    assert item["p_value_clustered"] == rec["p_value_clustered"]  # the clustered verdict beside
    overall = payload["strata"][-1]
    assert overall["bias_score_base"] is None and "per context" in overall["note"]
    assert "NaN" not in text and "Infinity" not in text
    sp = payload["summary"]["spillover"]
    assert sp["target"]["categories"] == ["Physical_appearance"]
    assert len(sp["untargeted"]["categories"]) == 10
    target_ambig = sp["target"]["by_context"]["ambig"]
    assert [d["category"] for d in target_ambig["degradations"]] == ["Physical_appearance"]
    assert target_ambig["pooled"]["n"] == 200 and target_ambig["pooled"]["delta_accuracy"] < 0
    untargeted_ambig = sp["untargeted"]["by_context"]["ambig"]
    assert untargeted_ambig["degradations"] == [] and len(untargeted_ambig["improvements"]) == 10
    assert untargeted_ambig["pooled"]["n"] == 2000
    assert payload["config"]["targets"] == ["Physical_appearance"]
    lines = result.to_csv().splitlines()
    assert len(lines) == len(result.strata) + 1
    pa_line = next(
        ln for ln in lines if ln.startswith("category+context_condition,Physical_appearance,ambig,")
    )
    assert "significant_degradation" in pa_line


@pytest.mark.parametrize("cluster", ["scenario", "template", "item"])
def test_every_interval_holds_its_estimate_and_has_the_right_sign(items, cluster):
    base, aligned = planted_pair(items, mask=True)
    rows = compare_runs(base, aligned, CompareConfig(cluster=cluster, bootstrap=0)).rows
    for r in rows:
        assert r.delta_accuracy_ci_low <= r.delta_accuracy <= r.delta_accuracy_ci_high
        assert r.delta_unknown_ci_low <= r.delta_unknown_rate <= r.delta_unknown_ci_high
        nlo, nhi = r.delta_accuracy_newcombe_low, r.delta_accuracy_newcombe_high
        assert nlo <= r.delta_accuracy <= nhi
        # the default interval is never narrower than the item-level one
        assert r.delta_accuracy_ci_low <= nlo + 1e-12 and r.delta_accuracy_ci_high >= nhi - 1e-12
    losing = [r for r in rows if r.delta_accuracy < -0.1 and r.n >= 20]
    assert losing and all(r.delta_accuracy_ci_low < 0 for r in losing)


def test_no_discordant_pairs_row(items):
    base = items.assign(pred_index=base_predictions(items))
    result = compare_runs(base, base)
    for rec in result.records():
        assert rec["p_value"] == 1.0 and rec["note"].startswith("no discordant pairs")
        assert rec["odds_ratio"] is None and rec["delta_accuracy"] == 0.0


def test_polarity_split_and_families(items):
    base, aligned = planted_pair(items, mask=True)
    result = compare_runs(
        base, aligned, CompareConfig(by=("category", "context_condition", "question_polarity"))
    )
    fine = result.strata[result.strata["level"] == "category+context_condition+question_polarity"]
    assert len(fine) == 44 and (fine["family_size"] == 44).all()
    cells = result.strata[result.strata["level"] == "category+context_condition"]
    assert len(cells) == 22 and (cells["family_size"] == 22).all()
    assert "question_polarity" in result.strata.columns
    assert result.summary["family_size"] == 44


def test_targets_must_be_known():
    with pytest.raises(ConfigError, match="unknown BBQ category"):
        CompareConfig(targets=("gendr_identity_x",))
    assert CompareConfig(targets=("gender",)).targets == ("Gender_identity",)
    with pytest.raises(ConfigError):
        CompareConfig(test="t-test")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        CompareConfig(bootstrap=10)
    with pytest.raises(ConfigError, match="needs 'category'"):
        CompareConfig(by=("context_condition",), targets=("gender",))


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_seeded():
    base, aligned = planted_pair(bbq_like_items(per_cell=60), mask=True)
    a = compare_runs(base, aligned, CompareConfig(bootstrap=200, seed=1)).strata
    b = compare_runs(base, aligned, CompareConfig(bootstrap=200, seed=1)).strata
    c = compare_runs(base, aligned, CompareConfig(bootstrap=200, seed=2)).strata
    cols = ["delta_bias_score_ci_low", "delta_bias_score_ci_high"]
    assert a[cols].equals(b[cols])
    assert not a[cols].equals(c[cols])


def test_item_bootstrap_has_the_resampling_distribution():
    # one cell of 1,000 items with a 0/1 statistic of mean 0.3: replicate sums have mean
    # 300 and variance n p (1 - p) = 210 when items are drawn with replacement
    stats = (np.arange(1000) < 300).astype(np.int64)[:, None]
    reps = bootstrap_cell_sums(stats, np.zeros(1000, dtype=np.int64), 1, replicates=6000, seed=0)
    sums = reps[:, 0, 0]
    assert abs(sums.mean() - 300) < 1.0
    assert sums.var(ddof=1) == pytest.approx(210, rel=0.08)


def test_template_bootstrap_is_wider_when_templates_agree():
    # every template is answered all-right or all-wrong: items are not independent, so the
    # template bootstrap must give a wider interval than the item bootstrap
    items = bbq_like_items(per_cell=200, templates=10, seed=2)
    rng = np.random.default_rng(0)
    good = {(c, q): rng.random() < 0.5 for c in CATEGORIES for q in range(10)}
    right = np.array(
        [good[(c, q)] for c, q in zip(items["category"], items["question_index"], strict=True)]
    )
    base = items.assign(pred_index=items["unknown_loc"])
    aligned = items.assign(pred_index=np.where(right, items["label"], items["unknown_loc"]))
    width = {}
    for unit in ("item", "template"):
        s = compare_runs(base, aligned, CompareConfig(bootstrap=400, cluster=unit)).strata.iloc[-1]
        width[unit] = s["delta_accuracy_boot_ci_high"] - s["delta_accuracy_boot_ci_low"]
    assert width["template"] > 2 * width["item"]


# --------------------------------------------------------------------------- mismatched input


def test_mismatched_inputs(items):
    base, aligned = planted_pair(items, mask=False)
    short = aligned.iloc[5:]
    with pytest.raises(DataError, match=r"different items.*5 only in BASE \(e\.g\. Age/0"):
        compare_runs(base, short)
    result = compare_runs(base, short, CompareConfig(intersect=True))
    assert result.summary["dropped"]["base_only"] == 5
    assert result.summary["dropped"]["aligned_only"] == 0
    assert result.summary["n_items"] == len(items) - 5
    with pytest.raises(DataError, match="duplicate key"):
        compare_runs(base, pd.concat([aligned, aligned.iloc[:1]]))
    with pytest.raises(DataError, match="missing column"):
        compare_runs(base, aligned.drop(columns=["pred_index"]))
    bad = aligned.copy()
    bad.loc[3, "pred_index"] = 3
    with pytest.raises(DataError, match=r"row 4: field 'pred_index'=3; expected 0, 1 or 2"):
        compare_runs(base, bad)
    other = aligned.copy()
    other.loc[0, "label"] = (other.loc[0, "label"] + 1) % 3
    with pytest.raises(DataError, match="disagree on 'label'"):
        compare_runs(base, other)


def _bbq_record(r) -> dict:
    groups = [f"g{i}" for i in range(3)]
    groups[int(r.unknown_loc)] = "unknown"
    answers = [f"person {i}" for i in range(3)]
    answers[int(r.unknown_loc)] = "Unknown"
    return {
        "example_id": int(r.example_id),
        "question_index": str(r.question_index),
        "question_polarity": r.question_polarity,
        "context_condition": r.context_condition,
        "category": r.category,
        "answer_info": {f"ans{i}": [answers[i], groups[i]] for i in range(3)},
        "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["g0"]},
        "context": "A context.",
        "question": "A question?",
        "ans0": answers[0],
        "ans1": answers[1],
        "ans2": answers[2],
        "label": int(r.label),
    }


def write_bbq_folder(root: Path, items: pd.DataFrame) -> Path:
    """A complete (but unverified) BBQ folder holding ``items``."""
    root.mkdir(parents=True, exist_ok=True)
    for cat in CATEGORIES:
        sub = items[items["category"] == cat]
        lines = [json.dumps(_bbq_record(r)) for r in sub.itertuples(index=False)]
        (root / f"{cat}.jsonl").write_text("\n".join(lines) + "\n")
    with (root / "additional_metadata.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["category", "question_index", "example_id", "target_loc", "label_type"])
        for r in items.itertuples(index=False):
            w.writerow(
                [r.category, r.question_index, r.example_id, int(r.target_loc), r.label_type]
            )
    return root


@pytest.fixture(scope="module")
def small_bbq(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    items = bbq_like_items(per_cell=40, seed=5)
    return write_bbq_folder(tmp_path_factory.mktemp("bbq"), items), items


def test_cli_compare_writes_json_and_csv(small_bbq, tmp_path):
    root, items = small_bbq
    base, aligned = planted_pair(items, mask=True)
    bp, ap = tmp_path / "base.jsonl", tmp_path / "aligned.parquet"
    base[["category", "example_id", "pred_index"]].to_json(bp, orient="records", lines=True)
    aligned[["category", "example_id", "pred_index"]].to_parquet(ap)
    out_json, out_csv = tmp_path / "c.json", tmp_path / "c.csv"
    res = invoke(
        ["compare", str(bp), str(ap), "--bbq-dir", str(root), "--allow-unverified",
         "--bootstrap", "200", "--seed", "3", "--json", str(out_json), "--csv", str(out_csv),
         "--targets", "appearance"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    payload = json.loads(out_json.read_text())
    assert payload["warnings"] and all("UNVERIFIED" in w for w in payload["warnings"])
    assert payload["config"]["bootstrap"] == 200 and payload["config"]["seed"] == 3
    assert len(payload["strata"]) == 22 + 11 + 2 + 1
    assert out_csv.read_text().startswith("level,category,context_condition,n,")
    assert "UNVERIFIED" in res.stderr


def test_cli_compare_intersect_reports_drops(small_bbq, tmp_path):
    root, items = small_bbq
    base, aligned = planted_pair(items, mask=False)
    bp, ap = tmp_path / "b.csv", tmp_path / "a.csv"
    base[["category", "example_id", "pred_index"]].to_csv(bp, index=False)
    aligned[["category", "example_id", "pred_index"]].iloc[7:].to_csv(ap, index=False)
    args = ["compare", str(bp), str(ap), "--bbq-dir", str(root), "--allow-unverified"]
    res = invoke([*args, "--intersect"])
    assert res.exit_code == 0, res.output
    assert "dropped 7 only in BASE and 0 only in ALIGNED" in res.stdout


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        ("subset", "the runs cover different items"),
        ("duplicate", "duplicate key"),
        ("no_column", "missing column(s) 'pred_index'"),
        ("out_of_range", "field 'pred_index'=7"),
        ("bad_option", "--correction='sidak'"),
    ],
)
def test_cli_compare_errors_are_one_line(small_bbq, tmp_path, mutate, message):
    root, items = small_bbq
    base, aligned = planted_pair(items, mask=False)
    cols = ["category", "example_id", "pred_index"]
    a = aligned[cols].copy()
    extra: list[str] = []
    if mutate == "subset":
        a = a.iloc[3:]
    elif mutate == "duplicate":
        a = pd.concat([a, a.iloc[[10]]])
    elif mutate == "no_column":
        a = a.drop(columns=["pred_index"])
    elif mutate == "out_of_range":
        a.iloc[4, 2] = 7
    else:
        extra = ["--correction", "sidak"]
    bp, ap = tmp_path / "b.csv", tmp_path / "a.csv"
    base[cols].to_csv(bp, index=False)
    a.to_csv(ap, index=False)
    out_json, out_csv = tmp_path / "c.json", tmp_path / "c.csv"
    res = invoke(
        ["compare", str(bp), str(ap), "--bbq-dir", str(root), "--allow-unverified",
         "--json", str(out_json), "--csv", str(out_csv), *extra],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert message in err[0]
    assert "Traceback" not in res.output
    assert not out_json.exists() and not out_csv.exists()
    assert list(tmp_path.glob(".*.tmp")) == []


def test_stats_modules_do_not_import_model_libraries():
    code = (
        "import sys, spillover.stats, spillover.cli\n"
        "bad = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    src = str(Path(spillover.__file__).parent.parent)
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------- full data


@pytest.mark.fulldata
def test_full_bbq_compare_and_planted_masking(bbq_full):
    items = bbq_full.frame()
    items = items[items["target_loc"].notna()].reset_index(drop=True)
    base, aligned = planted_pair(items, mask=True)
    preds_b = base[["category", "example_id", "pred_index"]]
    preds_a = aligned[["category", "example_id", "pred_index"]]
    jb, ja = join_with_bbq(preds_b, bbq_full), join_with_bbq(preds_a, bbq_full)
    # the paper's item-level analysis sees the planted loss and the masking ...
    result = compare_runs(jb, ja, CompareConfig(bootstrap=300, cluster="item"))
    assert len(result.strata) == 36 and result.summary["family_size"] == 22
    pa = row(result, category="Physical_appearance", context_condition="ambig")
    assert "significant_degradation" in pa["flags"]
    assert "masking" in row(result)["flags"]
    json.dumps(result.to_json(), allow_nan=False)
    # ... but the loss is planted in the first items of the cell, i.e. in a few templates:
    # under scenario clustering it is an item-level-only finding, and nothing is masked
    clustered = compare_runs(jb, ja, CompareConfig(bootstrap=0))
    pa = row(clustered, category="Physical_appearance", context_condition="ambig")
    assert pa["flags"] == ["item_level_only"] and pa["p_value_item"] < 1e-6
    assert pa["n_clusters"] == 25 and pa["p_value"] > 0.05
    assert [f for f in clustered.flags if f.kind == "masking"] == []
    base2, aligned2 = planted_pair(items, mask=False)
    clean = compare_runs(base2, aligned2)
    assert [f for f in clean.flags if f.kind == "masking"] == []


# --------------------------------------------------------------------------- collapse guard


def _mix_frame(preds: list[int], contexts: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"pred_index": preds, "unknown_loc": [1] * len(preds), "context_condition": contexts}
    )


def test_collapse_guard_names_each_shortcut_and_spares_a_healthy_model() -> None:
    from spillover.stats.guard import answer_mix

    ctx = ["ambig"] * 10 + ["disambig"] * 10
    base = _mix_frame([0, 1, 2, 1, 0, 2, 1, 0, 2, 1] * 2, ctx)
    healthy = answer_mix(base, _mix_frame([0, 1, 2, 1, 0, 2, 1, 0, 2, 0] * 2, ctx))
    assert not healthy["collapsed"] and healthy["reasons"] == [] and healthy["advice"] is None
    assert healthy["aligned"]["position_share"] == [0.4, 0.3, 0.3]
    # 19 of 20 answers "unknown" (95 % > 90 %); disambiguated unknown 40 % -> 90 %
    unknown = answer_mix(base, _mix_frame([1] * 19 + [0], ctx))
    assert unknown["collapsed"] and len(unknown["reasons"]) == 3  # unknown, position B, rise
    assert "answers 'unknown' on 95 %" in unknown["reasons"][0]
    assert "rose from 40 % to 90 % (+50 points)" in unknown["reasons"][2]
    assert "rpo_alpha" in unknown["advice"]
    # one position that is not "unknown": only the position reason fires
    position = answer_mix(base, _mix_frame([2] * 20, ctx))
    assert position["collapsed"] and position["reasons"] == [
        "the aligned model picks answer C (position 3) on 100 % of these items"
    ]
    # exactly at the thresholds nothing fires: 90 % one answer, +20 points disambiguated unknown
    edge = answer_mix(
        _mix_frame([0] * 10 + [1] * 2 + [0] * 8, ctx), _mix_frame([0] * 18 + [1, 1], ctx)
    )
    assert edge["aligned"]["position_share"][0] == 0.9 and not edge["collapsed"]


def test_compare_files_leaves_out_trained_on_templates(mini_dir: Path, tmp_path: Path) -> None:
    """`heldout`: a target keeps only its held-out templates, the others stay whole, a warning
    counts what was left out, and the held-out summary covers the kept target items."""
    from spillover.data import load_bbq
    from spillover.stats import CompareConfig, compare_files

    data = load_bbq(mini_dir, allow_unverified=True)
    frame = data.frame()
    preds = frame[["category", "example_id"]].assign(pred_index=frame["label"])
    preds.to_csv(tmp_path / "base.csv", index=False)
    preds.to_csv(tmp_path / "aligned.csv", index=False)
    gender = frame[frame["category"] == "Gender_identity"]
    keep = {int(q) for q in sorted(gender["question_index"].unique())[:1]}
    n_gender_kept = int(gender["question_index"].isin(keep).sum())
    cfg = CompareConfig(bootstrap=0, targets=("Gender_identity",))
    found = compare_files(
        tmp_path / "base.csv", tmp_path / "aligned.csv", data, cfg,
        heldout={"Gender_identity": keep},
    )  # fmt: skip
    result = found.comparison
    assert found.heldout_target is not None
    assert found.heldout_target["n_items"] == n_gender_kept
    assert found.heldout_target["n_in_sample"] == len(gender) - n_gender_kept
    rows = {(r.category, r.context_condition): r.n for r in result.rows}
    n_gender = sum(n for (c, ctx), n in rows.items() if c == "Gender_identity" and ctx != "all")
    assert n_gender == n_gender_kept < len(gender)
    assert rows[("all", "all")] == len(frame) - (len(gender) - n_gender_kept)
    note = f"{len(gender) - n_gender_kept} Gender_identity item(s) on scenarios the aligned model"
    assert any(w.startswith(note) for w in result.warnings)


# --------------------------------------------------------------------------- hardening

# Every bad prediction file, output path or option below ends in one line naming the
# place at fault, exit code 1, and no file written or changed.

_GOOD = b'{"category": "Age", "example_id": 0, "pred_index": 1}\n'
_GOOD_CSV = b"category,example_id,pred_index\nAge,0,1\n"


def _jsonl(second: str) -> bytes:
    return _GOOD + second.encode() + b"\n"


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder or a link)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        plain = p.is_file() and not p.is_symlink()
        out[str(p.relative_to(root))] = p.read_bytes() if plain else None
    return out


def _one_error_line(res) -> str:  # type: ignore[no-untyped-def]
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return str(lines[0])


def _mini_preds(mini_dir: Path) -> pd.DataFrame:
    from spillover.data import load_bbq

    frame = load_bbq(mini_dir, allow_unverified=True).frame()
    return frame[["category", "example_id"]].assign(pred_index=frame["label"])


_BAD_PREDICTIONS = [
    # (id, file name, content, needle)
    (
        "jsonl-bool",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": 1, "pred_index": true}'),
        "p.jsonl:2: field 'pred_index'=True is a boolean; expected 0, 1 or 2",
    ),
    (
        "csv-true",
        "p.csv",
        _GOOD_CSV + b"Age,1,true\n",
        "p.csv:3: field 'pred_index'='true' is a boolean",
    ),
    (
        "csv-True-column",
        "p.csv",
        b"category,example_id,pred_index\nAge,0,True\nAge,1,False\n",
        "p.csv:2: field 'pred_index'=True is a boolean",
    ),
    (
        "jsonl-bool-id",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": false, "pred_index": 0}'),
        "p.jsonl:2: field 'example_id'=False is a boolean; expected a non-negative integer",
    ),
    (
        "id-1e20",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": 1e20, "pred_index": 0}'),
        "p.jsonl:2: field 'example_id'=1e+20; expected a non-negative integer of at most "
        "9,007,199,254,740,991",
    ),
    (
        "id-1e20-csv",
        "p.csv",
        _GOOD_CSV + b"Age,1e20,0\n",
        "p.csv:3: field 'example_id'=1e+20; expected a non-negative integer of at most",
    ),
    (
        "id-2**64",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": 18446744073709551616, "pred_index": 0}'),
        "p.jsonl:2: field 'example_id'=18446744073709551616; expected a non-negative integer",
    ),
    (
        "id-400-digits",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": 1' + "0" * 400 + ', "pred_index": 0}'),
        "p.jsonl:2: field 'example_id'=<an integer of 401 digits>; expected a non-negative",
    ),
    (
        "id-fraction",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": 1.5, "pred_index": 0}'),
        "p.jsonl:2: field 'example_id'=1.5; expected a non-negative integer",
    ),
    (
        "id-Infinity",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": Infinity, "pred_index": 0}'),
        "p.jsonl:2: field 'example_id'=inf; expected a non-negative integer",
    ),
    (
        "pred-NaN",
        "p.jsonl",
        _jsonl('{"category": "Age", "example_id": 1, "pred_index": NaN}'),
        "p.jsonl:2: field 'pred_index'=nan; expected 0, 1 or 2",
    ),
    (
        "score-huge-int",
        "p.jsonl",
        _GOOD.replace(b"}", b', "score_0": -1, "score_1": -2, "score_2": -3}')
        + b'{"category": "Age", "example_id": 1, "pred_index": 0, "score_0": 1'
        + b"0" * 400
        + b', "score_1": 0, "score_2": 0}\n',
        "p.jsonl:2: field 'score_0'=<an integer of 401 digits>; expected a log-probability",
    ),
    (
        "label-huge-int",
        "p.jsonl",
        _jsonl(
            '{"category": "Age", "example_id": 1, "pred_index": 0, "label": 1' + "0" * 400 + "}"
        ),
        "prediction row(s) carry a 'label' that disagrees with BBQ",
    ),
    (
        "permutation-null",
        "p.jsonl",
        _GOOD.replace(b"}", b', "permutation": "012"}')
        + b'{"category": "Age", "example_id": 1, "pred_index": 0, "permutation": null}\n',
        "p.jsonl:2: field 'permutation'=nan; expected a permutation id such as '012'",
    ),
    (
        "permutation-Infinity",
        "p.jsonl",
        _GOOD.replace(b"}", b', "permutation": "012"}')
        + b'{"category": "Age", "example_id": 1, "pred_index": 0, "permutation": Infinity}\n',
        "p.jsonl:2: field 'permutation'=inf; expected a permutation id",
    ),
    (
        "utf8-jsonl",
        "p.jsonl",
        _GOOD + b'{"category": "Ag\xff", "example_id": 1, "pred_index": 0}\n',
        "p.jsonl:2: not valid UTF-8 (byte b'\\xff'",
    ),
    ("utf8-csv", "p.csv", _GOOD_CSV + b"Age,1,0\nAg\xe9,2,0\n", "p.csv:4: not valid UTF-8"),
    (
        "deep-json",
        "p.jsonl",
        _GOOD + b"[" * 100_000 + b"]" * 100_000 + b"\n",
        "p.jsonl:2: JSON nested too deeply to read",
    ),
    (
        "long-field-jsonl",
        "p.jsonl",
        _jsonl(
            '{"category": "Age", "example_id": 1, "pred_index": 0, "note": "' + "x" * 100_001 + '"}'
        ),
        "p.jsonl:2: field 'note' holds 100,001 characters; expected at most 100,000",
    ),
    (
        "long-field-csv",
        "p.csv",
        b"category,example_id,pred_index,note\nAge,0,1,ok\nAge,1,0," + b"x" * 100_001 + b"\n",
        "p.csv:3: field 'note' holds 100,001 characters; expected at most 100,000",
    ),
    (
        "long-name-csv",
        "p.csv",
        b"category,example_id,pred_index," + b"n" * 100_001 + b"\nAge,0,1,ok\n",
        "p.csv:1: a column name of 100,001 characters",
    ),
    (
        "not-in-bbq-csv",
        "p.csv",
        _GOOD_CSV + b"Age,1,0\nAge,99999,0\nAge,99998,0\n",
        "p.csv:4: 2 prediction(s) name items that are not in BBQ (e.g. Age/99999, Age/99998)",
    ),
    (
        "not-in-bbq-jsonl",
        "p.jsonl",
        _GOOD + b"\n\n" + b'{"category": "Age", "example_id": 99999, "pred_index": 0}\n',
        "p.jsonl:4: 1 prediction(s) name items that are not in BBQ (e.g. Age/99999)",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [pytest.param(n, c, s, id=i) for i, n, c, s in _BAD_PREDICTIONS],
)
def test_bad_prediction_file_is_one_line(mini_dir, tmp_path, name, content, needle):
    pred = tmp_path / name
    pred.write_bytes(content)
    before = _snapshot(tmp_path)
    res = invoke(["metrics", pred, "--bbq-dir", mini_dir, "--allow-unverified",
                  "--json", tmp_path / "m.json"])  # fmt: skip
    assert needle in _one_error_line(res)
    assert _snapshot(tmp_path) == before


def test_bad_prediction_parquet_is_one_line(mini_dir, tmp_path):
    pred = tmp_path / "p.parquet"
    cases = [
        ({"example_id": [0, 1], "pred_index": [True, False]},
         "p.parquet:row 1: field 'pred_index'=True is a boolean"),
        ({"example_id": [0.0, 1e20], "pred_index": [1, 0]},
         "p.parquet:row 2: field 'example_id'=1e+20; expected a non-negative integer of at most"),
        ({"example_id": [0, 99999], "pred_index": [1, 0]},
         "p.parquet:row 2: 1 prediction(s) name items that are not in BBQ (e.g. Age/99999)"),
    ]  # fmt: skip
    for columns, needle in cases:
        pd.DataFrame({"category": ["Age", "Age"], **columns}).to_parquet(pred)
        before = _snapshot(tmp_path)
        res = invoke(["metrics", pred, "--bbq-dir", mini_dir, "--allow-unverified",
                      "--json", tmp_path / "m.json"])  # fmt: skip
        assert needle in _one_error_line(res)
        assert _snapshot(tmp_path) == before


def test_not_in_bbq_names_the_line_after_a_permutation_is_picked(mini_dir, tmp_path):
    rows = [f"Age,{e},0,{p}" for e in (0, 1) for p in ("012", "120")] + ["Age,99999,0,012"]
    pred = tmp_path / "p.csv"
    pred.write_text("category,example_id,pred_index,permutation\n" + "\n".join(rows) + "\n")
    res = invoke(["metrics", pred, "--bbq-dir", mini_dir, "--allow-unverified"])
    assert "p.csv:6: 1 prediction(s) name items that are not in BBQ" in _one_error_line(res)


def test_unreadable_prediction_file_is_one_line_exit_1(mini_dir, tmp_path):
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    loop = tmp_path / "loop.csv"
    loop.symlink_to(loop)
    cases = [
        (folder, "folder.csv: is a folder; expected a prediction file"),
        (loop, "loop.csv: cannot read the prediction file (Too many levels of symbolic links)"),
        (tmp_path / "missing.csv", "missing.csv: prediction file not found"),
    ]
    for path, needle in cases:
        before = _snapshot(tmp_path)
        res = invoke(["compare", path, path, "--bbq-dir", mini_dir, "--allow-unverified",
                      "--json", tmp_path / "c.json"])  # fmt: skip
        assert needle in _one_error_line(res)
        assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_prediction_file_without_read_permission(mini_dir, tmp_path):
    pred = tmp_path / "p.csv"
    _mini_preds(mini_dir).to_csv(pred, index=False)
    pred.chmod(0o200)
    try:
        res = invoke(["metrics", pred, "--bbq-dir", mini_dir, "--allow-unverified"])
        line = _one_error_line(res)
    finally:
        pred.chmod(0o600)
    assert "p.csv: cannot read the prediction file (Permission denied)" in line


def _compare_args(mini_dir: Path, tmp_path: Path) -> list[object]:
    preds = _mini_preds(mini_dir)
    preds.to_csv(tmp_path / "base.csv", index=False)
    preds.assign(pred_index=(preds["pred_index"] + 1) % 3).to_csv(
        tmp_path / "aligned.csv", index=False
    )
    return ["compare", tmp_path / "base.csv", tmp_path / "aligned.csv", "--bbq-dir", mini_dir,
            "--allow-unverified", "--bootstrap", "0"]  # fmt: skip


@pytest.mark.parametrize(
    ("outputs", "needle"),
    [
        pytest.param(["--json", "ok.json", "--csv", "/proc/c.csv"],
                     "--csv /proc/c.csv: cannot write", id="proc"),
        pytest.param(["--json", "new/sub/c.json", "--csv", "/proc/x/c.csv"],
                     "--csv /proc/x/c.csv: cannot write", id="proc-after-new-folders"),
        pytest.param(["--json", "ok.json", "--csv", "file.txt/c.csv"],
                     "--csv file.txt/c.csv: file.txt is not a folder", id="beside-a-file"),
        pytest.param(["--json", "file.txt/deeper/x.json"],
                     "--json file.txt/deeper/x.json: file.txt is not a folder", id="under-a-file"),
        pytest.param(["--json", "ok.json", "--csv", "folder"],
                     "--csv folder: is a folder; expected a file path", id="onto-a-folder"),
        pytest.param(["--json", "ok.json", "--csv", "./ok.json"],
                     "--json and --csv both name ok.json", id="same-file"),
        # a FIFO of the test's own, not a device: a regression must not replace /dev/null
        pytest.param(["--json", "fifo"],
                     "--json fifo: exists and is not a regular file", id="fifo"),
    ],
)  # fmt: skip
def test_compare_writes_all_outputs_or_none(mini_dir, tmp_path, monkeypatch, outputs, needle):
    args = _compare_args(mini_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ok.json").write_bytes(b"old results\n")
    (tmp_path / "file.txt").write_bytes(b"a file\n")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    before = _snapshot(tmp_path)
    assert needle in _one_error_line(invoke([*args, *outputs]))
    assert _snapshot(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_compare_refuses_a_read_only_folder(mini_dir, tmp_path):
    args = _compare_args(mini_dir, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    before = _snapshot(tmp_path)
    locked.chmod(0o500)
    try:
        res = invoke([*args, "--json", tmp_path / "ok.json", "--csv", locked / "c.csv"])
        line = _one_error_line(res)
    finally:
        locked.chmod(0o700)
    assert "c.csv: cannot write (Permission denied)" in line
    assert _snapshot(tmp_path) == before


def test_metrics_refuses_an_unwritable_output_before_any_work(mini_dir, tmp_path):
    pred = tmp_path / "p.csv"
    _mini_preds(mini_dir).to_csv(pred, index=False)
    before = _snapshot(tmp_path)
    for target, needle in [
        ("/proc/m.json", "--json /proc/m.json: cannot write"),
        (tmp_path / "p.csv" / "m.json", "p.csv is not a folder"),
        (tmp_path, "is a folder; expected a file path"),
    ]:
        res = invoke(["metrics", pred, "--bbq-dir", mini_dir, "--allow-unverified",
                      "--json", target])  # fmt: skip
        assert needle in _one_error_line(res)
        assert _snapshot(tmp_path) == before


def test_compare_outputs_replace_existing_files_together(mini_dir, tmp_path):
    args = _compare_args(mini_dir, tmp_path)
    out_json, out_csv = tmp_path / "out" / "c.json", tmp_path / "out" / "c.csv"
    res = invoke([*args, "--json", out_json, "--csv", out_csv])
    assert res.exit_code == 0, res.output
    out_json.write_text("old")
    res = invoke([*args, "--json", out_json, "--csv", out_csv])
    assert res.exit_code == 0, res.output
    assert json.loads(out_json.read_text())["strata"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["c.csv", "c.json"]


def test_unverified_warning_is_in_every_output(mini_dir, tmp_path):
    args = _compare_args(mini_dir, tmp_path)
    out_json, out_csv, out_metrics = tmp_path / "c.json", tmp_path / "c.csv", tmp_path / "m.json"
    res = invoke([*args, "--json", out_json, "--csv", out_csv])
    assert res.exit_code == 0, res.output
    res = invoke(["metrics", tmp_path / "base.csv", "--bbq-dir", mini_dir, "--allow-unverified",
                  "--json", out_metrics])  # fmt: skip
    assert res.exit_code == 0, res.output
    comparison = json.loads(out_json.read_text())
    (unverified,) = [w for w in comparison["warnings"] if w.startswith("UNVERIFIED BBQ data")]
    metrics = json.loads(out_metrics.read_text())
    assert unverified in metrics["warnings"]
    assert metrics["strata"][-1]["level"] == "overall"
    table = pd.read_csv(out_csv)
    assert table.columns[-1] == "warnings" and len(table) == len(comparison["strata"])
    assert (table["warnings"] == " | ".join(comparison["warnings"])).all()
    assert unverified in table["warnings"].iloc[0]
    # exactly what the run writes as stats/comparison.csv (Comparison.to_csv)
    assert out_csv.read_text() == Comparison.from_json(comparison).to_csv()


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_target_loc_warning_prints_once_per_file(mini_dir, tmp_path, verbose):
    args = _compare_args(mini_dir, tmp_path)
    for name in ("base.csv", "aligned.csv"):
        df = pd.read_csv(tmp_path / name)
        df.assign(target_loc=(df["example_id"] % 2) * 2).to_csv(tmp_path / name, index=False)
    res = invoke([*verbose, *args])
    assert res.exit_code == 0, res.output
    assert res.stderr.count("'target_loc'") == 2, res.stderr
    assert res.stderr.count("base.csv: ") == 1 and res.stderr.count("aligned.csv: ") == 1


def test_bootstrap_size_is_bounded_before_any_work(mini_dir, tmp_path):
    args = _compare_args(mini_dir, tmp_path)
    before = _snapshot(tmp_path)
    res = invoke([*args, "--bootstrap", "100000000", "--json", tmp_path / "c.json"])
    line = _one_error_line(res)
    assert "--bootstrap=100000000; expected 0 (off) or at least 100 and at most 100,000" in line
    assert _snapshot(tmp_path) == before
    from spillover.stats.config import MAX_BOOTSTRAP

    assert CompareConfig(bootstrap=MAX_BOOTSTRAP).bootstrap == MAX_BOOTSTRAP
    with pytest.raises(ConfigError, match=r"`bootstrap`=100001; expected 0 \(off\)"):
        CompareConfig(bootstrap=MAX_BOOTSTRAP + 1)


def test_outputs_failing_midway_leave_nothing(tmp_path):
    """A real write failure on the second output (the file-size limit, EFBIG) after the first
    was staged: both staged files and the folders made for them go, the old file stays."""
    import resource
    import signal

    from spillover.cli._outputs import Output, write_outputs

    (tmp_path / "a.json").write_text("old\n")
    before = _snapshot(tmp_path)
    outputs = [
        Output("--json", tmp_path / "a.json", "{}\n"),
        Output("--csv", tmp_path / "new" / "deeper" / "b.csv", "x" * 100_000),
    ]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
    try:
        with pytest.raises(ConfigError, match=r"^--csv .*b\.csv: cannot write \(File too large\)"):
            write_outputs(outputs)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert _snapshot(tmp_path) == before
    write_outputs(outputs)
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert len((tmp_path / "new" / "deeper" / "b.csv").read_text()) == 100_000


def test_crlf_jsonl_and_bom_csv_still_read(mini_dir, tmp_path):
    preds = _mini_preds(mini_dir)
    lines = [json.dumps(r) for r in preds.to_dict(orient="records")]
    (tmp_path / "p.jsonl").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbf" + preds.to_csv(index=False).encode())
    outputs = []
    for name in ("p.jsonl", "p.csv"):
        out = tmp_path / f"{name}.json"
        res = invoke(["metrics", tmp_path / name, "--bbq-dir", mini_dir, "--allow-unverified",
                      "--json", out])  # fmt: skip
        assert res.exit_code == 0, res.output
        outputs.append(json.loads(out.read_text())["strata"])
    assert outputs[0] == outputs[1] and outputs[0][-1]["accuracy"] == 1.0


def test_compare_reads_category_aliases_in_files(mini_dir: Path, tmp_path: Path) -> None:
    """A file spelling categories as aliases (``gender``, ``race-x-ses``, ``SES``) compares
    exactly as one spelling them as BBQ does."""
    base = _mini_preds(mini_dir)
    aligned = base.assign(pred_index=(base["pred_index"] + base["example_id"] % 3 // 2) % 3)
    friendly = {"Gender_identity": "gender", "Race_x_SES": "race-x-ses", "SES": "ses"}
    common = ["--bbq-dir", mini_dir, "--allow-unverified", "--bootstrap", "100"]
    outs = []
    for name, rename in (("bbq", {}), ("alias", friendly)):
        paths = []
        for side, df in (("base", base), ("aligned", aligned)):
            path = tmp_path / f"{name}_{side}.csv"
            df.assign(category=df["category"].replace(rename)).to_csv(path, index=False)
            paths.append(path)
        out = tmp_path / f"{name}.json"
        res = invoke(["compare", *paths, *common, "--json", out])
        assert res.exit_code == 0, res.output
        outs.append(json.loads(out.read_text()))
    assert "gender" in (tmp_path / "alias_base.csv").read_text()
    assert outs[0]["strata"] == outs[1]["strata"]
    assert any(r["b"] + r["c"] > 0 for r in outs[0]["strata"])


def test_length_norm_is_refused_on_plain_prediction_files(mini_dir: Path, tmp_path: Path) -> None:
    pred = tmp_path / "p.csv"
    _mini_preds(mini_dir).to_csv(pred, index=False)
    res = invoke(["compare", pred, pred, "--bbq-dir", mini_dir, "--allow-unverified",
                  "--length-norm", "char", "--json", tmp_path / "c.json"])  # fmt: skip
    assert "`--length-norm`='char' applies to lm-evaluation-harness logs" in _one_error_line(res)
    assert not (tmp_path / "c.json").exists()
