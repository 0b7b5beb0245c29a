"""The comparison config: one object for the Python API, the run config and ``spillover compare``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._checks import check_choice, check_seed
from ..data import resolve_category
from ..errors import ConfigError
from .keys import DEFAULT_BY, normalize_by
from .tests import CORRECTIONS, TESTS

CLUSTER_UNITS: tuple[str, ...] = ("scenario", "template", "item")
"""Units the statistics treat as independent: BBQ scenarios (the default), templates, or
items (the paper's item-level analysis)."""
COMPARE_TESTS: tuple[str, ...] = ("auto", "signflip", *(t for t in TESTS if t != "auto"))
"""``auto``, the clustered ``signflip`` test, or an item-level McNemar variant."""
MIN_BOOTSTRAP = 100
"""Fewest bootstrap replicates accepted (besides 0, no bootstrap)."""
MAX_BOOTSTRAP = 100_000
"""Most bootstrap replicates accepted: each replicate keeps a few KiB of cell sums, so this
bounds the bootstrap's memory to a few hundred MiB (percentile intervals gain nothing
measurable beyond it)."""


@dataclass(frozen=True)
class CompareConfig:
    """Options of :func:`~spillover.stats.compare_runs`; validated on creation.

    ``spillover compare`` and the ``compare`` section of a run config build this one
    object, so the same predictions give the same comparison either way.
    """

    test: str = "auto"
    """Test per stratum: signflip (scenario-clustered sign-flip mid-p test), an item-level
    McNemar variant (exact, midp, chi2, chi2-cc), or auto (signflip, or midp with cluster
    item). Item-level mid-p and clustered p-values are reported beside it either way."""
    correction: str = "holm"
    """Multiple-testing correction within each level's family of rows: holm, bh,
    bonferroni or none."""
    alpha: float = 0.05
    """Significance level for flags (family-wise for holm/bonferroni, FDR for bh)."""
    by: tuple[str, ...] = DEFAULT_BY
    """Stratification keys, comma-separated: category, context_condition,
    question_polarity, label_type; rows for every subset, the finest level is the primary
    family."""
    intersect: bool = False
    """Compare only items both runs answered, instead of failing on different item sets."""
    bootstrap: int = 1000
    """Bootstrap replicates for intervals on bias-score (and accuracy) differences; 0 = none."""
    seed: int = 0
    """Seed of the bootstrap."""
    cluster: str = "scenario"
    """Independent unit of tests, intervals and bootstrap: scenario (templates sharing a
    question, within each category), template (question_index) or item (the paper's
    analysis). For the likelihood probes scenario means each benchmark's own cluster unit
    (writer, target term, occupation)."""
    confidence: float = 0.95
    """Level of every interval."""
    targets: tuple[str, ...] | None = None
    """Categories the alignment targeted (aliases accepted, comma-separated); splits the
    summary."""
    permutation: str | None = None
    """Answer-order permutation to use when prediction files hold several (default: the
    identity)."""

    def __post_init__(self) -> None:
        check_choice("test", self.test, COMPARE_TESTS)
        check_choice("correction", self.correction, CORRECTIONS)
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1):
            raise ConfigError(f"`alpha`={self.alpha!r}; expected a number between 0 and 1")
        if not (isinstance(self.confidence, (int, float)) and 0 < self.confidence < 1):
            raise ConfigError(f"`confidence`={self.confidence!r}; expected a number in (0, 1)")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int):
            raise ConfigError(f"`bootstrap`={self.bootstrap!r}; expected an integer")
        if self.bootstrap != 0 and not MIN_BOOTSTRAP <= self.bootstrap <= MAX_BOOTSTRAP:
            raise ConfigError(
                f"`bootstrap`={self.bootstrap}; expected 0 (off) or at least {MIN_BOOTSTRAP} "
                f"and at most {MAX_BOOTSTRAP:,} replicates"
            )
        check_seed("seed", self.seed)
        check_choice("cluster", self.cluster, CLUSTER_UNITS)
        if self.test == "signflip" and self.cluster == "item":
            raise ConfigError(
                "`test`='signflip' needs clusters; with `cluster`='item' use an item-level "
                "test (midp, exact, chi2, chi2-cc) or auto"
            )
        object.__setattr__(self, "by", normalize_by(self.by))
        if self.targets is not None:
            names = [self.targets] if isinstance(self.targets, str) else list(self.targets)
            resolved: list[str] = []
            for name in names:
                for part in str(name).split(","):
                    if part.strip():
                        cat = resolve_category(part.strip())
                        if cat not in resolved:
                            resolved.append(cat)
            object.__setattr__(self, "targets", tuple(resolved) or None)
            if self.targets and "category" not in self.by:
                raise ConfigError("`targets` needs 'category' among the `by` keys")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view for JSON output."""
        out = dataclasses.asdict(self)
        out["by"] = list(self.by)
        out["targets"] = list(self.targets) if self.targets else None
        out["test_resolved"] = self.resolved_test
        return out

    @property
    def resolved_test(self) -> str:
        """The test ``auto`` stands for: ``signflip`` with clusters, ``midp`` per item."""
        if self.test == "auto":
            return "midp" if self.cluster == "item" else "signflip"
        return self.test

    @property
    def clustered(self) -> bool:
        """Whether tests and intervals treat clusters (not items) as independent."""
        return self.cluster != "item"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareConfig:
        """The config recorded by :meth:`to_dict` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("by", "targets"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


@dataclass(frozen=True)
class MetricsConfig:
    """Options of :func:`~spillover.stats.load_and_compute_metrics`; validated on creation.

    ``spillover metrics`` builds this object from its options.
    """

    by: tuple[str, ...] = DEFAULT_BY
    """Stratification keys, comma-separated: category, context_condition,
    question_polarity, label_type; a row for every subset of them."""
    permutation: str | None = None
    """Answer-order permutation to use when the prediction file holds several (default: the
    identity)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "by", normalize_by(self.by))
        if self.permutation is not None and not isinstance(self.permutation, str):
            raise ConfigError(
                f"`permutation`={self.permutation!r}; expected a permutation id such as '120'"
            )
