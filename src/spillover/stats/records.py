"""The typed results of a comparison: one record per stratum, flags, and the whole comparison.

These are the stats -> report contract: :meth:`Comparison.to_json` writes
``comparison.json`` and :meth:`Comparison.from_json` reads it back (the report stage
reads nothing else of a comparison). Field meanings are documented once, here, and in
``docs/stats.md`` ("Output schemas").
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._io import json_safe
from ..errors import ConfigError, DataError
from .config import CompareConfig

FLAG_IMPROVEMENT = "significant_improvement"
FLAG_DEGRADATION = "significant_degradation"
FLAG_MASKING = "masking"
FLAG_REVERSAL = "reversal"
FLAG_OVER_ABSTENTION = "over_abstention"
FLAG_ITEM_LEVEL_ONLY = "item_level_only"
FLAG_LOW_SUPPORT = "low_support"

MIN_BIAS_SUPPORT = 10
"""Fewest non-unknown answers (on each side) a bias score may rest on before it is marked
low-support and never starred: with fewer, one answer moves s_DIS by 20 points or more."""

_SPLIT_KEYS = ("question_polarity", "label_type")
"""Stratification keys a record carries only when the comparison is split by them."""


@dataclass(frozen=True, slots=True)
class StratumRecord:
    """One stratum of a comparison: its paired 2x2 table, test, effects and bias scores.

    Accuracy values are proportions; bias scores are x100. ``None`` means undefined
    (never a silent 0); ``note`` says why.
    """

    level: str
    """The keys this row is split by, joined with ``+`` (``overall`` for the pooled row)."""
    category: str
    """BBQ category, or ``all``."""
    context_condition: str
    """``ambig``, ``disambig`` or ``all``."""
    question_polarity: str | None
    """``neg``, ``nonneg`` or ``all`` when split by polarity; None otherwise."""
    label_type: str | None
    """``name``, ``label`` or ``all`` when split by label type; None otherwise."""
    n: int
    """Paired items."""
    n_both_correct: int
    """Items both runs answer correctly."""
    b: int
    """Items only the base run answers correctly."""
    c: int
    """Items only the aligned run answers correctly."""
    n_both_wrong: int
    """Items neither run answers correctly."""
    acc_base: float
    """Base accuracy."""
    acc_aligned: float
    """Aligned accuracy."""
    delta_accuracy: float
    """``acc_aligned - acc_base = (c - b) / n``."""
    delta_accuracy_ci_low: float
    """Lower limit of the default interval of ``delta_accuracy`` (``ci_method``)."""
    delta_accuracy_ci_high: float
    """Upper limit of that interval."""
    ci_method: str
    """``cluster-signflip`` (scenario- or template-clustered) or ``newcombe-10`` (items)."""
    delta_accuracy_newcombe_low: float
    """Lower limit of Newcombe's item-level paired interval (method 10)."""
    delta_accuracy_newcombe_high: float
    """Upper limit of Newcombe's interval."""
    test: str
    """The test behind ``p_value``: ``signflip`` (clustered) or an item-level McNemar variant."""
    statistic: float
    """Its statistic (``c - b`` for signflip, ``min(b, c)`` for exact/mid-p, chi-square)."""
    p_value: float
    """Raw two-sided p-value of ``test``."""
    p_adjusted: float | None
    """``p_value`` adjusted within the row's family (``correction``)."""
    correction: str
    """Multiple-testing correction of the adjusted p-values."""
    family: str
    """The family the row was corrected in (its level)."""
    family_size: int | None
    """Number of tests in that family."""
    significant: bool | None
    """``p_adjusted`` below alpha (the correction's own decision)."""
    p_value_item: float
    """Item-level mid-p McNemar p-value (the paper's analysis), always."""
    p_adjusted_item: float | None
    """``p_value_item`` adjusted within the family."""
    significant_item: bool | None
    """The item-level verdict after correction."""
    p_value_clustered: float | None
    """Clustered sign-flip mid-p p-value; None with ``cluster`` item."""
    p_adjusted_clustered: float | None
    """``p_value_clustered`` adjusted within the family."""
    significant_clustered: bool | None
    """The clustered verdict after correction."""
    cluster_unit: str
    """What the clustered statistics treat as independent: scenario, template or item."""
    n_clusters: int
    """Clusters (scenarios, templates or items) with at least one of the row's items."""
    n_informative_clusters: int
    """Clusters whose items changed on balance (``c_s != b_s``)."""
    mdc_accuracy: float | None
    """Smallest accuracy change (proportion) the clustered test detects with 80 % power
    at the family's first correction step (finest rows only)."""
    odds_ratio: float | None
    """Discordant-pair odds ratio ``b / c``; None when infinite or undefined."""
    odds_ratio_ci_low: float | None
    """Lower exact limit of the odds ratio."""
    odds_ratio_ci_high: float | None
    """Upper exact limit (None when unbounded)."""
    unknown_rate_base: float
    """Share of base answers that are the "unknown" option."""
    unknown_rate_aligned: float
    """Share of aligned answers that are the "unknown" option."""
    delta_unknown_rate: float
    """``unknown_rate_aligned - unknown_rate_base``."""
    delta_unknown_ci_low: float
    """Lower limit of its interval (same method as ``ci_method``)."""
    delta_unknown_ci_high: float
    """Upper limit."""
    p_value_unknown: float
    """Two-sided p-value of the unknown-rate change (same test family as ``p_value``)."""
    p_adjusted_unknown: float | None
    """``p_value_unknown`` adjusted within the family."""
    significant_unknown: bool | None
    """The unknown-rate change is significant after correction."""
    n_target: int
    """Items with a known biased answer (the bias scores' items)."""
    n_non_unknown_base: int
    """Of those, base answers other than "unknown" (the bias score's denominator)."""
    n_non_unknown_aligned: int
    """Aligned answers other than "unknown" among them."""
    bias_low_support: bool
    """A bias score rests on fewer than ``MIN_BIAS_SUPPORT`` non-unknown answers."""
    bias_score_base: float | None
    """Base bias score (s_AMB or s_DIS by context; None for rows mixing contexts)."""
    bias_score_aligned: float | None
    """Aligned bias score."""
    delta_bias_score: float | None
    """Aligned minus base bias score."""
    delta_bias_score_ci_low: float | None
    """Lower bootstrap limit of ``delta_bias_score`` (clusters resampled; None without)."""
    delta_bias_score_ci_high: float | None
    """Upper bootstrap limit."""
    delta_accuracy_boot_ci_low: float | None
    """Lower bootstrap limit of ``delta_accuracy`` (None without bootstrap)."""
    delta_accuracy_boot_ci_high: float | None
    """Upper bootstrap limit."""
    heterogeneity_q: float | None
    """Aggregate rows: Q of equal accuracy changes across the finest strata under it."""
    heterogeneity_df: int | None
    """Its degrees of freedom (strata minus one)."""
    heterogeneity_p: float | None
    """Its p-value (wild cluster bootstrap)."""
    flags: tuple[str, ...]
    """``significant_degradation`` / ``significant_improvement``, ``item_level_only``,
    ``over_abstention``, ``low_support``, ``masking``, ``reversal``."""
    note: str | None
    """Why a value is undefined or special, joined with ``; ``."""

    def to_dict(self) -> dict[str, Any]:
        """The record as written to ``comparison.json`` (split keys only when used)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SPLIT_KEYS and value is None:
                continue
            out[f.name] = list(value) if f.name == "flags" else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> StratumRecord:
        """A record from its JSON form; ``where`` names it in errors.

        Raises:
            DataError: a field is missing or has the wrong type.
        """
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            kind = _FIELD_TYPES[f.name]
            if f.name not in data:
                if f.name in _SPLIT_KEYS:
                    values[f.name] = None
                    continue
                raise DataError(f"{where}.{f.name} is missing; expected {kind}")
            values[f.name] = _checked(data[f.name], kind, f"{where}.{f.name}")
        values["flags"] = tuple(values["flags"])
        return cls(**values)


_FIELD_TYPES: dict[str, str] = dict(StratumRecord.__annotations__)
"""Each field's type as written (``int``, ``float | None``, ``tuple[str, ...]``, ...)."""


def _checked(value: Any, kind: str, where: str) -> Any:
    """``value`` if it fits the type named ``kind`` (``int | None``, ``tuple[str, ...]``, ...)."""
    optional = "None" in kind
    if value is None:
        if optional:
            return None
        raise DataError(f"{where} is null; expected {kind}")
    if "tuple" in kind:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise DataError(f"{where} is {value!r}; expected {kind}")
    return float(value) if kind.startswith("float") else value


@dataclass(frozen=True)
class Flag:
    """A finding the report leads with: an aggregate whose change disagrees with the strata
    under it (Simpson's paradox), or over-abstention."""

    kind: str
    """``masking``: the aggregate shows no significant loss of accuracy while strata under
    it lose significantly; ``reversal``: the aggregate's s_DIS change (its interval
    excluding 0) has the opposite sign to every defined change of its strata;
    ``over_abstention``: the unknown rate rises significantly in disambiguated contexts."""
    metric: str
    """Metric concerned: ``accuracy``, ``bias_score`` or ``unknown_rate``."""
    aggregate: dict[str, str]
    """Keys of the aggregate row (``"all"`` where not split)."""
    aggregate_n: int
    """Items in the aggregate."""
    aggregate_delta: float
    """Aligned minus base, for the aggregate (accuracy as a proportion; bias x100)."""
    strata: tuple[dict[str, Any], ...]
    """The disagreeing strata: keys, ``n``, ``weight``, ``delta`` and counts."""
    scope: str
    """``any`` (masking: at least one stratum), ``all`` (reversal) or ``row``."""
    weight_share: float
    """Share of the aggregate's weight carried by the disagreeing strata."""
    aggregate_ci: tuple[float | None, float | None] | None
    """Interval of ``aggregate_delta`` (the default interval for accuracy and the unknown
    rate, the cluster bootstrap for bias scores)."""
    heterogeneity_p: float | None
    """p-value of equal accuracy changes across the strata under the aggregate."""
    message: str
    """The flag in one sentence."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        out = dataclasses.asdict(self)
        out["strata"] = [dict(s) for s in self.strata]
        out["explanation"] = self.message  # the key report readers look for
        return json_safe(out)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> Flag:
        """A flag from its JSON form.

        Raises:
            DataError: a field is missing or has the wrong type.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)}")
        values = {n: data[n] for n in names}
        if not isinstance(values["strata"], list) or not all(
            isinstance(s, Mapping) for s in values["strata"]
        ):
            raise DataError(f"{where}.strata is not a list of objects")
        if not isinstance(values["aggregate"], Mapping):
            raise DataError(f"{where}.aggregate is not an object")
        values["strata"] = tuple(dict(s) for s in values["strata"])
        values["aggregate"] = {str(k): str(v) for k, v in values["aggregate"].items()}
        ci = values["aggregate_ci"]
        values["aggregate_ci"] = tuple(ci) if isinstance(ci, list) else None
        for key in ("kind", "metric", "scope", "message"):
            if not isinstance(values[key], str):
                raise DataError(f"{where}.{key} is {values[key]!r}; expected a string")
        return cls(**values)


WARNINGS_COLUMN = "warnings"
"""Last column of :meth:`Comparison.to_csv` (``compare --csv``, ``stats/comparison.csv``)."""
WARNINGS_SEPARATOR = " | "
"""How :data:`WARNINGS_COLUMN` joins several warnings."""


@dataclass
class Comparison:
    """Result of :func:`~spillover.stats.compare_runs`."""

    rows: list[StratumRecord]
    """One record per stratum at every level (finest first)."""
    flags: list[Flag]
    """Simpson's-paradox flags (masking, reversal)."""
    summary: dict[str, Any]
    """Counts, significant changes per context, the target/untargeted split."""
    config: CompareConfig = field(default_factory=CompareConfig)
    """The options used."""
    warnings: list[str] = field(default_factory=list)
    """Data warnings (unverified BBQ files, permutation choice, ...)."""

    @property
    def strata(self) -> Any:
        """The records as a pandas DataFrame, one row per stratum."""
        import pandas as pd

        return pd.DataFrame.from_records([r.to_dict() for r in self.rows])

    def records(self) -> list[dict[str, Any]]:
        """Strata as JSON-safe records."""
        return [json_safe(r.to_dict()) for r in self.rows]

    def to_json(self) -> dict[str, Any]:
        """``{"strata", "flags", "summary", "warnings", "config"}``, strict JSON (no NaN)."""
        return {
            "strata": self.records(),
            "flags": [f.to_dict() for f in self.flags],
            "summary": json_safe(self.summary),
            "warnings": list(self.warnings),
            "config": json_safe(self.config.to_dict()),
        }

    @classmethod
    def from_json(cls, obj: Any, source: str = "comparison") -> Comparison:
        """A comparison from the content of ``comparison.json``; ``source`` names it in errors.

        Raises:
            DataError: the content is not shaped like :meth:`to_json`'s output.
        """
        if not isinstance(obj, Mapping):
            raise DataError(f"{source}: top level is {type(obj).__name__}; expected an object")
        strata = obj.get("strata")
        if not isinstance(strata, list):
            raise DataError(f"{source}: `strata` is missing or not a list")
        rows = []
        for i, rec in enumerate(strata):
            where = f"{source}: strata[{i}]"
            if not isinstance(rec, Mapping):
                raise DataError(f"{where} is {type(rec).__name__}; expected an object")
            for key in ("category", "context_condition"):
                if not isinstance(rec.get(key), str):
                    raise DataError(f"{where}.{key} is {rec.get(key)!r}; expected a string")
            rows.append(StratumRecord.from_dict(rec, where))
        flags_raw = obj.get("flags", [])
        if not isinstance(flags_raw, list):
            raise DataError(f"{source}: `flags` is {type(flags_raw).__name__}; expected a list")
        flags = [Flag.from_dict(f, f"{source}: flags[{i}]") for i, f in enumerate(flags_raw)]
        summary = obj.get("summary", {})
        warnings = obj.get("warnings", [])
        config = obj.get("config", {})
        if not isinstance(summary, Mapping) or not isinstance(config, Mapping):
            raise DataError(f"{source}: `summary` and `config` must be objects")
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise DataError(f"{source}: `warnings` must be a list of strings")
        try:
            cfg = CompareConfig.from_dict(dict(config))
        except (ConfigError, TypeError, ValueError) as exc:
            raise DataError(f"{source}: `config` is not a comparison config ({exc})") from None
        return cls(rows, flags, dict(summary), cfg, list(warnings))

    def to_csv(self) -> str:
        """The strata table as CSV text (flags joined with ``;``), with a last
        :data:`WARNINGS_COLUMN`: the comparison's warnings (unverified BBQ files, the
        permutation used, ...) joined with :data:`WARNINGS_SEPARATOR`, the same on every
        row (empty when there are none). A column, not a ``#`` comment line, because
        ``pandas.read_csv(comment="#")`` would also cut fields holding ``#``."""
        df = self.strata
        df["flags"] = df["flags"].map(lambda v: ";".join(v))
        df[WARNINGS_COLUMN] = WARNINGS_SEPARATOR.join(" ".join(w.split()) for w in self.warnings)
        buf = io.StringIO()
        df.to_csv(buf, index=False)
        return buf.getvalue()


def rows_at(rows: Sequence[StratumRecord], level: str) -> list[StratumRecord]:
    """The records of one level (e.g. ``category+context_condition``)."""
    return [r for r in rows if r.level == level]
