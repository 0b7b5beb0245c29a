"""Stratification keys: which columns a table is split by, and how rows are named."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

from ..data import CATEGORIES, CONTEXTS, POLARITIES
from ..errors import ConfigError

ALL = "all"
"""Key value of a row that is not split by that key."""

KEY_ORDER: tuple[str, ...] = ("category", "context_condition", "question_polarity", "label_type")
"""Stratification keys, in the order they appear in tables."""

DEFAULT_BY: tuple[str, str] = ("category", "context_condition")

KEY_VOCAB: Mapping[str, tuple[str, ...]] = {
    "category": CATEGORIES,
    "context_condition": CONTEXTS,
    "question_polarity": POLARITIES,
    "label_type": ("label", "name"),
}
"""Values of each key, in table order."""


def normalize_by(by: str | Iterable[str] | None) -> tuple[str, ...]:
    """Parse a stratification spec (``"category,context_condition"`` or a sequence).

    Returns the keys in :data:`KEY_ORDER` order.

    Raises:
        ConfigError: unknown or repeated keys, or none at all.
    """
    if by is None:
        return DEFAULT_BY
    parts = [by] if isinstance(by, str) else list(by)
    keys: list[str] = []
    for part in parts:
        for key in str(part).split(","):
            key = key.strip()
            if not key:
                continue
            if key not in KEY_ORDER:
                raise ConfigError(
                    f"`by`: unknown key {key!r}; expected some of {', '.join(KEY_ORDER)}"
                )
            if key in keys:
                raise ConfigError(f"`by`: key {key!r} given twice")
            keys.append(key)
    if not keys:
        raise ConfigError(f"`by`: no key given; expected some of {', '.join(KEY_ORDER)}")
    return tuple(k for k in KEY_ORDER if k in keys)


def levels_of(by: Sequence[str]) -> list[tuple[str, ...]]:
    """Every subset of ``by``, finest first (``()`` is the overall row)."""
    out: list[tuple[str, ...]] = []
    for size in range(len(by), -1, -1):
        out.extend(itertools.combinations(by, size))
    return out


def level_name(level: Sequence[str]) -> str:
    """``"category+context_condition"``, or ``"overall"`` for the empty level."""
    return "+".join(level) if level else "overall"
