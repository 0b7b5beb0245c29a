"""Choosing items: item lists from files, filters and the seeded stratified sample."""

from __future__ import annotations

import os
import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .items import CATEGORIES, CONTEXTS, POLARITIES, BBQItem, resolve_categories, resolve_category
from .parse import (
    as_id,
    csv_rows,
    decode_utf8,
    line_error,
    load_json_line,
    short_repr,
)
from .sources import read_limited


@dataclass(frozen=True, slots=True)
class Selection:
    """Which BBQ items a stage works on; validated on creation.

    ``spillover eval`` and the ``eval`` section of a run config build this one object.
    With neither ``per_stratum`` nor ``items``, every item (of the chosen categories and
    contexts) is selected.
    """

    categories: tuple[str, ...] | None = None
    """Categories or aliases, comma-separated; default: all 11."""
    contexts: tuple[str, ...] = CONTEXTS
    """Context conditions, comma-separated: ambig, disambig."""
    per_stratum: int | None = None
    """Seeded sample of N items per category x context; default: every item."""
    items: str | None = None
    """CSV/JSONL file listing ``category,example_id`` keys to select."""
    seed: int = 0
    """Seed of the ``per_stratum`` sample."""
    limit: int | None = None
    """Keep only the first N selected items (in output order)."""

    def __post_init__(self) -> None:
        if isinstance(self.categories, str):
            object.__setattr__(self, "categories", (self.categories,))
        if self.categories is not None:
            object.__setattr__(self, "categories", resolve_categories(self.categories))
        if isinstance(self.contexts, str):
            object.__setattr__(self, "contexts", (self.contexts,))
        object.__setattr__(
            self, "contexts", tuple(sorted(_check_vocab(self.contexts, CONTEXTS, "contexts") or ()))
        )
        if not self.contexts:
            raise ConfigError("`contexts` is empty; give ambig, disambig or both")
        if self.per_stratum is not None and self.items is not None:
            raise ConfigError("give either `per_stratum` or `items`, not both")
        if self.per_stratum is not None and self.per_stratum < 1:
            raise ConfigError(f"`per_stratum`={self.per_stratum}; expected a positive integer")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"`limit`={self.limit}; expected a positive integer")

    def keys(self) -> list[tuple[str, int]] | None:
        """The listed item keys (read from ``items``), or None."""
        return read_item_list(self.items) if self.items is not None else None

    def describe(
        self, categories: Sequence[str], heldout: Mapping[str, Collection[int]] | None = None
    ) -> dict[str, Any]:
        """What was selected, for the predictions' metadata (``categories``: those loaded;
        ``heldout``: as :meth:`apply` took it)."""
        out: dict[str, Any] = {
            "categories": list(categories),
            "contexts": list(self.contexts),
            "per_stratum": self.per_stratum,
            "seed": self.seed,
            "items_file": self.items,
            "all": self.per_stratum is None and self.items is None,
            "limit": self.limit,
        }
        if heldout:
            out["heldout_templates"] = {c: sorted(t) for c, t in heldout.items()}
        return out

    def apply(
        self, items: Sequence[BBQItem], heldout: Mapping[str, Collection[int]] | None = None
    ) -> list[BBQItem]:
        """The selected items, in the input order, cut to ``limit``.

        Args:
            items: The items to choose from.
            heldout: Templates (``question_index``) per category: items of these
                categories are chosen only on them (:func:`on_heldout`), so every evaluated
                target item is one the model never trained on.

        Raises:
            DataError: the item list is unreadable.
            ConfigError: listed keys are not in ``items``.
        """
        if heldout:
            items = on_heldout(items, heldout)
        keys = None
        if self.items is not None:
            entries = read_item_entries(self.items)
            available = {it.key for it in items}
            absent = [(key, line) for key, line in entries if key not in available]
            if absent:
                (cat, eid), line = absent[0]
                more = f" (and {len(absent) - 1} more listed item(s))" if len(absent) > 1 else ""
                raise ConfigError(
                    f"{self.items}:{line}: {cat}/{eid} is not in BBQ{more}; expected keys of "
                    "loaded BBQ items (check the category and example_id, and --categories)"
                )
            keys = [key for key, _ in entries]
        chosen = select_items(
            items,
            categories=self.categories,
            contexts=self.contexts,
            keys=keys,
            per_stratum=self.per_stratum,
            seed=self.seed,
        )
        if self.limit is None:
            return chosen
        rank = {c: i for i, c in enumerate(CATEGORIES)}
        ordered = sorted(chosen, key=lambda it: (rank[it.category], it.example_id))
        return ordered[: self.limit]


def on_heldout(items: Iterable[BBQItem], held: Mapping[str, Collection[int]]) -> list[BBQItem]:
    """``items`` with those of ``held``'s categories kept only on its held-out templates
    (the pool a run samples from: every evaluated target item is one never trained on)."""
    return [it for it in items if it.category not in held or it.question_index in held[it.category]]


MAX_ITEM_LIST_BYTES = 64 << 20
"""Largest item list read (all of BBQ's keys take about 2 MB)."""


def read_item_list(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """Read ``category,example_id`` keys from a CSV or JSONL file.

    Category names may be aliases; a leading byte-order mark is accepted.

    Raises:
        DataError: naming file, line and field (unreadable file, invalid UTF-8, an
            over-long line or field, a bad category or example id).
    """
    return [key for key, _ in read_item_entries(path)]


def read_item_entries(path: str | os.PathLike[str]) -> list[tuple[tuple[str, int], int]]:
    """Like :func:`read_item_list`, with the line each key was read from."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise DataError(f"{p}: item list not found")
    data = read_limited(p, limit=MAX_ITEM_LIST_BYTES, what="CSV or JSONL item list")
    entries: list[tuple[tuple[str, int], int]] = []
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        text = decode_utf8(data, p, kind="jsonl")
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            rec = load_json_line(line, p, lineno)
            if not isinstance(rec, dict):
                raise line_error(p, lineno, "expected a JSON object with category and example_id")
            entries.append((_item_key(rec, p, lineno), lineno))
    else:
        text = decode_utf8(data, p, kind="csv")
        for lineno, row in csv_rows(text, p, ("category", "example_id")):
            entries.append((_item_key(row, p, lineno), lineno))
    if not entries:
        raise DataError(f"{p}: the item list is empty")
    return entries


def _item_key(rec: Mapping[str, Any], path: Path, line: int) -> tuple[str, int]:
    for col in ("category", "example_id"):
        if col not in rec or rec[col] in (None, ""):
            raise line_error(path, line, f"missing field {col!r}")
    if not isinstance(rec["category"], str):
        raise line_error(
            path, line, f"field 'category'={short_repr(rec['category'])}; expected a category name"
        )
    try:
        cat = resolve_category(rec["category"])
    except ConfigError as exc:
        raise line_error(path, line, f"field 'category': {exc}") from None
    eid = as_id(rec["example_id"])
    if eid is None:
        raise line_error(
            path,
            line,
            f"field 'example_id'={short_repr(rec['example_id'])}; expected an integer in [0, 2**63)",
        )
    return (cat, eid)


def select_items(
    items: Sequence[BBQItem],
    *,
    categories: Iterable[str] | None = None,
    contexts: Iterable[str] | None = None,
    polarities: Iterable[str] | None = None,
    templates: Iterable[int] | None = None,
    keys: Iterable[tuple[str, int]] | None = None,
    per_stratum: int | None = None,
    seed: int = 0,
) -> list[BBQItem]:
    """Filter items, then optionally draw a seeded stratified sample.

    Filters combine with AND. ``per_stratum`` draws up to N items per
    category x context_condition (all of a stratum when it has fewer), with a
    sample that depends only on ``seed`` and the item keys. The result keeps
    the input order.

    Raises:
        ConfigError: unknown names, or item keys absent from ``items``.
    """
    cats = set(resolve_categories(categories)) if categories is not None else None
    ctxs = _check_vocab(contexts, CONTEXTS, "context_condition")
    pols = _check_vocab(polarities, POLARITIES, "question_polarity")
    tmpl = {int(t) for t in templates} if templates is not None else None
    wanted: set[tuple[str, int]] | None = None
    if keys is not None:
        wanted = set(keys)
        available = {it.key for it in items}
        absent = sorted(wanted - available)
        if absent:
            shown = ", ".join(f"{c}/{e}" for c, e in absent[:5])
            more = f" and {len(absent) - 5} more" if len(absent) > 5 else ""
            raise ConfigError(f"{len(absent)} listed item(s) are not in BBQ: {shown}{more}")
    out = [
        it
        for it in items
        if (cats is None or it.category in cats)
        and (ctxs is None or it.context_condition in ctxs)
        and (pols is None or it.question_polarity in pols)
        and (tmpl is None or it.question_index in tmpl)
        and (wanted is None or it.key in wanted)
    ]
    if per_stratum is not None:
        if per_stratum < 1:
            raise ConfigError(f"`per_stratum`={per_stratum}; expected a positive integer")
        strata: dict[tuple[str, str], list[BBQItem]] = {}
        for it in out:
            strata.setdefault((it.category, it.context_condition), []).append(it)
        chosen: set[tuple[str, int]] = set()
        for (cat, ctx), group in sorted(strata.items()):
            rng = random.Random(f"{seed}:{cat}:{ctx}")
            ordered = sorted(group, key=lambda it: it.example_id)
            pick = ordered if len(ordered) <= per_stratum else rng.sample(ordered, per_stratum)
            chosen.update(it.key for it in pick)
        out = [it for it in out if it.key in chosen]
    return out


def _check_vocab(
    values: Iterable[str] | None, allowed: tuple[str, ...], name: str
) -> set[str] | None:
    if values is None:
        return None
    got: set[str] = set()
    for v in values:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            if part not in allowed:
                raise ConfigError(
                    f"`{name}`={part!r}; expected one of {', '.join(map(repr, allowed))}"
                )
            got.add(part)
    return got
