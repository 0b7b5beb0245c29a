"""Choosing likelihood-probe items: filters and a seeded sample of whole units."""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._checks import check_seed
from ..errors import ConfigError
from .items import resolve_category
from .probes import PROFESSION, ProbeItem


def _texts(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    parts = [value] if isinstance(value, str) else list(value)
    out = tuple(p.strip() for part in parts for p in str(part).split(",") if p.strip())
    if not out:
        raise ConfigError(f"`{name}` is empty; give at least one value, or leave it unset (all)")
    return out


def _attribute(name: str) -> str:
    if name.strip().lower() == PROFESSION.lower():
        return PROFESSION
    return resolve_category(name)


@dataclass(frozen=True, slots=True)
class ProbeSelection:
    """Which items of a likelihood-probe benchmark are scored; validated on creation.

    ``spillover eval --benchmark NAME`` and the run config's per-benchmark item keys build
    this one object. Unset filters keep everything.
    """

    splits: tuple[str, ...] | None = None
    """Splits, comma-separated (``dev``, ``test``; ``all`` for benchmarks without splits);
    default: every split."""
    groups: tuple[str, ...] | None = None
    """Subsets, comma-separated (CrowS-Pairs ``stereo``/``antistereo``; StereoSet
    ``intrasentence``/``intersentence``; WinoBias ``type1/pro``, ...; Winogender
    ``male``/``female``/``neutral``); default: every subset."""
    attributes: tuple[str, ...] | None = None
    """Attributes, comma-separated (BBQ categories or aliases, or ``Profession``); default:
    every attribute."""
    per_attribute: int | None = None
    """Seeded sample of N units per attribute (a unit is an item, or both versions of a
    WinoBias sentence); default: every item."""
    seed: int = 0
    """Seed of the ``per_attribute`` sample."""
    limit: int | None = None
    """Keep only the first N selected items (in benchmark order)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "splits", _texts(self.splits, "splits"))
        object.__setattr__(self, "groups", _texts(self.groups, "groups"))
        attrs = _texts(self.attributes, "attributes")
        object.__setattr__(
            self, "attributes", None if attrs is None else tuple(map(_attribute, attrs))
        )
        for name in ("per_attribute", "limit"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"`{name}`={value!r}; expected a positive integer")
        check_seed("seed", self.seed)

    def apply(
        self,
        items: Sequence[ProbeItem],
        heldout: Mapping[str, Collection[str]] | None = None,
    ) -> list[ProbeItem]:
        """The selected items, in the input order.

        Args:
            items: The benchmark's items.
            heldout: Clusters per attribute: items of these attributes are chosen only on
                them (the clusters a probe-built split held out of training).

        Raises:
            ConfigError: a split, subset or attribute the items do not have.
        """
        for name, field, values in (
            ("splits", "split", self.splits),
            ("groups", "group", self.groups),
            ("attributes", "attribute", self.attributes),
        ):
            known = sorted({getattr(it, field) for it in items})
            unknown = [v for v in values or () if v not in known]
            if unknown:
                raise ConfigError(
                    f"`{name}`: {', '.join(map(repr, unknown))} not in this benchmark; "
                    f"expected some of {', '.join(known)}"
                )
        kept = [
            it
            for it in items
            if (not heldout or it.attribute not in heldout or it.cluster in heldout[it.attribute])
            and (self.splits is None or it.split in self.splits)
            and (self.groups is None or it.group in self.groups)
            and (self.attributes is None or it.attribute in self.attributes)
        ]
        if self.per_attribute is not None:
            kept = self._sample(kept, self.per_attribute)
        return kept[: self.limit] if self.limit is not None else kept

    def _sample(self, items: Sequence[ProbeItem], n: int) -> list[ProbeItem]:
        """Up to ``n`` units per attribute, drawn by a seeded generator from the sorted unit
        ids, so the sample depends only on the seed and the ids."""
        units: dict[str, list[str]] = {}
        for it in items:
            unit = it.pair or it.item_id
            if unit not in units.setdefault(it.attribute, []):
                units[it.attribute].append(unit)
        chosen: set[tuple[str, str]] = set()
        for attribute, ids in sorted(units.items()):
            ids = sorted(ids)
            rng = random.Random(f"{self.seed}:{attribute}")
            pick = ids if len(ids) <= n else rng.sample(ids, n)
            chosen.update((attribute, u) for u in pick)
        return [it for it in items if (it.attribute, it.pair or it.item_id) in chosen]

    def describe(self) -> Mapping[str, Any]:
        """What was selected, for the predictions' metadata."""
        return {
            "splits": list(self.splits) if self.splits else None,
            "groups": list(self.groups) if self.groups else None,
            "attributes": list(self.attributes) if self.attributes else None,
            "per_attribute": self.per_attribute,
            "seed": self.seed,
            "limit": self.limit,
        }
