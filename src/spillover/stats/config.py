"""The comparison config: one object for the Python API, the run config and ``spillover compare``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._checks import check_choice
from ..data import resolve_category
from ..errors import ConfigError
from .keys import normalize_by
from .tests import CORRECTIONS, TESTS, resolve_test

CLUSTER_UNITS: tuple[str, ...] = ("item", "template")
"""Bootstrap resampling units."""


@dataclass(frozen=True)
class CompareConfig:
    """Options of :func:`~spillover.stats.compare_runs`; validated on creation.

    ``spillover compare`` and the ``compare`` section of a run config build this one
    object, so the same predictions give the same comparison either way.
    """

    test: str = "auto"
    """McNemar-family test per stratum: exact, midp, chi2, chi2-cc, or auto (= midp;
    docs/stats.md)."""
    correction: str = "holm"
    """Multiple-testing correction within each level's family of rows: holm, bh,
    bonferroni or none."""
    alpha: float = 0.05
    """Significance level for flags (family-wise for holm/bonferroni, FDR for bh)."""
    by: tuple[str, ...] = ("category", "context_condition")
    """Stratification keys, comma-separated: category, context_condition,
    question_polarity, label_type; rows for every subset, the finest level is the primary
    family."""
    intersect: bool = False
    """Compare only items both runs answered, instead of failing on different item sets."""
    bootstrap: int = 1000
    """Bootstrap replicates for intervals on bias-score (and accuracy) differences; 0 = none."""
    seed: int = 0
    """Seed of the bootstrap."""
    cluster: str = "template"
    """Bootstrap unit: template (question_index clusters within each category) or item."""
    confidence: float = 0.95
    """Level of every interval."""
    targets: tuple[str, ...] | None = None
    """Categories the alignment targeted (aliases accepted, comma-separated); splits the
    summary."""
    permutation: str | None = None
    """Answer-order permutation to use when prediction files hold several (default: the
    identity)."""

    def __post_init__(self) -> None:
        check_choice("test", self.test, TESTS)
        check_choice("correction", self.correction, CORRECTIONS)
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1):
            raise ConfigError(f"`alpha`={self.alpha!r}; expected a number between 0 and 1")
        if not (isinstance(self.confidence, (int, float)) and 0 < self.confidence < 1):
            raise ConfigError(f"`confidence`={self.confidence!r}; expected a number in (0, 1)")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int):
            raise ConfigError(f"`bootstrap`={self.bootstrap!r}; expected an integer")
        if self.bootstrap < 0 or 0 < self.bootstrap < 100:
            raise ConfigError(
                f"`bootstrap`={self.bootstrap}; expected 0 (off) or at least 100 replicates"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"`seed`={self.seed!r}; expected a non-negative integer")
        check_choice("cluster", self.cluster, CLUSTER_UNITS)
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
        out["test_resolved"] = resolve_test(self.test)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareConfig:
        """The config recorded by :meth:`to_dict` (derived keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("by", "targets"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)
