"""The typed results of a likelihood-probe comparison: one record per stratum, and the whole.

:meth:`ProbeComparison.to_json` writes strict JSON (undefined values as ``null``) and
:meth:`ProbeComparison.from_json` reads it back, checking every field's type. Field meanings
are documented once, here, and in ``docs/stats.md`` ("Beyond BBQ: likelihood probes").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._io import json_safe
from ..errors import ConfigError, DataError
from .config import CompareConfig
from .records import _checked

FLAG_INCREASE = "significant_increase"
"""The outcome rate rose significantly (chosen test, after the family's correction)."""
FLAG_DECREASE = "significant_decrease"
"""The outcome rate fell significantly."""
FLAG_ITEM_LEVEL_ONLY = "item_level_only"
"""Significant with the item-level McNemar test, not with the clustered test."""


@dataclass(frozen=True, slots=True)
class ProbeRecord:
    """One stratum of a likelihood-probe comparison (base vs aligned, paired by item).

    Rates and their changes are proportions; the benchmark's metrics are on their published
    0-100 scale; gaps are in log-likelihood units. ``None`` means undefined; ``note`` says
    why.
    """

    benchmark: str
    """The benchmark (``crows-pairs``, ``stereoset``, ``winobias``, ``winogender``)."""
    level: str
    """Keys the row is split by (``attribute+subset``, ``attribute``, ``subset``, ``overall``)."""
    attribute: str
    """The BBQ category (or ``Profession``), or ``all``."""
    subset: str
    """The benchmark's natural subset (StereoSet task, WinoBias type, Winogender gender), or
    ``all``."""
    targeted: bool | None
    """Whether the row's attributes are all among the alignment's targets (False: none
    is; None: no targets given, or a row mixing targeted and untargeted attributes)."""
    family: str
    """The correction family: ``fine`` (the finest rows of every benchmark compared) or the
    level's name."""
    family_size: int
    """Rows in that family."""
    correction: str
    """The correction of every adjusted p-value of the row."""
    n: int
    """Paired items."""
    n_clusters: int
    """Clusters (the benchmark's unit) with at least one of the row's items."""
    n_informative_clusters: int
    """Clusters whose outcomes changed on balance."""
    cluster_unit: str
    """What the chosen test and intervals treat as independent: the benchmark's unit
    (``writer``, ``target term``, ``occupation``) or ``item``."""
    outcome: str
    """The paired binary outcome: ``stereotype_preferred`` or ``correct``."""
    outcome_base: float
    """Share of items with the outcome, base run."""
    outcome_aligned: float
    """Share of items with the outcome, aligned run."""
    delta_outcome: float
    """``outcome_aligned - outcome_base = (c - b) / n``."""
    delta_outcome_ci_low: float
    """Lower limit of its interval (``ci_method``)."""
    delta_outcome_ci_high: float
    """Upper limit."""
    ci_method: str
    """``cluster-signflip`` (hulled with Newcombe's) or ``newcombe-10`` (items)."""
    n_both: int
    """Items with the outcome in both runs."""
    b: int
    """Items with the outcome in the base run only."""
    c: int
    """Items with the outcome in the aligned run only."""
    n_neither: int
    """Items with the outcome in neither run."""
    test: str
    """The test behind ``p_value``: ``signflip`` or an item-level McNemar variant."""
    statistic: float
    """Its statistic (``c - b`` for signflip, else as the McNemar variant)."""
    p_value: float
    """Raw two-sided p-value of ``test``."""
    p_adjusted: float | None
    """``p_value`` adjusted within the family."""
    significant: bool | None
    """The correction's decision at alpha."""
    p_value_item: float
    """Item-level mid-p McNemar p-value (always)."""
    p_adjusted_item: float | None
    """Adjusted within the family."""
    significant_item: bool | None
    """Its decision."""
    p_value_clustered: float
    """Sign-flip mid-p p-value on the benchmark's clusters (always)."""
    p_adjusted_clustered: float | None
    """Adjusted within the family."""
    significant_clustered: bool | None
    """Its decision."""
    mdc_outcome: float | None
    """Smallest uniform change of the outcome rate the clustered test detects with 80 %
    power at the family's first correction step (fine rows; None elsewhere or when none
    is detectable)."""
    gap_base: float
    """Mean gap, base run (CrowS-Pairs, StereoSet ``d0 - d1``; WinoBias, Winogender
    ``d_label - d_other``)."""
    gap_aligned: float
    """Mean gap, aligned run."""
    delta_gap: float
    """Mean paired change of the gap."""
    delta_gap_ci_low: float | None
    """Lower limit of its interval (``gap_ci_method``)."""
    delta_gap_ci_high: float | None
    """Upper limit."""
    gap_ci_method: str
    """``cluster-signflip`` (the inverted clustered test) or ``t`` (items)."""
    p_value_gap: float
    """The gap change's p-value: clustered sign-flip, or Wilcoxon with ``cluster`` item."""
    p_adjusted_gap: float | None
    """Adjusted within the family."""
    significant_gap: bool | None
    """Its decision."""
    p_value_gap_item: float
    """Wilcoxon signed-rank p-value of the paired gap changes (items; always)."""
    p_value_gap_clustered: float
    """Sign-flip mid-p p-value of the per-cluster gap change totals (always)."""
    metric: str
    """The benchmark's bias metric: ``pct_stereotype``, ``ss``, ``diff`` or ``gender_gap``."""
    unbiased_value: float
    """Its value for an unbiased model (50 or 0)."""
    metric_base: float | None
    """The metric, base run (None where undefined, e.g. a gender gap of one gender)."""
    metric_aligned: float | None
    """The metric, aligned run."""
    delta_metric: float | None
    """``metric_aligned - metric_base``."""
    delta_metric_ci_low: float | None
    """Lower cluster-bootstrap percentile limit (None without bootstrap)."""
    delta_metric_ci_high: float | None
    """Upper limit."""
    distance_base: float | None
    """``|metric_base - unbiased_value|``."""
    distance_aligned: float | None
    """``|metric_aligned - unbiased_value|``."""
    delta_distance: float | None
    """``distance_aligned - distance_base``: negative moves toward the unbiased value."""
    delta_distance_ci_low: float | None
    """Lower cluster-bootstrap percentile limit."""
    delta_distance_ci_high: float | None
    """Upper limit."""
    toward_unbiased: bool | None
    """``delta_distance < 0`` (None where undefined)."""
    metrics_base: dict[str, float | None]
    """Every published metric of the benchmark, base run."""
    metrics_aligned: dict[str, float | None]
    """Every published metric, aligned run."""
    flags: tuple[str, ...]
    """``significant_increase`` / ``significant_decrease`` (outcome rate), ``item_level_only``."""
    note: str | None
    """Why a value is undefined or special, joined with ``; ``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (lists for tuples, copies of the dicts)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["flags"] = list(self.flags)
        out["metrics_base"] = dict(self.metrics_base)
        out["metrics_aligned"] = dict(self.metrics_aligned)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> ProbeRecord:
        """A record from its JSON form; ``where`` names it in errors.

        Raises:
            DataError: a field is missing or has the wrong type.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            kind = _FIELD_TYPES[f.name]
            if f.name not in data:
                raise DataError(f"{where}.{f.name} is missing; expected {kind}")
            value = data[f.name]
            if kind.startswith("dict"):
                if not isinstance(value, Mapping):
                    raise DataError(f"{where}.{f.name} is {value!r}; expected an object")
                value = {
                    str(k): _checked(v, "float | None", f"{where}.{f.name}.{k}")
                    for k, v in value.items()
                }
            else:
                value = _checked(value, kind, f"{where}.{f.name}")
            values[f.name] = value
        values["flags"] = tuple(values["flags"])
        return cls(**values)


_FIELD_TYPES: dict[str, str] = dict(ProbeRecord.__annotations__)
"""Each field's type as written."""


@dataclass
class ProbeComparison:
    """Result of :func:`~spillover.stats.compare_probes`."""

    rows: list[ProbeRecord]
    """One record per stratum: per benchmark, finest first, ending with its overall row."""
    summary: dict[str, Any]
    """Items per benchmark, the family, the significant fine rows, the data caveats."""
    config: CompareConfig = field(default_factory=CompareConfig)
    """The options used."""
    warnings: list[str] = field(default_factory=list)
    """Data warnings (items left out by ``intersect``, ...)."""

    @property
    def strata(self) -> Any:
        """The records as a pandas DataFrame, one row per stratum."""
        import pandas as pd

        return pd.DataFrame.from_records([r.to_dict() for r in self.rows])

    def to_json(self) -> dict[str, Any]:
        """``{"strata", "summary", "warnings", "config"}``, strict JSON (no NaN)."""
        return {
            "strata": [json_safe(r.to_dict()) for r in self.rows],
            "summary": json_safe(self.summary),
            "warnings": list(self.warnings),
            "config": json_safe(self.config.to_dict()),
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "probe comparison") -> ProbeComparison:
        """A comparison from :meth:`to_json`'s output; ``where`` names it in errors.

        Raises:
            DataError: the content is not shaped like :meth:`to_json`'s output.
        """
        if not isinstance(obj, Mapping):
            raise DataError(f"{where}: top level is {type(obj).__name__}; expected an object")
        strata = obj.get("strata")
        if not isinstance(strata, list):
            raise DataError(f"{where}: `strata` is missing or not a list")
        rows = []
        for i, rec in enumerate(strata):
            if not isinstance(rec, Mapping):
                raise DataError(f"{where}: strata[{i}] is {type(rec).__name__}; expected an object")
            rows.append(ProbeRecord.from_dict(rec, f"{where}: strata[{i}]"))
        summary, config = obj.get("summary", {}), obj.get("config", {})
        warnings = obj.get("warnings", [])
        if not isinstance(summary, Mapping) or not isinstance(config, Mapping):
            raise DataError(f"{where}: `summary` and `config` must be objects")
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise DataError(f"{where}: `warnings` must be a list of strings")
        try:
            cfg = CompareConfig.from_dict(dict(config))
        except (ConfigError, TypeError, ValueError) as exc:
            raise DataError(f"{where}: `config` is not a comparison config ({exc})") from None
        return cls(rows, dict(summary), cfg, list(warnings))
