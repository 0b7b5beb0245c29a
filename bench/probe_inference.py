"""Do the probe comparison's tests hold their level on each benchmark's real cluster structure?

Reads the cluster of every item of CrowS-Pairs (the anonymised writer), StereoSet dev
intrasentence (the target term), WinoBias (the referent occupation, all 8 files) and
Winogender (the occupation) from the benchmark files themselves (plain csv / json, the
fields needed only), and simulates a base and an aligned model on them with answers that
cluster and **no true change**. Each of the 18 fine strata of ``compare_probes`` (9
CrowS-Pairs attributes, 4 StereoSet domains, 2 WinoBias types, 3 Winogender genders) gets
the statistics stage's own functions: the item-level mid-p McNemar test and Newcombe
interval, the clustered sign-flip mid-p test and its interval (the default), and for the
continuous gap the clustered real-valued sign-flip test against Wilcoxon's signed-rank
test. ``--power`` plants a true change in every stratum and reports how often the
clustered test finds it, raw and after Holm over the 18 strata, beside the reported
minimum detectable change.

Usage (prints the CPU and the load average; seeds fixed)::

    python bench/probe_inference.py --data-dir DIR --reps 400
    python bench/probe_inference.py --data-dir DIR --reps 200 --power 5 10 20 --clustering moderate

Generator (per repetition): item ``i`` of cluster ``s`` in stratum ``j`` has ``eta_i = mu_j
+ u_s + e_i`` with a cluster effect ``u ~ N(0, sigma_u)`` (shared by the cluster's items in
every stratum) and an item effect ``e_i ~ N(0, 1)`` shared by both runs; with probability
0.7 a pair is concordant, else base and aligned answer independently with ``expit(eta_i -+
v_s / 2)``, ``v ~ N(0, sigma_v)`` per cluster (``bench/clustered_inference.py``'s
generator, calibrated the same way). The gap's paired change is ``w_s + eps_i`` with ``w ~
N(0, sigma_v)`` per cluster and ``eps ~ N(0, 1)``: zero mean, symmetric. Expected outcome
rates per stratum are fixed draws from [0.5, 0.8] (seed 12345).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from clustered_inference import CLUSTERING, RHO, calibrate, holm  # noqa: E402

ARTICLES = re.compile(r"^(?:(?:the|a|an)\s+)+", re.IGNORECASE)


@dataclass(frozen=True)
class Structure:
    """Every item's stratum and cluster, for one benchmark or several."""

    names: list[str]
    """Stratum names (``benchmark/stratum``)."""
    stratum: np.ndarray
    """Stratum index per item."""
    cluster: np.ndarray
    """Global cluster index per item (a cluster spans strata where it does)."""

    @property
    def n_clusters(self) -> int:
        return int(self.cluster.max()) + 1


def _index(values: list[str]) -> np.ndarray:
    seen: dict[str, int] = {}
    return np.array([seen.setdefault(v, len(seen)) for v in values], dtype=np.int64)


def crows(root: Path) -> list[tuple[str, str]]:
    """``(bias_type, writer)`` of the 1,508 pairs."""
    with (root / "crows-pairs" / "crows_pairs_anonymized.csv").open(encoding="utf-8") as fh:
        return [(r["bias_type"], r["anon_writer"]) for r in csv.DictReader(fh)]


def stereoset(root: Path, split: str) -> list[tuple[str, str]]:
    """``(domain, target)`` of the intrasentence items of a split."""
    data = json.loads((root / "stereoset" / f"{split}.json").read_text(encoding="utf-8"))
    return [(it["bias_type"], it["target"]) for it in data["data"]["intrasentence"]]


def winobias(root: Path) -> list[tuple[str, str]]:
    """``(type, referent occupation)`` of the 3,168 sentences: the first bracketed span,
    articles dropped."""
    out = []
    for path in sorted((root / "winobias").glob("*_stereotyped_type*.txt.*")):
        kind = "type1" if "type1" in path.name else "type2"
        for line in path.read_text(encoding="utf-8").splitlines():
            span = re.search(r"\[([^\]]*)\]", line)
            if span:
                out.append((kind, ARTICLES.sub("", span.group(1).strip()).lower()))
    return out


def winogender(root: Path) -> list[tuple[str, str]]:
    """``(gender, occupation)`` of the 720 sentences, from their ``sentid``."""
    with (root / "winogender" / "all_sentences.tsv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    return [(r["sentid"].split(".")[3], r["sentid"].split(".")[0]) for r in rows]


def load(root: Path, split: str) -> dict[str, Structure]:
    """The four benchmarks' structures."""
    raw = {
        "crows-pairs": crows(root),
        "stereoset": stereoset(root, split),
        "winobias": winobias(root),
        "winogender": winogender(root),
    }
    out = {}
    for bench, pairs in raw.items():
        strata = [s for s, _ in pairs]
        names = sorted(set(strata))
        out[bench] = Structure(
            [f"{bench}/{n}" for n in names],
            np.array([names.index(s) for s in strata]),
            _index([c for _, c in pairs]),
        )
    return out


def describe(structures: dict[str, Structure]) -> None:
    for bench, st in structures.items():
        sizes = np.bincount(st.cluster)
        parts = []
        for j, name in enumerate(st.names):
            m = st.stratum == j
            k = len(set(st.cluster[m].tolist()))
            big = np.bincount(st.cluster[m]).max()
            parts.append(f"{name.split('/')[1]} {int(m.sum())}/{k} (largest {big})")
        print(
            f"  {bench}: {st.cluster.size} items, {st.n_clusters} clusters (sizes "
            f"{sizes.min()}-{sizes.max()}, median {int(np.median(sizes))}); items/clusters "
            f"per stratum: {', '.join(parts)}"
        )


def targets(n: int) -> np.ndarray:
    return np.random.default_rng(12345).uniform(0.5, 0.8, n)


def generate(
    st: Structure, mu: np.ndarray, sigmas: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Base and aligned outcomes (0/1) and the gap's paired change, for every item."""
    from scipy.special import expit

    u = sigmas[0] * rng.standard_normal(st.n_clusters)
    v = sigmas[1] * rng.standard_normal(st.n_clusters)
    w = sigmas[1] * rng.standard_normal(st.n_clusters)
    n, c = st.cluster.size, st.cluster
    eta = mu[st.stratum] + u[c] + rng.standard_normal(n)
    shared = rng.random(n) < expit(eta)
    base = rng.random(n) < expit(eta - v[c] / 2)
    aligned = rng.random(n) < expit(eta + v[c] / 2)
    copy = rng.random(n) < RHO
    gap = w[c] + rng.standard_normal(n)
    return (
        np.where(copy, shared, base).astype(int),
        np.where(copy, shared, aligned).astype(int),
        gap,
    )


def analyse(base: np.ndarray, aligned: np.ndarray, gap: np.ndarray, cl: np.ndarray) -> list[float]:
    """(item p, clustered p, Newcombe low/high, clustered low/high, delta, gap clustered p,
    Wilcoxon p) of one stratum, with the comparison's own functions."""
    from spillover.stats.clustered import (
        cluster_totals,
        signflip_interval,
        signflip_test,
        signflip_test_real,
    )
    from spillover.stats.probe_compare import wilcoxon_pvalue
    from spillover.stats.tests import mcnemar_test, paired_difference_ci

    b = int(((base == 1) & (aligned == 0)).sum())
    c = int(((base == 0) & (aligned == 1)).sum())
    both = int(((base == 1) & (aligned == 1)).sum())
    d, n = cluster_totals(aligned - base, cl)
    lo, hi = paired_difference_ci(both, c, b, base.size - b - c - both)
    ci = signflip_interval(d, n, item_interval=(lo, hi))
    _, codes = np.unique(cl, return_inverse=True)
    totals = np.bincount(codes, weights=gap)
    return [
        mcnemar_test(b, c, "midp").pvalue,
        signflip_test(d).pvalue,
        lo,
        hi,
        ci.low,
        ci.high,
        (c - b) / base.size,
        signflip_test_real(totals).pvalue,
        wilcoxon_pvalue(gap),
    ]


def level(structures: dict[str, Structure], reps: int, seed: int, settings: list[str]) -> None:
    names = [n for st in structures.values() for n in st.names]
    print(
        "Rejections at alpha 0.05 with zero true change (mean over strata / worst stratum); "
        "95 % coverage of the outcome change"
    )
    print(
        "| clustering | benchmark | outcome: item-level McNemar | outcome: clustered sign-flip "
        "| coverage Newcombe | coverage clustered | gap: Wilcoxon (items) | gap: clustered "
        "sign-flip |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in settings:
        sigmas = CLUSTERING[name]
        rng = np.random.default_rng(seed)
        res = np.empty((reps, len(names), 9))
        start = time.perf_counter()
        mus = {b: calibrate(targets(len(st.names)), *sigmas) for b, st in structures.items()}
        for r in range(reps):
            j0 = 0
            for bench, st in structures.items():
                base, aligned, gap = generate(st, mus[bench], sigmas, rng)
                for j in range(len(st.names)):
                    m = st.stratum == j
                    res[r, j0 + j] = analyse(base[m], aligned[m], gap[m], st.cluster[m])
                j0 += len(st.names)
        seconds = time.perf_counter() - start
        j0 = 0
        for bench, st in structures.items():
            sl = slice(j0, j0 + len(st.names))
            j0 += len(st.names)
            cols = []
            for k in (0, 1):
                rate = 100 * (res[:, sl, k] <= 0.05).mean(axis=0)
                cols.append(f"{rate.mean():.1f} % ({rate.max():.1f})")
            for lo, hi in ((2, 3), (4, 5)):
                cov = 100 * ((res[:, sl, lo] <= 0) & (res[:, sl, hi] >= 0)).mean(axis=0)
                cols.append(f"{cov.mean():.1f} % ({cov.min():.1f})")
            for k in (8, 7):
                rate = 100 * (res[:, sl, k] <= 0.05).mean(axis=0)
                cols.append(f"{rate.mean():.1f} % ({rate.max():.1f})")
            print(f"| {name} | {bench} | " + " | ".join(cols) + " |")
        print(f"<!-- {name}: {reps} repetitions, {seconds:.0f} s -->")


def power(
    structures: dict[str, Structure], reps: int, seed: int, setting: str, changes: list[float]
) -> None:
    from spillover.stats.clustered import cluster_totals, minimum_detectable_change, signflip_test

    sigmas = CLUSTERING[setting]
    names = [n for st in structures.values() for n in st.names]
    mus = {b: calibrate(targets(len(st.names)), *sigmas) for b, st in structures.items()}
    print(
        f"Power of the clustered test ({setting} clustering, {reps} repetitions): a true rise "
        "of the outcome rate by the given points in every stratum; share of repetitions "
        "significant at 0.05 raw / after Holm over the 18 strata; the reported minimum "
        "detectable change (median, points; none: not detectable)"
    )
    print(
        "| benchmark | stratum | items | clusters | "
        + " | ".join(f"+{c:g} points" for c in changes)
        + " | reported MDC |"
    )
    print("|---|---|---:|---:|" + "---:|" * (len(changes) + 1))
    found = np.zeros((len(changes), len(names), 2))
    mdc = np.full((reps, len(names)), np.nan)
    for ci, change in enumerate(changes):
        rng = np.random.default_rng(seed)
        for r in range(reps):
            pvals = []
            for bench, st in structures.items():
                base, null, _ = generate(st, mus[bench], sigmas, rng)
                rate = targets(len(st.names))[st.stratum]
                lift = rng.random(base.size) < change / 100 / (1 - rate)
                aligned = np.where(lift, 1, null)
                for j in range(len(st.names)):
                    m = st.stratum == j
                    d, n = cluster_totals(aligned[m] - base[m], st.cluster[m])
                    pvals.append(signflip_test(d).pvalue)
                    if ci == 0 and r < min(reps, 100):
                        # what a comparison of the unchanged runs reports
                        d0, _ = cluster_totals(null[m] - base[m], st.cluster[m])
                        mdc[r, len(pvals) - 1] = minimum_detectable_change(d0, n, alpha=0.05 / 18)
            p = np.array(pvals)
            found[ci, :, 0] += p <= 0.05
            found[ci, :, 1] += holm(p, 0.05)
    found /= reps
    j0 = 0
    for st in structures.values():
        for j, name in enumerate(st.names):
            m = st.stratum == j
            k = len(set(st.cluster[m].tolist()))
            cells = [
                f"{100 * found[c, j0 + j, 0]:.0f} / {100 * found[c, j0 + j, 1]:.0f} %"
                for c in range(len(changes))
            ]
            vals = mdc[:, j0 + j][~np.isnan(mdc[:, j0 + j])]
            finite = vals[np.isfinite(vals)]
            shown = f"{100 * np.median(finite):.0f}" if finite.size > vals.size / 2 else "none"
            bench, stratum = name.split("/", 1)
            print(
                f"| {bench} | {stratum} | {int(m.sum())} | {k} | "
                + " | ".join(cells)
                + f" | {shown} |"
            )
        j0 += len(st.names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=os.environ.get("SPILLOVER_DATA_DIR"))
    parser.add_argument("--stereoset-split", choices=("dev", "test"), default="dev")
    parser.add_argument("--reps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=20262)
    parser.add_argument(
        "--clustering", nargs="+", default=list(CLUSTERING), choices=list(CLUSTERING)
    )
    parser.add_argument("--power", nargs="*", type=float, default=[], help="true changes, points")
    args = parser.parse_args()
    if args.data_dir is None:
        parser.error("--data-dir (or $SPILLOVER_DATA_DIR) is required")
    from spillover.models import cpu_name

    start = time.perf_counter()
    print(f"cpu: {cpu_name()}; {os.cpu_count()} cores; load average before {os.getloadavg()}")
    structures = load(args.data_dir, args.stereoset_split)
    describe(structures)
    if args.power:
        power(structures, args.reps, args.seed, args.clustering[0], args.power)
    else:
        level(structures, args.reps, args.seed, args.clustering)
    print(f"load average after {os.getloadavg()}; wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
