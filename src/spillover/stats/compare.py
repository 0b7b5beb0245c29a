"""Paired comparison of two runs on the same BBQ items: tests, corrections, effects, summary."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..data import CONTEXTS, BBQData
from ..errors import ConfigError, DataError
from .bootstrap import bootstrap_cell_sums, percentile_interval
from .config import CompareConfig
from .flags import keys_of, simpson_flags
from .io import KEY_COLUMNS, check_joined, join_with_bbq, read_predictions
from .keys import ALL, KEY_ORDER, level_name
from .metrics import (
    Cells,
    RowSpec,
    bias_score,
    bias_values,
    item_indicators,
    make_cells,
    row_specs,
)
from .records import FLAG_DEGRADATION, FLAG_IMPROVEMENT, Comparison, StratumRecord
from .tests import (
    CI_METHOD,
    adjust_pvalues,
    discordant_odds_ratio,
    mcnemar_test,
    paired_difference_ci,
    resolve_test,
)

logger = logging.getLogger(__name__)

SIDES = ("base", "aligned")
PAIR_STATS: tuple[str, ...] = (
    "n",
    "both",
    "b",
    "c",
    "neither",
    "n_target",
    *(
        f"{s}_{side}"
        for s in ("correct", "unknown", "correct_t", "biased", "nonunk_t")
        for side in SIDES
    ),
)
"""Per-cell sums of a comparison: pair counts, then per-side counts (see ``CELL_STATS``)."""
_I = {name: i for i, name in enumerate(PAIR_STATS)}


# --------------------------------------------------------------------------- pairing


def _name(df: pd.DataFrame, default: str) -> str:
    src = df.attrs.get("source")
    return f"{default} ({src})" if src else default


def _pair(
    base: pd.DataFrame, aligned: pd.DataFrame, intersect: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    bname, aname = _name(base, "BASE"), _name(aligned, "ALIGNED")
    b = check_joined(base, bname)
    a = check_joined(aligned, aname)
    b = b.sort_values(list(KEY_COLUMNS), kind="stable").reset_index(drop=True)
    a = a.sort_values(list(KEY_COLUMNS), kind="stable").reset_index(drop=True)
    bkeys = pd.MultiIndex.from_frame(b[list(KEY_COLUMNS)])
    akeys = pd.MultiIndex.from_frame(a[list(KEY_COLUMNS)])
    only_b = bkeys.difference(akeys)
    only_a = akeys.difference(bkeys)
    dropped: dict[str, Any] = {"base_only": len(only_b), "aligned_only": len(only_a)}

    def show(idx: pd.MultiIndex) -> list[str]:
        return [f"{c}/{e}" for c, e in list(idx)[:5]]

    if len(only_b) or len(only_a):
        if not intersect:
            raise DataError(
                f"the runs cover different items: {bname} has {len(b)}, {aname} has {len(a)}; "
                f"{len(only_b)} only in BASE (e.g. {', '.join(show(only_b)) or '-'}), "
                f"{len(only_a)} only in ALIGNED (e.g. {', '.join(show(only_a)) or '-'}); "
                "pass --intersect to compare the common items"
            )
        dropped["examples_base_only"] = show(only_b)
        dropped["examples_aligned_only"] = show(only_a)
        b = b[bkeys.isin(akeys)].reset_index(drop=True)
        a = a[akeys.isin(bkeys)].reset_index(drop=True)
        if b.empty:
            raise DataError(f"{bname} and {aname} have no item in common")
        logger.info(
            "comparing %d common items; dropped %d base-only and %d aligned-only",
            len(b),
            len(only_b),
            len(only_a),
        )
    for col in ("context_condition", "question_polarity", "label", "unknown_loc", "target_loc"):
        if col in ("label", "unknown_loc", "target_loc"):
            x = b[col].to_numpy(dtype=float, na_value=np.nan)
            y = a[col].to_numpy(dtype=float, na_value=np.nan)
            differ = (x != y) & ~(np.isnan(x) & np.isnan(y))
        else:
            x = b[col].astype(str).to_numpy()
            y = a[col].astype(str).to_numpy()
            differ = x != y
        if differ.any():
            i = int(np.flatnonzero(differ)[0])
            raise DataError(
                f"{bname} and {aname} disagree on {col!r} for {int(differ.sum())} item(s) "
                f"(e.g. {b['category'].iloc[i]}/{b['example_id'].iloc[i]}: "
                f"{b[col].iloc[i]!r} vs {a[col].iloc[i]!r}); join both runs with the same BBQ data"
            )
    return b, a, dropped


def _pair_stats(b: pd.DataFrame, a: pd.DataFrame) -> np.ndarray:
    ib, ia = item_indicators(b), item_indicators(a)
    cb, ca = ib["correct"].astype(bool), ia["correct"].astype(bool)
    cols = {
        "n": ib["n"],
        "both": (cb & ca).astype(np.int64),
        "b": (cb & ~ca).astype(np.int64),
        "c": (~cb & ca).astype(np.int64),
        "neither": (~cb & ~ca).astype(np.int64),
        "n_target": ib["n_target"],
    }
    for s in ("correct", "unknown", "correct_t", "biased", "nonunk_t"):
        cols[f"{s}_base"] = ib[s]
        cols[f"{s}_aligned"] = ia[s]
    return np.stack([cols[name] for name in PAIR_STATS], axis=1)


def _row_record(
    spec: RowSpec,
    tot: np.ndarray,
    cfg: CompareConfig,
    by: Sequence[str],
    boot: np.ndarray | None,
) -> dict[str, Any]:
    t = {name: int(tot[i]) for name, i in _I.items()}
    n = t["n"]
    rec = spec.record_keys(by)
    notes: list[str] = []
    test = mcnemar_test(t["b"], t["c"], cfg.test)
    lo, hi = paired_difference_ci(
        t["both"], t["c"], t["b"], t["neither"], confidence=cfg.confidence
    )
    orr = discordant_odds_ratio(t["b"], t["c"], confidence=cfg.confidence)
    if test.note:
        notes.append(test.note)
    elif orr.note:
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
        delta_accuracy_ci_low=lo,
        delta_accuracy_ci_high=hi,
        ci_method=CI_METHOD,
        test=test.method,
        statistic=test.statistic,
        p_value=test.pvalue,
        p_adjusted=None,
        correction=cfg.correction,
        family=level_name(spec.level),
        family_size=None,
        significant=None,
        odds_ratio=orr.estimate,
        odds_ratio_ci_low=orr.low,
        odds_ratio_ci_high=orr.high,
        unknown_rate_base=t["unknown_base"] / n,
        unknown_rate_aligned=t["unknown_aligned"] / n,
        n_target=t["n_target"],
        bias_score_base=None,
        bias_score_aligned=None,
        delta_bias_score=None,
        delta_bias_score_ci_low=None,
        delta_bias_score_ci_high=None,
        delta_accuracy_boot_ci_low=None,
        delta_accuracy_boot_ci_high=None,
    )
    ctx = spec.context
    if ctx is not None:
        scores = {
            side: bias_score(
                ctx,
                t["n_target"],
                t[f"correct_t_{side}"],
                t[f"biased_{side}"],
                t[f"nonunk_t_{side}"],
            )
            for side in SIDES
        }
        for side in SIDES:
            rec[f"bias_score_{side}"] = scores[side].value
            if scores[side].note:
                notes.append(f"{side}: {scores[side].note}")
        if scores["base"].value is not None and scores["aligned"].value is not None:
            rec["delta_bias_score"] = scores["aligned"].value - scores["base"].value
    else:
        notes.append("bias scores are per context: see this stratum's rows per context")
    if boot is not None:
        _bootstrap_fields(rec, boot, ctx, cfg, notes)
    rec["flags"] = []
    rec["note"] = "; ".join(notes) if notes else None
    return rec


def _bootstrap_fields(
    rec: dict[str, Any],
    boot: np.ndarray,
    ctx: str | None,
    cfg: CompareConfig,
    notes: list[str],
) -> None:
    col = {name: boot[:, i] for name, i in _I.items()}
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


# --------------------------------------------------------------------------- main entry


def compare_runs(
    base_df: pd.DataFrame, aligned_df: pd.DataFrame, cfg: CompareConfig | None = None
) -> Comparison:
    """Compare two runs (base, aligned) item by item on the same BBQ items.

    Args:
        base_df: Base-model predictions joined with BBQ (:func:`join_with_bbq`).
        aligned_df: Aligned-model predictions joined with BBQ.
        cfg: Options; defaults to :class:`CompareConfig`.

    Returns:
        The comparison: a strata table with one row per stratum at every level of
        ``cfg.by`` (finest first, ending with the overall row), Simpson's-paradox
        flags and a summary.

    Raises:
        DataError: missing columns, duplicate keys, ``pred_index`` out of range,
            different item sets (unless ``cfg.intersect``), item attributes that
            disagree between the runs.
        ConfigError: unknown target categories, or targets absent from the data.

    Notes:
        Each stratum is a paired 2x2 table: ``b`` items only the base run gets
        right, ``c`` items only the aligned run gets right. The McNemar-family
        test is run on ``(b, c)``; the rows of one level form one family for the
        multiple-testing correction (the finest level, e.g. 22 category x context
        cells, is the primary family). ``delta_accuracy`` has Newcombe's paired
        interval; ``odds_ratio = b / c`` an exact conditional interval; bias
        scores and their differences come from the same counts as
        :func:`compute_metrics`, with percentile bootstrap intervals when
        ``cfg.bootstrap > 0``.

    References:
        McNemar, Psychometrika 12:153-157 (1947); Fagerland, Lydersen & Laake,
        BMC Med Res Methodol 13:91 (2013); Newcombe, Stat Med 17:2635-2650
        (1998); Holm, Scand J Stat 6:65-70 (1979); Benjamini & Hochberg, JRSS B
        57:289-300 (1995); Parrish et al., Findings of ACL 2022.
    """
    cfg = cfg or CompareConfig()
    b, a, dropped = _pair(base_df, aligned_df, cfg.intersect)
    by = cfg.by
    cell_keys = tuple(k for k in KEY_ORDER if k in by or k == "context_condition")
    cells = make_cells(b, cell_keys)
    stats = _pair_stats(b, a)
    sums = np.stack([cells.sums(stats[:, j]) for j in range(stats.shape[1])], axis=1)
    boot = _bootstrap(b, stats, cells, cfg)
    specs = row_specs(cells, by)
    records = []
    for spec in specs:
        rep = boot[:, spec.cells, :].sum(axis=1) if boot is not None else None
        records.append(_row_record(spec, sums[spec.cells].sum(axis=0), cfg, by, rep))
    _adjust(records, specs, cfg)
    finest = tuple(by)
    flags = simpson_flags(records, specs, finest, by, cfg)
    rows = [_typed(rec) for rec in records]
    summary = _summary(records, specs, finest, by, cfg, dropped, b, cells, sums)
    summary["n_flags"] = {
        "masking": sum(f.kind == "masking" for f in flags),
        "reversal": sum(f.kind == "reversal" for f in flags),
    }
    return Comparison(rows=rows, flags=flags, summary=summary, config=cfg)


def _typed(rec: Mapping[str, Any]) -> StratumRecord:
    values = dict(rec)
    values.setdefault("question_polarity", None)
    values.setdefault("label_type", None)
    values["flags"] = tuple(values["flags"])
    return StratumRecord(**values)


def _bootstrap(
    b: pd.DataFrame, stats: np.ndarray, cells: Cells, cfg: CompareConfig
) -> np.ndarray | None:
    if cfg.bootstrap <= 0:
        return None
    if cfg.cluster == "template":
        if "question_index" not in b.columns:
            raise DataError(
                "--cluster template needs the 'question_index' column (join with BBQ first)"
            )
        group = pd.factorize(b["category"])[0]
        cluster = b["question_index"].to_numpy(dtype=np.int64)
        return bootstrap_cell_sums(
            stats,
            cells.item_cell,
            cells.count,
            replicates=cfg.bootstrap,
            seed=cfg.seed,
            cluster="template",
            item_group=group,
            item_cluster=cluster,
        )
    return bootstrap_cell_sums(
        stats, cells.item_cell, cells.count, replicates=cfg.bootstrap, seed=cfg.seed
    )


def _adjust(records: list[dict[str, Any]], specs: Sequence[RowSpec], cfg: CompareConfig) -> None:
    families: dict[tuple[str, ...], list[int]] = {}
    for i, spec in enumerate(specs):
        families.setdefault(spec.level, []).append(i)
    for members in families.values():
        adjusted, reject = adjust_pvalues(
            [records[i]["p_value"] for i in members], cfg.correction, cfg.alpha
        )
        for j, i in enumerate(members):
            rec = records[i]
            rec["p_adjusted"] = float(adjusted[j])
            rec["family_size"] = len(members)
            rec["significant"] = bool(reject[j])
            if reject[j] and rec["delta_accuracy"] < 0:
                rec["flags"].append(FLAG_DEGRADATION)
            elif reject[j] and rec["delta_accuracy"] > 0:
                rec["flags"].append(FLAG_IMPROVEMENT)


def _brief(r: Mapping[str, Any], by: Sequence[str]) -> dict[str, Any]:
    out = keys_of(r, by)
    out.update(
        n=r["n"],
        delta_accuracy=r["delta_accuracy"],
        p_adjusted=r["p_adjusted"],
        delta_bias_score=r["delta_bias_score"],
    )
    return out


def _split(rows: Sequence[Mapping[str, Any]], by: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    return {
        "improvements": [_brief(r, by) for r in rows if FLAG_IMPROVEMENT in r["flags"]],
        "degradations": [_brief(r, by) for r in rows if FLAG_DEGRADATION in r["flags"]],
    }


def _summary(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    finest: tuple[str, ...],
    by: Sequence[str],
    cfg: CompareConfig,
    dropped: dict[str, Any],
    items: pd.DataFrame,
    cells: Cells,
    sums: np.ndarray,
) -> dict[str, Any]:
    fine = [r for r, s in zip(records, specs, strict=True) if s.level == finest]
    overall = records[-1]
    contexts = [c for c in CONTEXTS if any(r["context_condition"] == c for r in fine)]
    summary: dict[str, Any] = {
        "n_items": overall["n"],
        "dropped": dropped,
        "test": resolve_test(cfg.test),
        "correction": cfg.correction,
        "alpha": cfg.alpha,
        "family": level_name(finest),
        "family_size": len(fine),
        "overall": _brief(overall, by),
        "significant": _split(fine, by),
        "by_context": {
            c: _split([r for r in fine if r["context_condition"] == c], by) for c in contexts
        },
    }
    if cfg.targets:
        summary["spillover"] = _spillover(fine, contexts, cfg, items, cells, sums)
    return summary


def _spillover(
    fine: Sequence[Mapping[str, Any]],
    contexts: Sequence[str],
    cfg: CompareConfig,
    items: pd.DataFrame,
    cells: Cells,
    sums: np.ndarray,
) -> dict[str, Any]:
    """The target and untargeted categories, pooled per context and with their changes."""
    assert cfg.targets is not None
    present = set(items["category"].unique())
    absent = [t for t in cfg.targets if t not in present]
    if absent:
        raise ConfigError(
            f"target categor{'y' if len(absent) == 1 else 'ies'} "
            f"{', '.join(absent)} not among the compared items"
        )
    untargeted = [c for c in dict.fromkeys(items["category"]) if c not in cfg.targets]
    cat = cells.keys["category"].to_numpy()
    ctx = cells.keys["context_condition"].to_numpy()
    pooled_keys = (
        "n", "b", "c", "acc_base", "acc_aligned", "delta_accuracy", "delta_accuracy_ci_low",
        "delta_accuracy_ci_high", "test", "p_value", "bias_score_base", "bias_score_aligned",
        "delta_bias_score",
    )  # fmt: skip
    groups: dict[str, Any] = {}
    for group, members in (("target", list(cfg.targets)), ("untargeted", untargeted)):
        in_group = np.isin(cat, members)
        per: dict[str, Any] = {}
        for c in [*contexts, ALL]:
            idx = np.flatnonzero(in_group & ((ctx == c) | (c == ALL)))
            if idx.size == 0:
                continue
            spec = RowSpec((), {"category": ALL, "context_condition": c}, idx)
            rec = _row_record(spec, sums[idx].sum(axis=0), cfg, ("context_condition",), None)
            rows = [
                r
                for r in fine
                if r["category"] in members and (c == ALL or r["context_condition"] == c)
            ]
            per[c] = {"pooled": {k: rec[k] for k in pooled_keys}, **_split(rows, cfg.by)}
        groups[group] = {"categories": members, "by_context": per}
    return {
        **groups,
        "note": "pooled rows give raw p-values (not part of any corrected family); "
        "improvements/degradations are the primary family's corrected results",
    }


def load_and_compare(
    base_path: str | os.PathLike[str],
    aligned_path: str | os.PathLike[str],
    bbq: BBQData,
    cfg: CompareConfig | None = None,
) -> Comparison:
    """Read two prediction files, join them with BBQ and compare them.

    Args:
        base_path: Predictions of the base model (Parquet, CSV or JSONL).
        aligned_path: Predictions of the aligned model.
        bbq: Loaded BBQ; its warnings are carried into the result.
        cfg: Options; defaults to :class:`CompareConfig`.

    Returns:
        The :class:`Comparison`, with ``warnings`` holding BBQ's warnings and any
        notes made while reading (e.g. which permutation was used).

    Raises:
        DataError: unreadable or malformed files, unknown items, mismatched runs.
        ConfigError: bad options.
    """
    cfg = cfg or CompareConfig()
    base = read_predictions(base_path, permutation=cfg.permutation)
    aligned = read_predictions(aligned_path, permutation=cfg.permutation)
    jb = join_with_bbq(base, bbq)
    ja = join_with_bbq(aligned, bbq)
    result = compare_runs(jb, ja, cfg)
    result.warnings = [*bbq.warnings, *jb.attrs["notes"], *ja.attrs["notes"]]
    return result
