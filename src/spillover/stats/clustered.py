"""Scenario-clustered inference on a paired change: test, interval, power, heterogeneity.

Every function works from per-cluster totals of a paired per-item difference ``x_i`` in
``{-1, 0, 1}``: for accuracy ``x_i = correct_aligned - correct_base`` (a cluster's total
is ``d_s = c_s - b_s``), for the unknown rate ``x_i = unknown_aligned - unknown_base``.
A cluster is a BBQ scenario (:func:`spillover.data.assign_scenarios`) within its
category; ``n_s`` is the number of the stratum's items in it, and the change of the
stratum is ``delta = sum(d_s) / sum(n_s)``. With one item per cluster every function
reduces to its item-level counterpart (the sign-flip test is then the McNemar test).

Why clusters: items of one scenario share wording and names, so when a model's
behaviour varies by scenario, item-level tests are far too confident (measured with zero
true change: item-level McNemar significant in 14 % to 46 % of BBQ's category x context
cells, Newcombe intervals covering 54 % to 86 %; ``bench/clustered_inference.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

NO_DISCORDANCE = "no discordant pairs"
NORMAL_ABOVE = 200
"""Above this many clusters (e.g. items as clusters) power uses the normal critical value."""
MIN_INFORMATIVE = 6
"""Fewest informative clusters with which a two-sided sign-flip test can reach p < 0.05
(``2^-5`` is the smallest attainable mid-p with 5); below it the record says so."""


@dataclass(frozen=True, slots=True)
class ClusterTest:
    """Outcome of the scenario-clustered test of "no change"."""

    statistic: float
    """``sum(d_s)``, the stratum's ``c - b``."""
    pvalue: float
    """Two-sided p-value."""
    method: str
    """``signflip-midp`` (or ``signflip`` without the mid-p rule)."""
    n_clusters: int
    """Clusters with at least one item."""
    n_informative: int
    """Clusters with ``d_s != 0``: the only ones a sign flip moves."""
    min_pvalue: float
    """Smallest p-value attainable with ``n_informative`` clusters."""
    note: str | None = None
    """Why the result is special (no discordance, too few informative clusters)."""


@dataclass(frozen=True, slots=True)
class ClusterInterval:
    """A scenario-clustered interval for ``delta``."""

    low: float
    """Lower limit (proportion scale)."""
    high: float
    """Upper limit."""
    method: str
    """``cluster-signflip``."""
    note: str | None = None
    """Why the interval is special (unbounded, degenerate)."""


@dataclass(frozen=True, slots=True)
class Heterogeneity:
    """Test that several strata share one change (generalised Cochran's Q)."""

    statistic: float
    """Q."""
    df: int
    """Strata minus one."""
    pvalue: float
    """p-value of the wild cluster bootstrap."""
    method: str
    """``q-wild-cluster``."""


def cluster_totals(values: npt.ArrayLike, cluster: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(d, n)``: per-cluster totals and item counts of an integer per-item difference."""
    x = np.asarray(values, dtype=np.int64)
    _, inv = np.unique(np.asarray(cluster), return_inverse=True)
    inv = inv.ravel()
    return (
        np.bincount(inv, weights=x).round().astype(np.int64),
        np.bincount(inv).astype(np.int64),
    )


def signflip_distribution(a: npt.ArrayLike) -> np.ndarray:
    """Exact null distribution of ``S = sum of the a_s whose sign is +`` for integers ``a_s >= 0``.

    Returns:
        ``pmf`` of length ``sum(a) + 1``; the sign-flip statistic is ``T = 2 S - sum(a)``.

    Notes:
        Dynamic programming over the generating function ``prod_s (1 + x^{a_s}) / 2``:
        ``O(K M)`` operations instead of the ``2^K`` sign patterns, exact up to float
        rounding (probabilities are multiples of ``2^-K``).

    References:
        Pagano & Tritchler, "On obtaining permutation distributions in polynomial time",
        JASA 78:435-440 (1983).
    """
    aa = np.sort(np.asarray(a, dtype=np.int64).ravel())
    aa = aa[aa > 0]
    pmf = np.zeros(int(aa.sum()) + 1)
    pmf[0] = 1.0
    top = 0
    for v in aa.tolist():
        pmf[v : top + v + 1] += pmf[: top + 1].copy()
        top += v
        pmf[: top + 1] *= 0.5
    return pmf


def signflip_test(d: npt.ArrayLike, *, midp: bool = True, unit: str = "scenario") -> ClusterTest:
    """Two-sided sign-flip (cluster permutation) test of "no change" on integer totals ``d``.

    The statistic ``T = sum(d_s)`` is referred to the distribution of ``sum(eps_s d_s)``
    over all ``2^K`` sign patterns ``eps_s = +-1``, computed exactly.

    Notes:
        *Validity.* If, within each cluster, swapping the two runs leaves the joint law
        of their answers unchanged (the sharp null of no change), each ``d_s`` is
        symmetric about 0 given ``|d_s|`` and the test is exact for any number and size of
        clusters and any within-cluster correlation (Fisher 1935; Efron 1969); under the
        weaker null ``E d_s = 0`` it holds asymptotically, and with few clusters under
        approximate symmetry (Canay, Romano & Shaikh 2017). It is the randomisation
        version of the clustered McNemar statistic ``T^2 / sum(d_s^2)`` of Durkalski et
        al. (2003). With one item per cluster it is the exact (``midp=False``) or mid-p
        McNemar test, value for value.

        *Mid-p.* Sign patterns tied with ``|T|`` count by half (Lancaster 1961), as the
        item-level default does (Fagerland et al. 2013): simulated level 4.9 % to 5.7 %
        at 5 % on BBQ's keys, against 4.0 % to 5.0 % for the plain version.

        *Few clusters.* The smallest attainable two-sided mid-p with ``K`` informative
        clusters is ``2^-K``: p < 0.05 needs at least 5, a Holm rejection among the 22
        category x context cells at least 9. Below :data:`MIN_INFORMATIVE` the result
        carries a note (naming the clusters as ``unit``); nothing falls back to an
        item-level test.

    References:
        Fisher, "The Design of Experiments" (1935), section 21. Efron, "Student's t-test
        under symmetry conditions", JASA 64:1278-1302 (1969). Durkalski, Palesch, Lipsitz
        & Rust, "Analysis of clustered matched-pair data", Statistics in Medicine
        22:2417-2428 (2003). Canay, Romano & Shaikh, "Randomization tests under an
        approximate symmetry assumption", Econometrica 85:1013-1030 (2017). Lancaster,
        "Significance tests in discrete distributions", JASA 56:223-234 (1961).
    """
    dd = np.asarray(d, dtype=np.int64).ravel()
    informative = dd[dd != 0]
    k_inf = int(informative.size)
    method = "signflip-midp" if midp else "signflip"
    if k_inf == 0:
        return ClusterTest(0.0, 1.0, method, int(dd.size), 0, 1.0, NO_DISCORDANCE)
    pmf = signflip_distribution(np.abs(informative))
    m = pmf.size - 1
    stat = np.abs(2 * np.arange(m + 1) - m)
    observed = abs(int(dd.sum()))
    beyond, at = float(pmf[stat > observed].sum()), float(pmf[stat == observed].sum())
    p = min(1.0, beyond + (0.5 * at if midp else at))
    min_p = 2.0 ** (1 - k_inf) * (0.5 if midp else 1.0)
    note = None
    if k_inf < MIN_INFORMATIVE:
        note = (
            f"only {k_inf} {unit}(s) with discordant answers: the smallest attainable "
            f"p-value is {min_p:.3g}"
        )
    return ClusterTest(float(dd.sum()), p, method, int(dd.size), k_inf, min_p, note)


def _signflip_pvalue_real(r: np.ndarray, grid: int) -> float:
    """Two-sided mid-p sign-flip p-value of real-valued totals ``r``, on a lattice of about
    ``grid`` points (magnitudes rounded to multiples of ``sum |r| / grid``)."""
    mag = np.abs(r)
    total = float(mag.sum())
    if total <= 0:
        return 1.0
    m = np.rint(mag * (grid / total)).astype(np.int64)
    signed = int(np.sum(np.sign(r).astype(np.int64) * m))
    pmf = signflip_distribution(m)
    top = pmf.size - 1
    stat = np.abs(2 * np.arange(top + 1) - top)
    observed = abs(signed)
    return min(1.0, float(pmf[stat > observed].sum()) + 0.5 * float(pmf[stat == observed].sum()))


EXACT_REAL_UP_TO = 16
"""Most informative clusters for which :func:`signflip_test_real` enumerates every sign
pattern (``2^16`` patterns); above it, the exact distribution on a lattice."""
REAL_GRID = 20_000
"""Lattice size of :func:`signflip_test_real` above :data:`EXACT_REAL_UP_TO` clusters."""


def signflip_test_real(
    totals: npt.ArrayLike, *, unit: str = "scenario", grid: int = REAL_GRID
) -> ClusterTest:
    """Two-sided mid-p sign-flip test of "no change" on real-valued cluster totals.

    The same test as :func:`signflip_test` for a continuous paired difference (e.g. the
    change of a log-likelihood gap, summed per cluster): ``T = sum r_s`` against
    ``sum eps_s r_s`` over all sign patterns, patterns tied with ``|T|`` (to ``1e-9`` of
    ``sum |r_s|``) counting by half.

    Args:
        totals: Per-cluster totals ``r_s`` of the paired difference.
        unit: What the clusters are, for the note.
        grid: Lattice size above :data:`EXACT_REAL_UP_TO` informative clusters.

    Returns:
        The test (``method`` ``signflip-midp``); p = 1 with a note when every total is 0.

    Notes:
        With at most :data:`EXACT_REAL_UP_TO` informative clusters (``r_s != 0``) every
        pattern is enumerated: the p-value is exact. Above, the magnitudes are rounded to
        multiples of ``sum |r_s| / grid`` and the exact distribution of the rounded
        totals is computed by :func:`signflip_distribution`; the rounding moves ``T`` by
        at most ``K sum |r_s| / (2 grid)``. Validity as for :func:`signflip_test`: exact
        under the sharp null of exchangeable runs within each cluster, whatever the
        dependence inside it (Fisher 1935; Efron 1969).

    References:
        Fisher, "The Design of Experiments" (1935), section 21. Efron, JASA 64:1278-1302
        (1969). Pagano & Tritchler, JASA 78:435-440 (1983).
    """
    r = np.asarray(totals, dtype=np.float64).ravel()
    informative = r[r != 0]
    k_inf = int(informative.size)
    if k_inf == 0:
        return ClusterTest(0.0, 1.0, "signflip-midp", int(r.size), 0, 1.0, "no change at all")
    total = float(np.abs(informative).sum())
    if k_inf <= EXACT_REAL_UP_TO:
        sums = np.zeros(1)
        for v in informative.tolist():  # every pattern's sum, doubling per cluster
            sums = np.concatenate([sums + v, sums - v])
        stats = np.abs(sums)
        observed = abs(float(informative.sum()))
        tol = 1e-9 * total
        beyond = np.count_nonzero(stats > observed + tol)
        at = np.count_nonzero(np.abs(stats - observed) <= tol)
        p = min(1.0, (beyond + 0.5 * at) / 2**k_inf)
    else:
        p = _signflip_pvalue_real(informative, grid)
    min_p = 2.0 ** (1 - k_inf) * 0.5
    note = None
    if k_inf < MIN_INFORMATIVE:
        note = (
            f"only {k_inf} {unit}(s) with a non-zero change: the smallest attainable "
            f"p-value is {min_p:.3g}"
        )
    return ClusterTest(float(r.sum()), p, "signflip-midp", int(r.size), k_inf, min_p, note)


def signflip_interval(
    d: npt.ArrayLike,
    n: npt.ArrayLike,
    *,
    confidence: float = 0.95,
    item_interval: tuple[float, float] | None = None,
    tolerance: float = 1e-3,
    grid: int = 2000,
    bound: float = 1.0,
    unit: str = "scenario",
) -> ClusterInterval:
    """The changes ``delta0`` that the sign-flip mid-p test does not reject.

    Args:
        d: Per-cluster totals of the paired difference.
        n: Per-cluster item counts.
        confidence: Level of the interval.
        item_interval: The item-level interval (Newcombe's) to take the hull with, or None.
        tolerance: Precision of the limits (in the unit of ``d / n``).
        grid: Lattice size of the sign-flip distributions of the residual totals.
        bound: Largest possible ``|delta|``: 1 for a change of a proportion; for a
            real-valued per-item difference (a change of log-likelihood gaps), its
            largest absolute value.
        unit: What the clusters are, for the notes (``scenario``, ``writer``, ...).

    Returns:
        ``{delta0 : p(d - delta0 n) > 1 - confidence}`` with ``p`` the two-sided mid-p
        sign-flip p-value of the residual totals ``r_s = d_s - delta0 n_s``, found by
        bisection on each side of the estimate ``sum d / sum n`` (where ``p = 1``), clipped
        to ``[-bound, bound]``; then the hull with ``item_interval``.

    Notes:
        Inverting a randomisation test gives a confidence set for the shift it tests
        (Garthwaite 1996); at ``delta0 = 0`` the residuals are ``d`` itself, so the
        interval excludes 0 exactly when :func:`signflip_test` rejects at
        ``1 - confidence`` (up to the lattice rounding of the residuals, about
        ``1 / grid`` of their sum). It is exact under symmetry of the residual totals,
        which fails near the bounds ``+-1`` (a bounded paired difference with mean
        ``delta0`` near 1 is skewed): there the sign-flip set can shrink to a point. The
        hull with Newcombe's item-level interval, which respects the bounds, guards
        against that; with clustered answers the sign-flip limits are the wider ones
        almost everywhere. Simulated coverage at 95 % on BBQ's keys:
        ``bench/clustered_inference.py``.

    References:
        Garthwaite, "Confidence intervals from randomization tests", Biometrics
        52:1387-1393 (1996). Newcombe, Statistics in Medicine 17:2635-2650 (1998).
    """
    dd = np.asarray(d, dtype=np.float64).ravel()
    nn = np.asarray(n, dtype=np.float64).ravel()
    keep = nn > 0
    dd, nn = dd[keep], nn[keep]
    alpha = 1.0 - confidence
    note = None
    if dd.size < 2:
        lo, hi, note = -bound, bound, f"fewer than 2 {unit}s"
    else:
        est = float(dd.sum() / nn.sum())

        def inside(x: float) -> bool:
            return _signflip_pvalue_real(dd - x * nn, grid) > alpha

        limits = []
        for end in (-bound, bound):
            if inside(end):
                limits.append(end)
                continue
            near, far = est, end
            while abs(far - near) > tolerance:
                mid = 0.5 * (near + far)
                near, far = (mid, far) if inside(mid) else (near, mid)
            limits.append(far)
        lo, hi = limits
        if lo == -bound and hi == bound:
            note = f"too few {unit}s with discordant answers for a bounded interval"
    if item_interval is not None:
        lo, hi = min(lo, item_interval[0]), max(hi, item_interval[1])
    return ClusterInterval(lo, hi, "cluster-signflip", note)


def _critical_value(a: np.ndarray, alpha: float, grid: int = 4000) -> float:
    """Smallest ``|T|`` the two-sided mid-p sign-flip test rejects at ``alpha`` for cluster
    magnitudes ``a`` (rescaled to a lattice of about ``grid`` points); ``inf`` when none."""
    aa = a[a > 0]
    if aa.size == 0:
        return math.inf
    scale = grid / float(aa.sum())
    pmf = signflip_distribution(np.maximum(np.rint(aa * scale), 1))
    m = pmf.size - 1
    levels, inv = np.unique(np.abs(2 * np.arange(m + 1) - m), return_inverse=True)
    mass = np.bincount(inv, weights=pmf)
    beyond = np.concatenate([np.cumsum(mass[::-1])[::-1][1:], [0.0]])
    ok = np.flatnonzero(beyond + 0.5 * mass <= alpha)
    return math.inf if ok.size == 0 else float(levels[ok[0]]) / scale


def minimum_detectable_change(
    d: npt.ArrayLike,
    n: npt.ArrayLike,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    flippable: float | None = None,
) -> float:
    """Smallest uniform change (proportion) the sign-flip test detects with ``power``.

    Notes:
        A uniform change ``delta`` flips answers with the same probability in every
        scenario: it moves ``D = sum d_s`` by ``delta N`` and adds the binomial variance
        ``N delta`` of the flips, while the observed centred totals
        ``r_s = d_s - n_s delta_hat`` give the scenario-level noise (CR1 variance
        ``V = K / (K - 1) sum r_s^2``). The test rejects when ``U = |D| - c sqrt(Q) > 0``,
        ``Q = sum d_s^2``, with ``c`` the exact mid-p critical value for the expected
        cluster magnitudes; ``U`` is approximated as normal (delta method, ``D`` and
        ``Q`` correlated under the alternative) and the smallest ``delta`` with
        ``P(U > 0) >= power`` is found by bisection. ``inf`` when no change is
        detectable (too few items or scenarios). ``flippable`` (the share of answers a change can
        flip: the accuracy, for a loss of accuracy) refines the binomial variance of the
        flips to ``N delta (1 - delta / flippable)`` and bounds the search: a loss larger
        than ``flippable`` is impossible, so when even that is not detectable the result
        is ``inf``. Checked against simulated power in
        ``bench/clustered_inference.py``. The reasoning follows Connor's McNemar sample
        size formula, which also uses different variances under the null and the
        alternative.

    References:
        Connor, "Sample size for testing differences in proportions for the
        paired-sample design", Biometrics 43:207-211 (1987).
    """
    from scipy.stats import norm

    dd = np.asarray(d, dtype=np.float64).ravel()
    nn = np.asarray(n, dtype=np.float64).ravel()
    keep = nn > 0
    dd, nn = dd[keep], nn[keep]
    k = int(dd.size)
    if k < 2:
        return math.inf
    big_n = float(nn.sum())
    r = dd - nn * float(dd.sum()) / big_n
    v = k / (k - 1) * float(np.sum(r * r))
    zb = float(norm.ppf(power))
    za = float(norm.ppf(1 - alpha / 2))

    def enough(x: float) -> bool:
        keep = 1.0 - min(1.0, x / flippable) if flippable else 1.0
        s2 = r * r + x * nn * keep
        mu = x * nn
        a2 = mu * mu + s2
        eq = float(a2.sum())
        if k > NORMAL_ABOVE:  # many clusters: the sign-flip distribution is normal
            c = za
        else:
            cv = _critical_value(np.sqrt(a2), alpha)
            if not math.isfinite(cv):
                return False
            c = cv / math.sqrt(eq)
        var_u = (
            v
            + x * big_n * keep
            - c * 2.0 * float(np.sum(mu * s2)) / math.sqrt(eq)
            + c * c * float(np.sum(4.0 * mu * mu * s2 + 2.0 * s2 * s2)) / (4.0 * eq)
        )
        return (x * big_n - c * math.sqrt(eq)) / math.sqrt(max(var_u, 1e-300)) >= zb

    # a loss cannot exceed the answers it can flip: beyond that nothing is detectable
    top = min(1.0, flippable) if flippable else 1.0
    if not enough(top):
        return math.inf
    lo, hi = 0.0, top
    while hi - lo > 1e-4:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def heterogeneity_test(
    d: npt.ArrayLike, n: npt.ArrayLike, *, replicates: int = 999, seed: int = 0
) -> Heterogeneity | None:
    """Do the strata under an aggregate share one change? Generalised Cochran's Q.

    Args:
        d: ``(K, J)`` per-cluster totals, one row per scenario, one column per stratum (a
            scenario in both contexts of a category is one row; zeros where absent).
        n: ``(K, J)`` item counts, same layout.
        replicates: Wild cluster bootstrap draws.
        seed: Their seed.

    Returns:
        The test, or None with fewer than 2 strata of at least 2 scenarios.

    Notes:
        With ``delta_j = D_j / N_j`` and scores ``e_sj = (d_sj - n_sj delta_j) / N_j``, the
        covariance of the changes is ``V = F^1/2 (sum_s e_s e_s') F^1/2`` with CR1 factors
        ``F = diag(K_j / (K_j - 1))``; it is not diagonal when strata share scenarios, so
        Cochran's Q with independent weights would be wrong. The statistic is the Wald
        test of equal changes, ``Q = (delta - p 1)' V^-1 (delta - p 1)`` with the GLS
        pooled change ``p``. Because ``V`` rests on 10-30 scenarios per stratum, ``Q`` is
        referred to a wild cluster bootstrap with null-restricted residuals and one
        Rademacher sign per scenario (shared by its strata), recomputing ``V`` each time
        (a pivotal statistic).

    References:
        Cochran, "The combination of estimates from different experiments", Biometrics
        10:101-129 (1954). Cameron, Gelbach & Miller, Review of Economics and
        Statistics 90:414-427 (2008). MacKinnon & Webb, "The wild bootstrap for few
        (treated) clusters", Econometrics Journal 21:114-135 (2018).
    """
    dm = np.asarray(d, dtype=np.float64)
    nm = np.asarray(n, dtype=np.float64)
    kj = np.count_nonzero(nm > 0, axis=0)
    keep = kj >= 2
    dm, nm, kj = dm[:, keep], nm[:, keep], kj[keep]
    j = int(dm.shape[1])
    if j < 2:
        return None
    nj = nm.sum(axis=0)
    fj = np.sqrt(kj / (kj - 1.0))
    one = np.ones(j)

    def q_stat(stack: np.ndarray) -> np.ndarray:
        delta = stack.sum(axis=1) / nj
        e = (stack - nm[None] * delta[:, None, :]) / nj * fj
        v = np.einsum("bkj,bkl->bjl", e, e)
        # a tiny ridge keeps V invertible when strata share all their scenarios; a zero V
        # (no variation at all) stays zero, and its pseudo-inverse gives Q = 0
        ridge = 1e-12 * np.trace(v, axis1=1, axis2=2) / j
        vinv = np.linalg.pinv(v + np.eye(j)[None] * ridge[:, None, None])
        w1 = vinv @ one
        total = w1 @ one
        safe = np.where(total > 0, total, 1.0)
        pooled = np.where(total > 0, np.einsum("bj,bj->b", w1, delta) / safe, delta.mean(axis=1))
        res = delta - pooled[:, None]
        return np.asarray(np.einsum("bj,bjl,bl->b", res, vinv, res))

    q_obs = float(q_stat(dm[None])[0])
    common = float(dm.sum()) / float(nj.sum())
    resid = dm - nm * common
    rng = np.random.default_rng(seed)
    exceed = 0
    chunk = max(1, 2_000_000 // max(1, dm.size))
    for start in range(0, replicates, chunk):
        b = min(chunk, replicates - start)
        eps = rng.integers(0, 2, size=(b, dm.shape[0], 1)) * 2.0 - 1.0
        exceed += int(
            np.count_nonzero(q_stat(nm[None] * common + eps * resid[None]) >= q_obs * (1 - 1e-12))
        )
    return Heterogeneity(q_obs, j - 1, (exceed + 1.0) / (replicates + 1.0), "q-wild-cluster")
