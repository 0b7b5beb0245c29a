"""Do the comparison's tests and intervals hold their error rates on BBQ's real structure?

Simulates a base and an aligned model on the real BBQ keys (categories, contexts and the
scenario of every item, from the verified BBQ files) with answers that cluster by
scenario, and applies the statistics stage's own functions to every category x context
cell: the item-level mid-p McNemar test and Newcombe interval (the paper's analysis)
against the default scenario-clustered sign-flip mid-p test and its interval (the
inverted test, hulled with Newcombe's).

Usage (run alone on the machine; prints the load average)::

    python bench/clustered_inference.py --bbq-dir DIR --design full --reps 400
    python bench/clustered_inference.py --bbq-dir DIR --design n100 --reps 1000
    python bench/clustered_inference.py --bbq-dir DIR --design n100 --reps 400 --plant 20

Generator (per repetition): item ``i`` of scenario ``s`` in cell ``j`` has
``eta_i = mu_j + u_{s,ctx} + e_i`` with a scenario effect ``u ~ N(0, sigma_u)`` (the two
contexts of a scenario correlated 0.5) and an item effect ``e_i ~ N(0, 1)`` shared by both
runs. With probability 0.7 a pair is concordant (one draw for both runs); otherwise base
and aligned answer independently with ``expit(eta_i -+ v_s / 2)``, ``v ~ N(0, sigma_v)``
per scenario: scenarios move in opposite directions, their mean change is 0, and the
true change of every cell is zero. ``mu_j`` is calibrated so the cell's expected accuracy
is its target. ``--plant P`` flips each correct aligned answer of one cell (``--cell``, default 0 =
Age / ambig) to wrong with probability ``P / accuracy``: a uniform degradation of P points.
``--mdc`` prints that cell's reported minimum detectable loss, to set beside the
simulated power of ``--plant`` at that size.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

CLUSTERING = {
    "none": (0.0, 0.0),
    "moderate": (0.5, 0.5),
    "strong": (1.0, 1.0),
    "severe": (1.0, 2.0),
}
"""Scenario effects ``(sigma_u, sigma_v)`` on the logit scale."""
RHO = 0.7
CTX_CORR = 0.5


@dataclass(frozen=True)
class Keys:
    """Real BBQ keys: cell (2 x category + context), context and global scenario per item."""

    cell: np.ndarray
    ctx: np.ndarray
    scenario: np.ndarray
    n_scenarios: int


def load_keys(bbq_dir: str | None) -> Keys:
    from spillover.data import CATEGORIES, load_bbq

    data = load_bbq(bbq_dir)
    cats = {c: i for i, c in enumerate(CATEGORIES)}
    cell = np.array(
        [2 * cats[it.category] + (it.context_condition == "disambig") for it in data.items]
    )
    ctx = cell % 2
    keys = [(it.category, it.scenario) for it in data.items]
    index: dict[tuple[str, int | None], int] = {}
    scenario = np.array([index.setdefault(k, len(index)) for k in keys])
    return Keys(cell, ctx, scenario, len(index))


def name_of(cell: int) -> str:
    """``Age/ambig`` for cell 0 (cells are 2 x category index + 1 for disambiguated)."""
    from spillover.data import CATEGORIES

    return f"{CATEGORIES[cell // 2]}/{('ambig', 'disambig')[cell % 2]}"


def targets() -> np.ndarray:
    """Expected base accuracy per cell (fixed, seed 12345)."""
    rng = np.random.default_rng(12345)
    a = np.empty(22)
    a[0::2] = rng.uniform(0.35, 0.70, 11)
    a[1::2] = rng.uniform(0.70, 0.93, 11)
    return a


def calibrate(acc: np.ndarray, sigma_u: float, sigma_v: float) -> np.ndarray:
    """``mu_j`` with expected accuracy ``acc_j`` (Gauss-Hermite quadrature)."""
    from numpy.polynomial.hermite_e import hermegauss
    from scipy.optimize import brentq
    from scipy.special import expit

    x, w = hermegauss(80)
    w = w / w.sum()
    shared = math.hypot(sigma_u, 1.0)
    indep = math.sqrt(shared**2 + sigma_v**2 / 4)

    def mean(m: float, s: float) -> float:
        return float(np.dot(w, expit(m + s * x)))

    return np.array(
        [
            brentq(lambda m, a=a: RHO * mean(m, shared) + (1 - RHO) * mean(m, indep) - a, -20, 20)
            for a in acc
        ]
    )


def sample(keys: Keys, design: str, rng: np.random.Generator) -> np.ndarray:
    if design == "full":
        return np.arange(keys.cell.size)
    per = {"n100": 100, "n24": 24}[design]
    return np.concatenate(
        [rng.choice(np.flatnonzero(keys.cell == j), per, replace=False) for j in range(22)]
    )


def generate(
    keys: Keys,
    idx: np.ndarray,
    mu: np.ndarray,
    sigmas: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    from scipy.special import expit

    def effect(sigma: float) -> np.ndarray:
        shared = rng.standard_normal((keys.n_scenarios, 1))
        own = rng.standard_normal((keys.n_scenarios, 2))
        return sigma * (math.sqrt(CTX_CORR) * shared + math.sqrt(1 - CTX_CORR) * own)

    u, v = effect(sigmas[0]), effect(sigmas[1])
    s, c = keys.scenario[idx], keys.ctx[idx]
    eta = mu[keys.cell[idx]] + u[s, c] + rng.standard_normal(idx.size)
    shared = rng.random(idx.size) < expit(eta)
    base = rng.random(idx.size) < expit(eta - v[s, c] / 2)
    aligned = rng.random(idx.size) < expit(eta + v[s, c] / 2)
    copy = rng.random(idx.size) < RHO
    return np.where(copy, shared, base).astype(int), np.where(copy, shared, aligned).astype(int)


def analyse_cell(base: np.ndarray, aligned: np.ndarray, scen: np.ndarray) -> tuple[float, ...]:
    """(item p, clustered p, Newcombe low/high, score low/high, delta) of one cell."""
    from spillover.stats.clustered import cluster_totals, signflip_interval, signflip_test
    from spillover.stats.tests import mcnemar_test, paired_difference_ci

    b = int(((base == 1) & (aligned == 0)).sum())
    c = int(((base == 0) & (aligned == 1)).sum())
    both = int(((base == 1) & (aligned == 1)).sum())
    neither = base.size - b - c - both
    d, n = cluster_totals(aligned - base, scen)
    lo, hi = paired_difference_ci(both, c, b, neither)
    ci = signflip_interval(d, n, item_interval=(lo, hi))
    return (
        mcnemar_test(b, c, "midp").pvalue,
        signflip_test(d).pvalue,
        lo,
        hi,
        ci.low,
        ci.high,
        (c - b) / base.size,
    )


def holm(p: np.ndarray, alpha: float) -> np.ndarray:
    order = np.argsort(p)
    reject = np.zeros(p.size, dtype=bool)
    for rank, i in enumerate(order):
        if p[i] > alpha / (p.size - rank):
            break
        reject[i] = True
    return reject


def run(args: argparse.Namespace) -> None:
    from spillover.stats.clustered import cluster_totals, minimum_detectable_change

    keys = load_keys(args.bbq_dir)
    acc = targets()
    print(f"design {args.design}, {args.reps} repetitions x 22 cells, seed {args.seed}")
    for name in args.clustering:
        sigmas = CLUSTERING[name]
        mu = calibrate(acc, *sigmas)
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        res = np.empty((args.reps, 22, 7))
        planted = 0
        mdc: list[float] = []
        for r in range(args.reps):
            idx = sample(keys, args.design, rng)
            base, aligned = generate(keys, idx, mu, sigmas, rng)
            cell = keys.cell[idx]
            if args.plant:
                hit = (
                    (cell == args.cell)
                    & (aligned == 1)
                    & (rng.random(idx.size) < args.plant / 100 / acc[args.cell])
                )
                aligned = np.where(hit, 0, aligned)
            for j in range(22):
                m = cell == j
                res[r, j] = analyse_cell(base[m], aligned[m], keys.scenario[idx][m])
            if args.plant:
                planted += bool(holm(res[r, :, 1], 0.05)[args.cell] and res[r, args.cell, 6] < 0)
            if args.mdc:
                m = cell == args.cell
                d, n = cluster_totals(aligned[m] - base[m], keys.scenario[idx][m])
                mdc.append(
                    minimum_detectable_change(
                        d, n, alpha=0.05 / 22, flippable=float(aligned[m].mean())
                    )
                )
        seconds = time.perf_counter() - start
        truth = np.zeros(22)
        truth[args.cell] = -args.plant / 100 if args.plant else 0.0
        item_rej = (res[..., 0] <= 0.05).mean(axis=0)
        clus_rej = (res[..., 1] <= 0.05).mean(axis=0)
        newc = ((res[..., 2] <= truth) & (truth <= res[..., 3])).mean(axis=0)
        score = ((res[..., 4] <= truth) & (truth <= res[..., 5])).mean(axis=0)
        null = np.arange(22) != args.cell if args.plant else np.ones(22, dtype=bool)
        print(
            f"  {name:8s} sigma_u={sigmas[0]} sigma_v={sigmas[1]}: "
            f"p<=0.05 item-level {100 * item_rej[null].mean():5.1f}% (worst {100 * item_rej[null].max():5.1f}%), "
            f"clustered {100 * clus_rej[null].mean():5.1f}% (worst {100 * clus_rej[null].max():5.1f}%); "
            f"95% coverage Newcombe {100 * newc.mean():5.1f}% (worst {100 * newc.min():5.1f}%), "
            f"default {100 * score.mean():5.1f}% (worst {100 * score.min():5.1f}%); {seconds:.0f} s"
        )
        if args.plant:
            print(
                f"    planted -{args.plant} points in {name_of(args.cell)} (expected accuracy "
                f"{100 * acc[args.cell]:.0f}%): significant after Holm over 22 cells (clustered "
                f"test) in {100 * planted / args.reps:.1f}% of repetitions; unplanted cells "
                f"significant (raw) {100 * clus_rej[null].mean():.1f}%"
            )
        if mdc:
            none = float(np.mean(~np.isfinite(mdc)))
            print(
                f"    reported minimum detectable loss of {name_of(args.cell)} at 80% power, "
                f"alpha 0.05/22: median {100 * float(np.median(mdc)):.1f} points"
                f" (none detectable in {100 * none:.0f}% of repetitions)"
            )
    print(f"load average {os.getloadavg()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bbq-dir", default=None)
    parser.add_argument("--design", choices=("full", "n100", "n24"), default="n100")
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=20261)
    parser.add_argument("--plant", type=float, default=0.0, help="points of planted degradation")
    parser.add_argument("--mdc", action="store_true", help="report the cell's detectable change")
    parser.add_argument(
        "--cell", type=int, default=0, help="cell of --plant and --mdc: 2 x category + (disambig)"
    )
    parser.add_argument(
        "--clustering", nargs="+", default=list(CLUSTERING), choices=list(CLUSTERING)
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
