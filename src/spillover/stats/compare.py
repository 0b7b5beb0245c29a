"""Paired comparison of two runs on the same BBQ items: tests, corrections, effects, summary."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..data import CONTEXTS
from ..errors import ConfigError, DataError
from ..predictions import BBQ, check_joined
from .bootstrap import bootstrap_cell_sums
from .config import CompareConfig
from .flags import keys_of, simpson_flags
from .keys import ALL, KEY_ORDER, level_name
from .metrics import Cells, RowSpec, make_cells, row_specs
from .records import (
    FLAG_DEGRADATION,
    FLAG_IMPROVEMENT,
    FLAG_ITEM_LEVEL_ONLY,
    FLAG_LOW_SUPPORT,
    Comparison,
    StratumRecord,
)
from .rows import Panel, fine_row_power, heterogeneity_fields, pair_stats, row_record
from .tests import adjust_pvalues

logger = logging.getLogger(__name__)


def _name(df: pd.DataFrame, default: str) -> str:
    src = df.attrs.get("source")
    return f"{default} ({src})" if src else default


def _pair(
    base: pd.DataFrame, aligned: pd.DataFrame, intersect: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    bname, aname = _name(base, "BASE"), _name(aligned, "ALIGNED")
    b = check_joined(base, bname)
    a = check_joined(aligned, aname)
    b = b.sort_values(list(BBQ.key), kind="stable").reset_index(drop=True)
    a = a.sort_values(list(BBQ.key), kind="stable").reset_index(drop=True)
    bkeys = pd.MultiIndex.from_frame(b[list(BBQ.key)])
    akeys = pd.MultiIndex.from_frame(a[list(BBQ.key)])
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


def _clusters(b: pd.DataFrame, cfg: CompareConfig) -> tuple[np.ndarray, str | None]:
    """The cluster index (0..G-1) of every item and the unit: the configured scenario or
    template; with ``cluster`` item, scenarios where the frame has them (for the clustered
    verdict beside the item-level one), else each item alone (unit None)."""
    unit: str | None = cfg.cluster
    if not cfg.clustered:
        unit = "scenario" if "scenario" in b.columns else None
    if unit is None:
        return np.arange(len(b), dtype=np.int64), None
    column = "scenario" if unit == "scenario" else "question_index"
    if column not in b.columns:
        raise DataError(
            f"cluster {cfg.cluster!r} needs the {column!r} column; join the predictions with "
            "BBQ first (join_with_bbq, or read them with compare_files)"
        )
    keys = pd.MultiIndex.from_arrays([b["category"], b[column].astype("int64")])
    return np.asarray(pd.factorize(keys)[0], dtype=np.int64), unit


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
        The comparison: one record per stratum at every level of ``cfg.by`` (finest
        first, ending with the overall row), flags and a summary.

    Raises:
        DataError: missing columns, duplicate keys, ``pred_index`` out of range,
            different item sets (unless ``cfg.intersect``), item attributes that
            disagree between the runs.
        ConfigError: unknown target categories, or targets absent from the data.

    Notes:
        Each stratum is a paired 2x2 table: ``b`` items only the base run gets right,
        ``c`` items only the aligned run gets right, ``delta_accuracy = (c - b) / n``.
        By default the test is the scenario-clustered sign-flip test on the per-scenario
        ``c_s - b_s`` and the interval its score interval (items of one scenario are not
        independent, see :mod:`spillover.stats.clustered`); the item-level mid-p McNemar
        test (the paper's analysis) and Newcombe's interval are reported beside them.
        The rows of one level form one family for the multiple-testing correction (the
        finest level, e.g. 22 category x context cells, is the primary family); each
        p-value (chosen, item-level, clustered, unknown rate) is corrected within it.
        ``odds_ratio = b / c`` has an exact conditional interval; bias scores and their
        differences come from the same counts as :func:`compute_metrics`, with cluster
        bootstrap intervals when ``cfg.bootstrap > 0``.

    References:
        McNemar, Psychometrika 12:153-157 (1947); Fagerland, Lydersen & Laake,
        BMC Med Res Methodol 13:91 (2013); Newcombe, Stat Med 17:2635-2650
        (1998); Durkalski et al., Stat Med 22:2417-2428 (2003); Holm, Scand J Stat
        6:65-70 (1979); Benjamini & Hochberg, JRSS B 57:289-300 (1995); Parrish et
        al., Findings of ACL 2022.
    """
    cfg = cfg or CompareConfig()
    b, a, dropped = _pair(base_df, aligned_df, cfg.intersect)
    by = cfg.by
    cells = make_cells(b, tuple(k for k in KEY_ORDER if k in by or k == "context_condition"))
    stats = pair_stats(b, a)
    cluster, unit = _clusters(b, cfg)
    panel = Panel.build(stats, cells, cluster, unit, _bootstrap(b, stats, cells, cluster, cfg))
    specs = row_specs(cells, by)
    finest = tuple(by)
    records = [row_record(s, panel, cfg, by, s.level == finest) for s in specs]
    _adjust(records, specs, cfg)
    _power_and_heterogeneity(records, specs, panel, finest, cfg)
    flags = simpson_flags(records, specs, finest, by, cfg)
    summary = _summary(records, specs, finest, by, cfg, dropped, b, cells, panel)
    summary["n_flags"] = {kind: sum(f.kind == kind for f in flags) for kind in _FLAG_KINDS}
    return Comparison(rows=[_typed(r) for r in records], flags=flags, summary=summary, config=cfg)


_FLAG_KINDS = ("masking", "reversal", "over_abstention")


def _typed(rec: Mapping[str, Any]) -> StratumRecord:
    values = dict(rec)
    values["flags"] = tuple(values["flags"])
    return StratumRecord(**values)


def _bootstrap(
    b: pd.DataFrame, stats: np.ndarray, cells: Cells, cluster: np.ndarray, cfg: CompareConfig
) -> np.ndarray | None:
    if cfg.bootstrap <= 0:
        return None
    if not cfg.clustered:
        return bootstrap_cell_sums(
            stats, cells.item_cell, cells.count, replicates=cfg.bootstrap, seed=cfg.seed
        )
    return bootstrap_cell_sums(
        stats,
        cells.item_cell,
        cells.count,
        replicates=cfg.bootstrap,
        seed=cfg.seed,
        cluster="template",  # whole clusters (scenarios or templates) within each category
        item_group=pd.factorize(b["category"])[0],
        item_cluster=cluster,
    )


_FAMILIES = (
    ("p_value", "p_adjusted", "significant"),
    ("p_value_item", "p_adjusted_item", "significant_item"),
    ("p_value_clustered", "p_adjusted_clustered", "significant_clustered"),
    ("p_value_unknown", "p_adjusted_unknown", "significant_unknown"),
)


def _adjust(records: list[dict[str, Any]], specs: Sequence[RowSpec], cfg: CompareConfig) -> None:
    """Correct each p-value within its level's family; set the significance flags."""
    families: dict[tuple[str, ...], list[int]] = {}
    for i, spec in enumerate(specs):
        families.setdefault(spec.level, []).append(i)
    for members in families.values():
        for raw, adjusted_key, decision in _FAMILIES:
            if records[members[0]][raw] is None:
                continue
            adjusted, reject = adjust_pvalues(
                [records[i][raw] for i in members], cfg.correction, cfg.alpha
            )
            for j, i in enumerate(members):
                records[i][adjusted_key] = float(adjusted[j])
                records[i][decision] = bool(reject[j])
        for i in members:
            rec = records[i]
            rec["family_size"] = len(members)
            if rec["significant"] and rec["delta_accuracy"] < 0:
                rec["flags"].append(FLAG_DEGRADATION)
            elif rec["significant"] and rec["delta_accuracy"] > 0:
                rec["flags"].append(FLAG_IMPROVEMENT)
            if rec["significant_item"] and rec["significant_clustered"] is False:
                rec["flags"].append(FLAG_ITEM_LEVEL_ONLY)
            if rec["bias_low_support"]:
                rec["flags"].append(FLAG_LOW_SUPPORT)


def _power_and_heterogeneity(
    records: list[dict[str, Any]],
    specs: Sequence[RowSpec],
    panel: Panel,
    finest: tuple[str, ...],
    cfg: CompareConfig,
) -> None:
    """Minimum detectable changes of the finest rows (at the family's first correction
    step) and, with clusters, heterogeneity of the strata under each aggregate."""
    fine = [j for j, s in enumerate(specs) if s.level == finest]
    step = cfg.alpha if cfg.correction == "none" else cfg.alpha / max(1, len(fine))
    for j in fine:
        fine_row_power(records[j], specs[j], panel, step)
    if panel.unit is None:
        return
    for i, spec in enumerate(specs):
        if spec.level == finest:
            continue
        cells = set(spec.cells.tolist())
        children = [specs[j] for j in fine if set(specs[j].cells.tolist()) <= cells]
        heterogeneity_fields(records[i], children, panel, cfg.seed)


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
    panel: Panel,
) -> dict[str, Any]:
    fine = [r for r, s in zip(records, specs, strict=True) if s.level == finest]
    overall = records[-1]
    contexts = [c for c in CONTEXTS if any(r["context_condition"] == c for r in fine)]
    summary: dict[str, Any] = {
        "n_items": overall["n"],
        "dropped": dropped,
        "test": cfg.resolved_test,
        "cluster": cfg.cluster,
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
        summary["spillover"] = _spillover(fine, contexts, cfg, items, cells, panel)
    return summary


def _spillover(
    fine: Sequence[Mapping[str, Any]],
    contexts: Sequence[str],
    cfg: CompareConfig,
    items: pd.DataFrame,
    cells: Cells,
    panel: Panel,
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
        "delta_accuracy_ci_high", "test", "p_value", "p_value_item", "delta_unknown_rate", "bias_score_base", "bias_score_aligned",
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
            rec = row_record(spec, panel, cfg, ("context_condition",), False)
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


def on_templates(df: pd.DataFrame, templates: Mapping[str, Collection[int]]) -> np.ndarray:
    """Which rows of a joined frame lie outside the listed categories or on their listed
    templates (``question_index``): the rows a held-out comparison keeps."""
    keys = zip(df["category"], df["question_index"].astype(int), strict=True)
    return np.array([c not in templates or q in templates[c] for c, q in keys], dtype=bool)


def keep_heldout(
    jb: pd.DataFrame, ja: pd.DataFrame, heldout_only: Mapping[str, Collection[int]]
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Both joined frames with each listed category kept on its listed templates only, and a
    note per category on how many of its items were left out."""
    kept = []
    for df in (jb, ja):
        part = df[on_templates(df, heldout_only)]
        part.attrs = dict(df.attrs)
        kept.append(part)
    dropped = jb[~on_templates(jb, heldout_only)]
    notes = [
        f"{n} {cat} item(s) on scenarios the aligned model was trained on are left out "
        "of this comparison (they are not evidence of generalisation)"
        for cat, n in dropped.groupby("category", sort=True).size().items()
    ]
    return kept[0], kept[1], notes
