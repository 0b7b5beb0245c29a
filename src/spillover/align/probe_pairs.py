"""Preference pairs from a likelihood-probe benchmark: align on CrowS-Pairs' or StereoSet's
format, then evaluate on BBQ's (and the other way round) — the two-by-two that tells
content (less stereotyping) from format (how to answer one benchmark).

Each item of a target attribute gives one pair whose chosen continuation is the less
stereotypical option and whose rejected one is the more stereotypical option (CrowS-Pairs:
``sent_less`` over ``sent_more``; StereoSet: the anti-stereotype over the stereotype, and
with ``strategy: all-wrong`` the unrelated option rejected too). The prompt is the text the
two options share (whole words), after the tokenizer's prefix token (BOS, else EOS) — the
token scoring puts before a whole sentence — so the words that differ are trained, also
where they are the first word. Whole clusters (CrowS-Pairs' writers, StereoSet's target
terms) are held out, so evaluated items are never trained on.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..data import PROBES, ProbeItem
from ..errors import ConfigError, DataError

PAIR_SOURCES: tuple[str, ...] = ("bbq", "crows-pairs", "stereoset")
"""Benchmarks preference pairs can be built from."""

PROBE_PAIR_COLUMNS: tuple[str, ...] = (
    "prompt", "chosen", "rejected", "benchmark", "item_id", "attribute", "cluster", "group",
    "strategy", "rejected_kind",
)  # fmt: skip
"""Columns of the pair files built from a probe benchmark (the first three as TRL expects)."""


@dataclass(frozen=True, slots=True)
class ProbePair:
    """One preference pair from a likelihood-probe item."""

    prompt: str
    """The shared words, after the prefix token."""
    chosen: str
    """The rest of the less stereotypical option."""
    rejected: str
    """The rest of the more stereotypical (or unrelated) option."""
    benchmark: str
    """The benchmark of the item."""
    item_id: str
    """The item."""
    attribute: str
    """Its attribute (a BBQ category)."""
    cluster: str
    """Its cluster (writer, target term): the unit held out."""
    group: str
    """Its subset (``stereo``/``antistereo``; ``intrasentence``/``intersentence``)."""
    strategy: str
    """The strategy that made the pair."""
    rejected_kind: str
    """``stereotype`` or ``unrelated``."""

    def to_row(self) -> dict[str, Any]:
        """The pair as a table row with :data:`PROBE_PAIR_COLUMNS`."""
        return {name: getattr(self, name) for name in PROBE_PAIR_COLUMNS}


def split_pair_texts(prefix: str, better: str, worse: str) -> tuple[str, str, str]:
    """Prompt, chosen and rejected of two options: the whole words they start with in
    common (after ``prefix``), then each one's rest with its leading space."""
    a, b = better.split(" "), worse.split(" ")
    k = 0
    while k < min(len(a), len(b)) - 1 and a[k] == b[k]:
        k += 1
    shared = " ".join(a[:k])
    rest_a, rest_b = " ".join(a[k:]), " ".join(b[k:])
    if shared:
        return prefix + shared, " " + rest_a, " " + rest_b
    return prefix, rest_a, rest_b


def heldout_clusters(
    items: Sequence[ProbeItem], heldout_frac: float, seed: int
) -> dict[str, tuple[str, ...]]:
    """The held-out clusters of each attribute: ``round(heldout_frac * n)`` of its ``n``
    clusters (at least one when ``heldout_frac > 0``, never all), drawn from the sorted
    cluster ids with a generator seeded by ``seed`` and the attribute."""
    per: dict[str, set[str]] = {}
    for it in items:
        per.setdefault(it.attribute, set()).add(it.cluster)
    out: dict[str, tuple[str, ...]] = {}
    for attribute in sorted(per):
        clusters = sorted(per[attribute])
        k = 0
        if heldout_frac > 0 and len(clusters) > 1:
            k = min(max(1, round(heldout_frac * len(clusters))), len(clusters) - 1)
        rng = random.Random(f"{seed}:{attribute}")
        out[attribute] = tuple(sorted(rng.sample(clusters, k)))
    return out


def probe_pairs(
    items: Sequence[ProbeItem],
    *,
    source: str,
    targets: Sequence[str],
    strategy: str,
    heldout_frac: float,
    seed: int,
    prefix: str,
) -> tuple[list[ProbePair], list[ProbePair], dict[str, tuple[str, ...]], dict[str, Any]]:
    """The pairs of a probe benchmark's target items, split by cluster.

    Returns:
        Training pairs, held-out pairs, the held-out clusters per target, and counts.

    Raises:
        ConfigError: ``source`` is not a benchmark pairs are built from.
        DataError: no item of the targets, or no training pair.
    """
    if source not in PAIR_SOURCES[1:]:
        raise ConfigError(f"`source`={source!r}; expected one of {', '.join(PAIR_SOURCES)}")
    chosen_items = [it for it in items if it.benchmark == source and it.attribute in targets]
    if not chosen_items:
        raise DataError(
            f"no {PROBES[source].title} items for targets {', '.join(targets)}; "
            f"expected attributes among {', '.join(sorted({it.attribute for it in items}))}"
        )
    held = heldout_clusters(chosen_items, heldout_frac, seed)
    train: list[ProbePair] = []
    heldout: list[ProbePair] = []
    for it in chosen_items:
        # CrowS-Pairs: (more, less); StereoSet: (stereotype, anti-stereotype, unrelated)
        better = it.options[1]
        worse: list[tuple[str, str]] = [(it.options[0], "stereotype")]
        if source == "stereoset" and strategy == "all-wrong":
            worse.append((it.options[2], "unrelated"))
        dest = heldout if it.cluster in held.get(it.attribute, ()) else train
        for text, kind in worse:
            prompt, chosen, rejected = split_pair_texts(prefix, better.strip(), text.strip())
            dest.append(
                ProbePair(
                    prompt,
                    chosen,
                    rejected,
                    it.benchmark,
                    it.item_id,
                    it.attribute,
                    it.cluster,
                    it.group,
                    strategy,
                    kind,
                )
            )
    if not train:
        raise DataError(
            "no training pairs: every cluster of the targets is held out; lower heldout_frac"
        )
    counts = {
        "items": len(chosen_items),
        "skipped_no_target": 0,
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "train_scenarios": {
            a: len({it.cluster for it in chosen_items if it.attribute == a}) - len(held.get(a, ()))
            for a in targets
        },
        "heldout_scenarios": {a: len(held.get(a, ())) for a in targets},
        "chosen_kind": {"train": {"less stereotypical": len(train)}, "heldout": {}},
        "rejected_kind": {
            "train": dict(sorted(Counter(p.rejected_kind for p in train).items())),
            "heldout": dict(sorted(Counter(p.rejected_kind for p in heldout).items())),
        },
        "unit": "cluster",
    }
    return train, heldout, held, counts


def prefix_text(tokenizer: Any) -> str:
    """The text of the token scoring puts before a whole sentence: BOS, else EOS."""
    for name in ("bos_token", "eos_token"):
        token = getattr(tokenizer, name, None)
        if isinstance(token, str) and token:
            return token
    raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start a sentence with")


def heldout_of(split: Mapping[str, Any]) -> dict[str, set[str]]:
    """Held-out clusters per attribute of a probe-built split (``{}`` for a BBQ split)."""
    held = split.get("heldout_clusters") or {}
    if not isinstance(held, Mapping):
        raise DataError("split.json: field 'heldout_clusters' is not an object of cluster lists")
    return {str(a): {str(c) for c in v} for a, v in held.items()}
