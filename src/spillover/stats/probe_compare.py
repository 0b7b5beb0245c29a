"""Paired comparison of two runs on the likelihood-probe benchmarks, per stratum.

The BBQ comparison's machinery (:mod:`.clustered`, :mod:`.tests`, :mod:`.rows`,
:mod:`.bootstrap`) applied to CrowS-Pairs, StereoSet, WinoBias and Winogender: items
paired by ``(benchmark, item_id)``, tests and intervals clustered by each benchmark's
cluster unit (``ProbeItem.cluster``), item-level tests beside them, one correction family
across the finest strata of every benchmark compared, the benchmark's own metric with a
cluster-bootstrap interval, and whether it moved toward the unbiased value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from ..data import PROBES
from ..errors import ConfigError, DataError
from .bootstrap import _resample_counts, percentile_interval
from .clustered import (
    REAL_GRID,
    cluster_totals,
    minimum_detectable_change,
    signflip_interval,
    signflip_test_real,
)
from .config import CompareConfig
from .probe_records import (
    FLAG_DECREASE,
    FLAG_INCREASE,
    FLAG_ITEM_LEVEL_ONLY,
    ProbeComparison,
    ProbeRecord,
)
from .probes import (
    CLUSTER_NAME,
    HEADLINE,
    OUTCOME,
    ItemArrays,
    ProbeRow,
    cluster_codes,
    metric_values,
    probe_outcomes,
    probe_rows,
)
from .rows import paired_change
from .tests import adjust_pvalues, mcnemar_test

logger = logging.getLogger(__name__)

FINE = "fine"
"""The primary correction family: the finest rows of every benchmark compared."""
STATIC = ("attribute", "bias_type", "cluster", "split", "group", "label", "n_options")
"""Item columns both runs must agree on (they come from the same items)."""
_BOOT_ELEMENTS = 2_000_000
"""Largest replicates x items block of bootstrap weights held at once."""

Frames: TypeAlias = "pd.DataFrame | Sequence[pd.DataFrame]"


def _frame(frames: Frames, name: str) -> pd.DataFrame:
    """One frame of several benchmarks' frames (the first one's source names it)."""
    if isinstance(frames, pd.DataFrame):
        return frames
    parts: list[pd.DataFrame] = list(frames)
    if not parts:
        raise DataError(f"{name}: no predictions frame given; expected one per benchmark")
    out = pd.concat(parts, ignore_index=True)
    out.attrs = dict(parts[0].attrs)
    return out


def _source(df: pd.DataFrame, default: str) -> str:
    src = df.attrs.get("source")
    return f"{default} ({src})" if src else default


def _pair(
    base: pd.DataFrame, aligned: pd.DataFrame, intersect: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Both runs' outcomes on the same items, in the same row order."""
    bname, aname = _source(base, "BASE"), _source(aligned, "ALIGNED")
    b = probe_outcomes(base, name=bname).sort_values(["benchmark", "item_id"], kind="stable")
    a = probe_outcomes(aligned, name=aname).sort_values(["benchmark", "item_id"], kind="stable")
    bk = pd.MultiIndex.from_arrays([b["benchmark"].astype(str), b["item_id"].astype(str)])
    ak = pd.MultiIndex.from_arrays([a["benchmark"].astype(str), a["item_id"].astype(str)])
    only_b, only_a = bk.difference(ak), ak.difference(bk)
    dropped: dict[str, Any] = {"base_only": len(only_b), "aligned_only": len(only_a)}

    def show(idx: pd.MultiIndex) -> str:
        return ", ".join(f"{x}/{y}" for x, y in list(idx)[:5]) or "-"

    if len(only_b) or len(only_a):
        if not intersect:
            raise DataError(
                f"the runs cover different items: {bname} has {len(b)}, {aname} has "
                f"{len(a)}; {len(only_b)} only in BASE (e.g. {show(only_b)}), {len(only_a)} "
                f"only in ALIGNED (e.g. {show(only_a)}); pass --intersect to compare the "
                "common items"
            )
        b, a = b[bk.isin(ak)], a[ak.isin(bk)]
        if b.empty:
            raise DataError(f"{bname} and {aname} have no item in common")
        logger.info(
            "comparing %d common items; dropped %d base-only and %d aligned-only",
            len(b), len(only_b), len(only_a),
        )  # fmt: skip
    b, a = b.reset_index(drop=True), a.reset_index(drop=True)
    for col in (*STATIC, "normalisation"):
        x, y = b[col], a[col]
        differ = (x.astype(str) != y.astype(str)).to_numpy() & ~(x.isna() & y.isna()).to_numpy()
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise DataError(
                f"{bname} and {aname} disagree on {col!r} for {int(differ.sum())} item(s) "
                f"(e.g. {b['benchmark'].iloc[i]}/{b['item_id'].iloc[i]}: {_plain(x.iloc[i])!r} "
                f"vs {_plain(y.iloc[i])!r}); compare runs scored on the same items the same way"
            )
    return b, a, dropped


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (for messages)."""
    return value.item() if hasattr(value, "item") else value


def wilcoxon_pvalue(x: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (zeros dropped, as
    Wilcoxon's own rule; scipy's exact distribution where it applies); 1 when all are 0."""
    from scipy.stats import wilcoxon

    if not np.any(x != 0):
        return 1.0
    return float(wilcoxon(x, zero_method="wilcox", alternative="two-sided").pvalue)


def _gap_fields(
    x: np.ndarray, codes: np.ndarray, n_s: np.ndarray, cfg: CompareConfig, unit: str
) -> tuple[dict[str, Any], list[str]]:
    """The gap change: its clustered and item-level tests and its interval."""
    from scipy.stats import t as student

    totals = np.bincount(codes, weights=x, minlength=n_s.size)
    clustered = signflip_test_real(totals, unit=unit)
    item_p = wilcoxon_pvalue(x)
    bound = float(np.max(np.abs(x))) if x.size else 0.0
    notes = [clustered.note] if clustered.note and clustered.n_informative else []
    lo: float | None
    hi: float | None
    if cfg.clustered:
        method = "cluster-signflip"
        if bound == 0:
            lo = hi = 0.0
        else:
            ci = signflip_interval(
                totals, n_s, confidence=cfg.confidence, tolerance=1e-4 * bound,
                grid=REAL_GRID, bound=bound, unit=unit,
            )  # fmt: skip
            lo, hi = ci.low, ci.high
            notes += [f"gap: {ci.note}"] if ci.note else []
    else:
        method = "t"
        if x.size < 2:
            lo = hi = None
        else:
            half = float(student.ppf(0.5 + cfg.confidence / 2, x.size - 1)) * float(
                np.std(x, ddof=1)
            )
            centre, half = float(x.mean()), half / math.sqrt(x.size)
            lo, hi = centre - half, centre + half
    out = {
        "delta_gap_ci_low": lo,
        "delta_gap_ci_high": hi,
        "gap_ci_method": method,
        "p_value_gap": clustered.pvalue if cfg.clustered else item_p,
        "p_value_gap_item": item_p,
        "p_value_gap_clustered": clustered.pvalue,
    }
    return out, notes


def _metric_fields(
    index: int, row: ProbeRow, ib: ItemArrays, ia: ItemArrays, codes: np.ndarray,
    cfg: CompareConfig,
) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
    """The benchmark's metrics per side, its bias metric's change and distance from the
    unbiased value, with cluster-bootstrap percentile intervals."""
    name, unbiased = HEADLINE[row.benchmark]
    ones = np.ones((1, codes.size))
    vb, va = metric_values(ib, ones), metric_values(ia, ones)

    def value(v: np.ndarray) -> float | None:
        return None if np.isnan(v[0]) else float(v[0])

    mb, ma = value(vb[name]), value(va[name])
    out: dict[str, Any] = {
        "metric": name,
        "unbiased_value": unbiased,
        "metric_base": mb,
        "metric_aligned": ma,
        "delta_metric": None if mb is None or ma is None else ma - mb,
        "distance_base": None if mb is None else abs(mb - unbiased),
        "distance_aligned": None if ma is None else abs(ma - unbiased),
        "delta_metric_ci_low": None,
        "delta_metric_ci_high": None,
        "delta_distance_ci_low": None,
        "delta_distance_ci_high": None,
        "metrics_base": {k: value(v) for k, v in vb.items()},
        "metrics_aligned": {k: value(v) for k, v in va.items()},
    }
    db, da = out["distance_base"], out["distance_aligned"]
    out["delta_distance"] = None if db is None or da is None else da - db
    out["toward_unbiased"] = None if out["delta_distance"] is None else out["delta_distance"] < 0
    notes = []
    if out["delta_metric"] is None:
        notes.append(f"{name} is undefined: the row lacks the items it needs")
    if cfg.bootstrap <= 0 or out["delta_metric"] is None:
        return out, notes
    delta, dist = _bootstrap(index, row.benchmark, ib, ia, codes, name, unbiased, cfg)
    out["delta_metric_ci_low"], out["delta_metric_ci_high"], undefined = percentile_interval(
        delta, cfg.confidence
    )
    out["delta_distance_ci_low"], out["delta_distance_ci_high"], _ = percentile_interval(
        dist, cfg.confidence
    )
    if undefined:
        notes.append(
            f"{undefined} of {cfg.bootstrap} bootstrap resamples had an undefined {name} "
            "and were left out of its interval"
        )
    return out, notes


def _bootstrap(
    index: int, benchmark: str, ib: ItemArrays, ia: ItemArrays, codes: np.ndarray,
    name: str, unbiased: float, cfg: CompareConfig,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Replicates of the metric's change and of the change of its distance from the
    unbiased value: whole clusters (or items, with ``cluster`` item) resampled with
    replacement, both runs' answers together. Draws depend on the seed, the row's position
    and its cluster sizes only, so swapping the runs negates every replicate."""
    rng = np.random.default_rng([cfg.seed, index])
    n, k = codes.size, int(codes.max()) + 1
    step = max(1, _BOOT_ELEMENTS // max(n, 1))
    delta, dist = [], []
    for start in range(0, cfg.bootstrap, step):
        size = min(step, cfg.bootstrap - start)
        terms = None
        if cfg.clustered:
            draws = _resample_counts(rng, k, size)
            weights = draws[:, codes]
            terms = draws if benchmark == "stereoset" else None
        else:
            weights = _resample_counts(rng, n, size)
        b = metric_values(ib, weights, terms)[name]
        a = metric_values(ia, weights, terms)[name]
        delta.append(a - b)
        dist.append(np.abs(a - unbiased) - np.abs(b - unbiased))
    return np.concatenate(delta), np.concatenate(dist)


def _record(
    index: int, row: ProbeRow, ob: pd.DataFrame, oa: pd.DataFrame, cfg: CompareConfig
) -> dict[str, Any]:
    """Every field of a :class:`ProbeRecord` but the corrected ones and the power."""
    items_b, items_a = ob.iloc[row.index], oa.iloc[row.index]
    codes, k = cluster_codes(items_b)
    unit = CLUSTER_NAME[row.benchmark]
    xb = items_b["outcome"].to_numpy(dtype=bool)
    xa = items_a["outcome"].to_numpy(dtype=bool)
    n = int(xb.size)
    both, b = int((xb & xa).sum()), int((xb & ~xa).sum())
    c, neither = int((~xb & xa).sum()), int((~xb & ~xa).sum())
    d, n_s = cluster_totals(xa.astype(np.int64) - xb.astype(np.int64), codes)
    p_cl, lo, hi, method, cl_note = paired_change(d, n_s, (both, c, b, neither), cfg, unit)
    assert p_cl is not None
    item = mcnemar_test(b, c, "midp")
    if cfg.resolved_test == "signflip":
        test, statistic, p_value = "signflip", float(c - b), p_cl
    else:
        chosen = mcnemar_test(b, c, cfg.resolved_test)
        test, statistic, p_value = chosen.method, chosen.statistic, chosen.pvalue
    gb, ga = items_b["gap"].to_numpy(dtype=float), items_a["gap"].to_numpy(dtype=float)
    gap, gap_notes = _gap_fields(ga - gb, codes, n_s, cfg, unit)
    ib, ia = ItemArrays.of(items_b, codes, k), ItemArrays.of(items_a, codes, k)
    metrics, metric_notes = _metric_fields(index, row, ib, ia, codes, cfg)
    targeted = None
    if cfg.targets:
        attributes = set(items_b["attribute"].astype(str))
        if attributes <= set(cfg.targets) or not attributes & set(cfg.targets):
            targeted = attributes <= set(cfg.targets)
    notes = [x for x in (item.note, cl_note) if x] + gap_notes + metric_notes
    return {
        "benchmark": row.benchmark,
        "level": row.level_name,
        "attribute": row.keys["attribute"],
        "subset": row.keys["subset"],
        "targeted": targeted,
        "family": FINE if row.fine else row.level_name,
        "family_size": 0,
        "correction": cfg.correction,
        "n": n,
        "n_clusters": k,
        "n_informative_clusters": int(np.count_nonzero(d)),
        "cluster_unit": unit if cfg.clustered else "item",
        "outcome": OUTCOME[row.benchmark],
        "outcome_base": float(xb.mean()),
        "outcome_aligned": float(xa.mean()),
        "delta_outcome": (c - b) / n,
        "delta_outcome_ci_low": lo,
        "delta_outcome_ci_high": hi,
        "ci_method": method,
        "n_both": both,
        "b": b,
        "c": c,
        "n_neither": neither,
        "test": test,
        "statistic": statistic,
        "p_value": p_value,
        "p_adjusted": None,
        "significant": None,
        "p_value_item": item.pvalue,
        "p_adjusted_item": None,
        "significant_item": None,
        "p_value_clustered": p_cl,
        "p_adjusted_clustered": None,
        "significant_clustered": None,
        "mdc_outcome": None,
        "gap_base": float(gb.mean()),
        "gap_aligned": float(ga.mean()),
        "delta_gap": float((ga - gb).mean()),
        **gap,
        "p_adjusted_gap": None,
        "significant_gap": None,
        **metrics,
        "flags": [],
        "note": "; ".join(notes) if notes else None,
    }


_FAMILIES = (
    ("p_value", "p_adjusted", "significant"),
    ("p_value_item", "p_adjusted_item", "significant_item"),
    ("p_value_clustered", "p_adjusted_clustered", "significant_clustered"),
    ("p_value_gap", "p_adjusted_gap", "significant_gap"),
)


def _adjust(records: list[dict[str, Any]], cfg: CompareConfig) -> None:
    """Correct each p-value within its family; set the decisions and the row flags."""
    families: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        families.setdefault(rec["family"], []).append(i)
    for members in families.values():
        for raw, adjusted_key, decision in _FAMILIES:
            adjusted, reject = adjust_pvalues(
                [records[i][raw] for i in members], cfg.correction, cfg.alpha
            )
            for j, i in enumerate(members):
                records[i][adjusted_key] = float(adjusted[j])
                records[i][decision] = bool(reject[j])
        for i in members:
            rec = records[i]
            rec["family_size"] = len(members)
            if rec["significant"] and rec["delta_outcome"] > 0:
                rec["flags"].append(FLAG_INCREASE)
            elif rec["significant"] and rec["delta_outcome"] < 0:
                rec["flags"].append(FLAG_DECREASE)
            if rec["significant_item"] and not rec["significant_clustered"]:
                rec["flags"].append(FLAG_ITEM_LEVEL_ONLY)


def _power(
    records: list[dict[str, Any]], rows: Sequence[ProbeRow], ob: pd.DataFrame,
    oa: pd.DataFrame, cfg: CompareConfig,
) -> None:  # fmt: skip
    """The minimum detectable change of every fine row's outcome rate, with the clustered
    test at the family's first correction step (Holm's and Bonferroni's ``alpha / m``)."""
    for rec, row in zip(records, rows, strict=True):
        if not row.fine:
            continue
        step = cfg.alpha if cfg.correction == "none" else cfg.alpha / rec["family_size"]
        codes, _ = cluster_codes(ob.iloc[row.index])
        diff = oa["outcome"].to_numpy(dtype=np.int64) - ob["outcome"].to_numpy(dtype=np.int64)
        d, n_s = cluster_totals(diff[row.index], codes)
        mdc = minimum_detectable_change(d, n_s, alpha=step)
        rec["mdc_outcome"] = mdc if math.isfinite(mdc) else None
        if not math.isfinite(mdc):
            msg = "no change of the outcome rate is detectable with 80 % power here"
            rec["note"] = f"{rec['note']}; {msg}" if rec["note"] else msg


def _summary(
    records: Sequence[dict[str, Any]], ob: pd.DataFrame, cfg: CompareConfig,
    dropped: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    benchmarks = [b for b in PROBES if b in set(ob["benchmark"].astype(str))]
    fine = [r for r in records if r["family"] == FINE]
    keys = ("benchmark", "attribute", "subset", "n", "delta_outcome", "p_adjusted", "metric",
            "delta_metric", "toward_unbiased")  # fmt: skip
    counts = ob.groupby("benchmark")["cluster"].agg(["size", "nunique"])
    return {
        "benchmarks": benchmarks,
        "n_items": {b: int(counts.loc[b, "size"]) for b in benchmarks},
        "n_clusters": {b: int(counts.loc[b, "nunique"]) for b in benchmarks},
        "cluster_units": {b: CLUSTER_NAME[b] if cfg.clustered else "item" for b in benchmarks},
        "dropped": dropped,
        "test": cfg.resolved_test,
        "cluster": cfg.cluster,
        "correction": cfg.correction,
        "alpha": cfg.alpha,
        "family": FINE,
        "family_size": len(fine),
        "significant": [{k: r[k] for k in keys} for r in fine if r["significant"]],
        "caveats": {b: PROBES[b].caveat for b in benchmarks if PROBES[b].caveat},
    }


def compare_probes(
    base: Frames, aligned: Frames, cfg: CompareConfig | None = None
) -> ProbeComparison:
    """Compare two runs (base, aligned) item by item on likelihood-probe benchmarks.

    Args:
        base: The base run's probe predictions joined with their items (columns of
            :data:`~spillover.predictions.PROBE_COLUMNS`): one frame holding one or
            several benchmarks, or a sequence of frames (one per benchmark).
        aligned: The aligned run's, on the same items.
        cfg: Options; defaults to :class:`CompareConfig`. ``cluster``: ``scenario`` means
            each benchmark's own cluster unit (``ProbeItem.cluster``: writer, target term,
            occupation), ``item`` treats items as independent; ``template`` is BBQ's and
            refused. ``by`` and ``permutation`` are BBQ's and not read; ``targets`` marks
            the rows of targeted attributes.

    Returns:
        One :class:`ProbeRecord` per stratum: per benchmark (in ``PROBES`` order) its
        finest rows (attribute, and its natural subset where the data hold several),
        coarser rows, and its overall row; a summary with the data caveats.

    Raises:
        DataError: as :func:`~spillover.stats.probes.probe_outcomes`, different
            item sets (unless ``cfg.intersect``), or items the runs disagree on.
        ConfigError: ``cluster`` template.

    Notes:
        Every p-value kind (chosen, item-level, clustered, gap) is corrected within its
        family: the finest rows of every benchmark compared in this call form one family
        (``fine``); coarser rows form a family per level. Compare every benchmark of a
        study in one call so that its fine rows are one family; BBQ's cells are a family
        of their own (:func:`~spillover.stats.compare_runs`). Swapping the runs keeps
        every p-value and negates every change.

    References:
        As :func:`~spillover.stats.compare_runs`; Wilcoxon, Biometrics Bulletin 1:80-83
        (1945). Metrics: ``docs/stats.md``.
    """
    cfg = cfg or CompareConfig()
    if cfg.cluster == "template":
        raise ConfigError(
            "`cluster`='template' is BBQ's unit; for likelihood probes use scenario (each "
            "benchmark's cluster unit) or item"
        )
    b, a, dropped = _pair(_frame(base, "BASE"), _frame(aligned, "ALIGNED"), cfg.intersect)
    rows = probe_rows(b, ("attribute",))
    records = [_record(i, row, b, a, cfg) for i, row in enumerate(rows)]
    _adjust(records, cfg)
    _power(records, rows, b, a, cfg)
    warnings = []
    if dropped["base_only"] or dropped["aligned_only"]:
        warnings.append(
            f"compared the {len(b)} common items: left out {dropped['base_only']} base-only "
            f"and {dropped['aligned_only']} aligned-only item(s)"
        )
    typed = []
    for rec in records:
        rec["flags"] = tuple(rec["flags"])
        typed.append(ProbeRecord(**rec))
    return ProbeComparison(typed, _summary(records, b, cfg, dropped), cfg, warnings)
