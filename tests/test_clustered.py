"""Scenario-clustered inference: the sign-flip test, its score interval, power, heterogeneity,
and the flags built on them. References: brute-force enumeration, statsmodels / scipy,
hand-solved equations, and a fast version of bench/clustered_inference.py."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from spillover.data import CATEGORIES
from spillover.stats import compare_runs
from spillover.stats.clustered import (
    cluster_totals,
    heterogeneity_test,
    minimum_detectable_change,
    signflip_distribution,
    signflip_interval,
    signflip_test,
    signflip_test_real,
)
from spillover.stats.tests import mcnemar_test, paired_difference_ci

BENCH = Path(__file__).resolve().parents[1] / "bench" / "clustered_inference.py"


# --------------------------------------------------------------------------- the test


def _brute_force(d: np.ndarray, midp: bool) -> float:
    observed = abs(d.sum())
    beyond = at = 0
    for signs in itertools.product((-1, 1), repeat=d.size):
        t = abs(int(np.dot(signs, d)))
        beyond += t > observed
        at += t == observed
    return (beyond + (0.5 * at if midp else at)) / 2**d.size


@pytest.mark.parametrize("seed", range(12))
def test_signflip_equals_enumeration_of_all_sign_patterns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = rng.integers(-6, 7, size=int(rng.integers(1, 13)))
    for midp in (True, False):
        got = signflip_test(d, midp=midp).pvalue
        assert got == pytest.approx(min(1.0, _brute_force(d, midp)), abs=1e-12)


def test_one_item_per_cluster_is_mcnemar() -> None:
    """With |d_s| = 1 everywhere the sign-flip test is the exact / mid-p McNemar test."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        b, c = (int(x) for x in rng.integers(0, 40, size=2))
        d = np.array([-1] * b + [1] * c)
        plain = signflip_test(d, midp=False).pvalue
        ref = mcnemar([[0, b], [c, 0]], exact=True).pvalue if b + c else 1.0
        assert plain == pytest.approx(ref, abs=1e-12)
        assert signflip_test(d).pvalue == pytest.approx(
            mcnemar_test(b, c, "midp").pvalue, abs=1e-12
        )


def test_distribution_is_a_pmf_and_few_clusters_are_said() -> None:
    pmf = signflip_distribution([3, 1, 2])
    assert pmf.sum() == pytest.approx(1.0) and pmf.size == 7 and pmf[0] == pmf[-1] == 1 / 8
    few = signflip_test([4, 3, 2])
    assert few.min_pvalue == pytest.approx(2**-3) and "smallest attainable" in few.note
    assert few.pvalue == pytest.approx(2**-3)  # the most extreme of 8 patterns, mid-p
    assert signflip_test([0, 0]).pvalue == 1.0


def _brute_force_real(r: np.ndarray) -> float:
    """Mid-p sign-flip p-value of real totals by listing all 2^K sign patterns."""
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=r.size)))
    stats = np.abs(signs @ r)
    observed, tol = abs(r.sum()), 1e-9 * np.abs(r).sum()
    beyond = np.count_nonzero(stats > observed + tol)
    at = np.count_nonzero(np.abs(stats - observed) <= tol)
    return float((beyond + 0.5 * at) / signs.shape[0])


@pytest.mark.parametrize("seed", range(8))
def test_real_signflip_equals_enumeration(seed: int) -> None:
    """Real-valued totals (gap changes): exact up to 16 informative clusters, and on the
    lattice above within the rounding it allows; zeros never move the test."""
    rng = np.random.default_rng(seed)
    r = rng.normal(0.3, 1.0, size=int(rng.integers(2, 15)))
    got = signflip_test_real(np.r_[r, 0.0, 0.0])
    assert got.pvalue == pytest.approx(_brute_force_real(r), abs=1e-12)
    assert got.n_clusters == r.size + 2 and got.n_informative == r.size
    big = rng.normal(0.2, 1.0, size=18)
    assert signflip_test_real(big).pvalue == pytest.approx(_brute_force_real(big), abs=2e-3)


def test_real_signflip_on_integers_is_the_integer_test() -> None:
    """Integer totals: the real-valued test is the discordance test, value for value
    (ties counted by half in both)."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        d = rng.integers(-4, 5, size=int(rng.integers(1, 14)))
        assert signflip_test_real(d.astype(float)).pvalue == pytest.approx(
            signflip_test(d).pvalue, abs=1e-12
        )
    none = signflip_test_real([0.0, 0.0])
    assert none.pvalue == 1.0 and none.note == "no change at all"
    few = signflip_test_real([0.5, 1.5, -0.2], unit="writer")
    assert "only 3 writer(s)" in few.note and few.min_pvalue == pytest.approx(2**-3)


def test_interval_of_a_real_valued_change_and_its_unit() -> None:
    """A change of log-likelihood gaps: limits beyond 1, inside ``bound``, excluding 0 when
    the real-valued test rejects; notes name the clusters."""
    rng = np.random.default_rng(5)
    n = rng.integers(3, 20, size=25)
    totals = n * 2.5 + rng.normal(0, 4, size=25) * np.sqrt(n)
    ci = signflip_interval(totals, n, tolerance=1e-3, bound=40.0, grid=20_000, unit="writer")
    assert ci.low < totals.sum() / n.sum() < ci.high and ci.low > 1.0 and ci.high < 40
    assert signflip_test_real(totals).pvalue < 0.05
    # the test of the totals shifted to a limit sits at 5 %
    for end in (ci.low, ci.high):
        assert signflip_test_real(totals - end * n).pvalue == pytest.approx(0.05, abs=0.01)
    one = signflip_interval([3.0], [4], bound=7.0, unit="target term")
    assert (one.low, one.high, one.note) == (-7.0, 7.0, "fewer than 2 target terms")


# --------------------------------------------------------------------------- the interval


def test_interval_inverts_the_test() -> None:
    """0 lies outside the interval exactly when the sign-flip test rejects at 5 %, the
    limits are where the test of the shifted totals crosses 5 %, and the estimate is in."""
    rng = np.random.default_rng(4)
    agree = 0
    for _ in range(60):
        k = int(rng.integers(6, 30))
        n = rng.integers(1, 40, size=k)
        shift = rng.uniform(-0.4, 0.4)
        d = np.array([int(rng.integers(-m // 3, m // 3 + 1) + round(shift * m)) for m in n])
        d = np.clip(d, -n, n)
        ci = signflip_interval(d, n)
        est = d.sum() / n.sum()
        assert ci.low <= est <= ci.high and ci.method == "cluster-signflip"
        p0 = signflip_test(d).pvalue
        if abs(p0 - 0.05) > 0.005:  # away from the lattice-rounding band
            agree += (ci.low <= 0 <= ci.high) == (p0 > 0.05)
        for end, step in ((ci.low, 2e-3), (ci.high, -2e-3)):
            if -1 < end < 1:  # just inside the limit the shifted totals are not rejected
                assert signflip_test(np.rint(1000 * (d - (end + step) * n))).pvalue > 0.04
    assert agree >= 55


def test_interval_at_the_bound_keeps_newcombe() -> None:
    # every item flipped to right: the sign-flip set is the point 1; the hull with the
    # item-level interval keeps Newcombe's width
    d, n = np.full(15, 1), np.ones(15, dtype=int)
    alone = signflip_interval(d, n)
    assert alone.high == 1.0 and alone.low > 0.99
    item = paired_difference_ci(0, 15, 0, 0)
    hull = signflip_interval(d, n, item_interval=item)
    assert (hull.low, hull.high) == (item[0], 1.0) and item[0] < 0.85
    wide = signflip_interval([1, -1, 1], [2, 2, 2])
    assert (wide.low, wide.high) == (-1.0, 1.0) and wide.note


def test_totals_and_power_behave() -> None:
    d, n = cluster_totals([1, -1, 0, 1, 1], [3, 3, 1, 1, 2])
    assert d.tolist() == [1, 1, 0] and n.tolist() == [2, 1, 2]
    rng = np.random.default_rng(1)
    small = rng.integers(-2, 3, size=25), np.full(25, 8)
    large = rng.integers(-8, 9, size=25), np.full(25, 32)
    assert minimum_detectable_change(*large) < minimum_detectable_change(*small)
    assert minimum_detectable_change([1, -1], [3, 3], alpha=0.001) == math.inf
    # a loss cannot exceed the accuracy it removes: bounded, or undetectable
    bounded = minimum_detectable_change(*large, flippable=0.9)
    assert 0 < bounded <= 0.9
    assert minimum_detectable_change(*small, alpha=0.05 / 22, flippable=0.05) == math.inf


def test_heterogeneity_separates_equal_from_different_changes() -> None:
    rng = np.random.default_rng(2)
    n = np.full((30, 4), 20)
    same = rng.integers(-3, 4, size=(30, 4))
    differ = same.copy()
    differ[:, 0] -= 8
    assert heterogeneity_test(same, n).pvalue > 0.05
    assert heterogeneity_test(differ, n).pvalue < 0.01


# --------------------------------------------------------------------------- flags


def _items(per_cell: int = 120, scenarios: int = 20) -> pd.DataFrame:
    rows = []
    for cat in CATEGORIES:
        eid = 0
        for ctx in ("ambig", "disambig"):
            for k in range(per_cell):
                rows.append(
                    {
                        "category": cat,
                        "example_id": eid,
                        "question_index": k % scenarios,
                        "scenario": k % scenarios,
                        "context_condition": ctx,
                        "question_polarity": "neg",
                        "label_type": "label",
                        "label": 2 if ctx == "ambig" else 0,
                        "target_loc": 1,
                        "unknown_loc": 2,
                    }
                )
                eid += 1
    df = pd.DataFrame(rows)
    df["target_loc"] = df["target_loc"].astype("Int64")
    return df


def _row(result, category: str = "all", context: str = "all") -> dict:
    return next(
        r
        for r in result.records()
        if r["category"] == category and r["context_condition"] == context
    )


def test_item_level_only_finding_does_not_make_a_masking_flag() -> None:
    """Two scenarios of Age/ambig collapse: the item-level test calls it (after Holm), the
    clustered test does not, and the aggregate (barely moving) is not flagged as masking."""
    items = _items()
    base = items.assign(pred_index=items["label"])
    al = base["pred_index"].copy()
    age_amb = (items["category"] == "Age") & (items["context_condition"] == "ambig")
    al[age_amb & items["scenario"].isin([0, 1])] = 1  # 12 items in two scenarios
    rng = np.random.default_rng(0)
    flip = (~age_amb) & (rng.random(len(items)) < 0.004)
    al[flip] = 1
    aligned = items.assign(pred_index=al)
    result = compare_runs(base, aligned)
    age = _row(result, "Age", "ambig")
    assert age["significant_item"] and not age["significant_clustered"]
    assert "item_level_only" in age["flags"] and age["n_informative_clusters"] == 2
    assert "significant_degradation" not in age["flags"]
    assert [f for f in result.flags if f.kind == "masking"] == []


def test_masking_fires_on_a_significant_loss_under_a_flat_aggregate_and_says_so() -> None:
    items = _items()
    base = items.assign(pred_index=items["label"])
    al = base["pred_index"].copy()
    age_amb = (items["category"] == "Age") & (items["context_condition"] == "ambig")
    al[age_amb & (items["example_id"] % 2 == 0)] = 1  # every scenario loses half its items
    age_dis = (items["category"] == "Age") & (items["context_condition"] == "disambig")
    base_pred = base["pred_index"].copy()
    base_pred[age_dis & (items["example_id"] % 2 == 0)] = 2  # base wrong, aligned right
    result = compare_runs(items.assign(pred_index=base_pred), items.assign(pred_index=al))
    age = _row(result, "Age", "ambig")
    assert "significant_degradation" in age["flags"] and age["significant_clustered"]
    masking = [f for f in result.flags if f.kind == "masking"]
    agg = {(f.aggregate["category"], f.aggregate["context_condition"]) for f in masking}
    assert ("Age", "all") in agg
    flag = next(f for f in masking if f.aggregate["category"] == "Age")
    assert "does not fall significantly" in flag.message and "rises" not in flag.message


def test_no_masking_over_an_accuracy_aggregate_that_falls_significantly() -> None:
    items = _items()
    base = items.assign(pred_index=items["label"])
    al = base["pred_index"].copy()
    al[(items["category"] == "Age") & (items["example_id"] % 2 == 0)] = 1
    result = compare_runs(base, items.assign(pred_index=al))
    age_all = _row(result, "Age", "all")
    assert "significant_degradation" in age_all["flags"]
    assert not any(f.kind == "masking" and f.aggregate["category"] == "Age" for f in result.flags)
    # a paired accuracy aggregate is a weighted average of its strata: never a reversal
    assert all(f.metric != "accuracy" or f.kind != "reversal" for f in result.flags)


def test_over_abstention_in_disambiguated_contexts_only() -> None:
    items = _items()
    base = items.assign(pred_index=items["label"])
    al = base["pred_index"].copy()
    dis = items["context_condition"] == "disambig"
    al[dis & (items["example_id"] % 3 == 0)] = 2  # disambiguated: unknown instead of right
    result = compare_runs(base, items.assign(pred_index=al))
    kinds = {
        (f.kind, f.aggregate["category"], f.aggregate["context_condition"]) for f in result.flags
    }
    assert ("over_abstention", "all", "disambig") in kinds
    assert not any(k == "over_abstention" and ctx == "ambig" for k, _, ctx in kinds)
    row = _row(result, "all", "disambig")
    assert row["delta_unknown_rate"] > 0.3 and row["significant_unknown"]
    # a rise of "unknown" in ambiguous contexts is what alignment should do: no flag
    ambig = items["context_condition"] == "ambig"
    base2 = items.assign(pred_index=np.where(ambig, 1, items["label"]))
    result2 = compare_runs(base2, items.assign(pred_index=items["label"]))
    assert [f for f in result2.flags if f.kind == "over_abstention"] == []


def test_low_support_bias_score_is_marked() -> None:
    items = _items()
    base = items.assign(pred_index=np.where(items["context_condition"] == "ambig", 1, 0))
    al = base["pred_index"].copy()
    age_amb = (items["category"] == "Age") & (items["context_condition"] == "ambig")
    al[age_amb] = 2
    al[age_amb & (items["example_id"] < 3)] = 1  # three non-unknown answers left
    result = compare_runs(base, items.assign(pred_index=al))
    age = _row(result, "Age", "ambig")
    assert age["bias_low_support"] and "low_support" in age["flags"]
    assert "low support" in age["note"]


# --------------------------------------------------------------------------- simulation


def _bench():
    spec = importlib.util.spec_from_file_location("clustered_inference", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.fulldata
def test_clustered_test_holds_its_level_on_bbq_keys(full_bbq_dir: Path) -> None:
    """Fast version of bench/clustered_inference.py: zero true change, answers clustered by
    scenario on the real BBQ keys. The item-level test over-rejects; the default does not."""
    bench = _bench()
    keys = bench.load_keys(str(full_bbq_dir))
    acc = bench.targets()
    sigmas = bench.CLUSTERING["strong"]
    mu = bench.calibrate(acc, *sigmas)
    rng = np.random.default_rng(7)
    res = np.empty((8, 22, 7))
    for r in range(8):
        idx = bench.sample(keys, "full", rng)
        base, aligned = bench.generate(keys, idx, mu, sigmas, rng)
        for j in range(22):
            m = keys.cell[idx] == j
            res[r, j] = bench.analyse_cell(base[m], aligned[m], keys.scenario[idx][m])
    item = (res[..., 0] <= 0.05).mean()
    clustered = (res[..., 1] <= 0.05).mean()
    coverage = ((res[..., 4] <= 0) & (res[..., 5] >= 0)).mean()
    assert item > 0.15  # the problem: item-level McNemar calls noise significant
    assert clustered <= 0.10  # 176 tests: 5 % nominal, binomial spread
    assert coverage >= 0.90
