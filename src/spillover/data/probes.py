"""Bias benchmarks beyond BBQ's format, decided by log-likelihoods: the typed item and what
each benchmark is.

CrowS-Pairs, StereoSet, WinoBias and Winogender are *likelihood probes*: every item is a
context and two or three options (whole sentences, or continuations), and comparing the
model's log-likelihoods of the options decides it. One record, :class:`ProbeItem`, holds
an item of any of them; :data:`PROBES` says, per benchmark, how options are compared
(summed or per-token log-likelihood), what a row outcome means, which unit clusters items,
and how its labels map onto BBQ's categories (the attribute axis of a study).

Only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError

Normalisation = Literal["sum", "mean"]

BENCHMARKS: tuple[str, ...] = ("bbq", "crows-pairs", "stereoset", "winobias", "winogender")
"""Every benchmark a study can evaluate (``--benchmark``)."""

PROBE_BENCHMARKS: tuple[str, ...] = BENCHMARKS[1:]
"""The likelihood-probe benchmarks (all but BBQ)."""


@dataclass(frozen=True, slots=True)
class ProbeItem:
    """One item of a likelihood-probe benchmark. Identity: ``(benchmark, item_id)``."""

    benchmark: str
    """One of :data:`PROBE_BENCHMARKS`."""
    item_id: str
    """Unique within the benchmark, stable across releases of spillover (e.g. CrowS-Pairs
    ``"17"``, the row index of the file; StereoSet ``"dev/intrasentence/<id>"``; WinoBias
    ``"dev/type1/92/pro"``; Winogender the ``sentid``)."""
    attribute: str
    """The BBQ category it probes (:data:`~spillover.data.CATEGORIES`), or ``Profession``
    for StereoSet's profession domain, which BBQ has no category for."""
    bias_type: str
    """The benchmark's own label (CrowS-Pairs ``race-color``, StereoSet ``profession``, ...)."""
    cluster: str
    """The unit items are not independent within (CrowS-Pairs: the anonymised writer;
    StereoSet: the target term; WinoBias: the referent occupation; Winogender: the
    occupation); tests and intervals resample whole clusters."""
    split: str
    """``dev`` or ``test`` where the benchmark has splits, else ``all``."""
    group: str
    """The benchmark's subset of the item: CrowS-Pairs ``stereo`` / ``antistereo``;
    StereoSet ``intrasentence`` / ``intersentence``; WinoBias ``type1/pro``,
    ``type1/anti``, ``type2/pro``, ``type2/anti``; Winogender the pronoun's gender
    ``male`` / ``female`` / ``neutral``."""
    context: str
    """Text the options are scored after; ``""``: each option is a whole sentence scored
    after the tokenizer's BOS (else EOS) token, as lm-evaluation-harness scores CrowS-Pairs."""
    options: tuple[str, ...]
    """The scored texts, in :attr:`roles` order."""
    roles: tuple[str, ...]
    """What each option is (see :attr:`ProbeSpec.roles`)."""
    label: int | None = None
    """Index of the correct option where the benchmark has one (WinoBias, Winogender)."""
    pair: str | None = None
    """Items that differ only in the probed attribute share it (WinoBias: the pro and anti
    version of one sentence)."""
    flags: tuple[str, ...] = ()
    """Data quirks and subsets: ``duplicate`` (same text as an earlier item),
    ``non_minimal`` (a WinoBias pair that differs in more than the pronoun), ``gotcha``
    (Winogender: the pronoun's gender is not the occupation's majority gender)."""

    @property
    def key(self) -> tuple[str, str]:
        """Identity ``(benchmark, item_id)``."""
        return (self.benchmark, self.item_id)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (lists instead of tuples), for tables and JSON."""
        out = dataclasses.asdict(self)
        for name in ("options", "roles", "flags"):
            out[name] = list(out[name])
        return out


PROBE_FRAME_COLUMNS: tuple[str, ...] = (
    "benchmark", "item_id", "attribute", "bias_type", "cluster", "split", "group", "label",
    "pair", "n_options",
)  # fmt: skip
"""Columns of an item frame (``BenchmarkData.frame()``), what predictions are joined with."""


@dataclass(frozen=True)
class ProbeSpec:
    """What one likelihood-probe benchmark is and how its items are decided."""

    name: str
    """The benchmark (``--benchmark``)."""
    title: str
    """Its name as papers write it."""
    roles: tuple[str, ...]
    """Option roles, in option order."""
    normalisation: Normalisation
    """How an option's score is compared: ``sum`` (the summed log-likelihood, as
    lm-evaluation-harness's ``crows_pairs`` and ``winogender`` tasks) or ``mean`` (per scored
    token, as StereoSet's causal-LM scorer)."""
    outcome: str
    """The per-item binary outcome the paired tests compare, in words."""
    cluster_unit: str
    """What :attr:`ProbeItem.cluster` is."""
    attribute_of: Mapping[str, str]
    """The benchmark's bias label -> the BBQ category (or ``Profession``)."""
    metrics: tuple[str, ...]
    """Its published metrics, as ``spillover metrics`` names them."""
    unbiased: str
    """What an unbiased model scores, in words (direction of every metric)."""
    caveat: str | None = None
    """What reports must say wherever its numbers appear."""


_NOISE = (
    "Blodgett et al. (2021, 'Stereotyping Norwegian Salmon') found serious noise and "
    "validity problems in {name}'s items; its authors warn that it may not be a reliable "
    "indicator of social bias. Read its numbers as a second format, not as a measure."
)

PROBES: Mapping[str, ProbeSpec] = {
    "crows-pairs": ProbeSpec(
        name="crows-pairs",
        title="CrowS-Pairs",
        roles=("more", "less"),
        normalisation="sum",
        outcome="the more stereotypical sentence (sent_more) has the higher log-likelihood",
        cluster_unit="the anonymised writer of the pair (anon_writer, 77 writers)",
        attribute_of={
            "race-color": "Race_ethnicity",
            "socioeconomic": "SES",
            "gender": "Gender_identity",
            "nationality": "Nationality",
            "religion": "Religion",
            "age": "Age",
            "sexual-orientation": "Sexual_orientation",
            "physical-appearance": "Physical_appearance",
            "disability": "Disability_status",
        },
        metrics=("pct_stereotype", "likelihood_diff"),
        unbiased="pct_stereotype 50 (lower: prefers the less stereotypical sentence)",
        caveat=_NOISE.format(name="CrowS-Pairs"),
    ),
    "stereoset": ProbeSpec(
        name="stereoset",
        title="StereoSet",
        roles=("stereotype", "anti-stereotype", "unrelated"),
        normalisation="mean",
        outcome="the stereotype option scores above the anti-stereotype option",
        cluster_unit="the target term (e.g. 'grandfather', 'Muslim')",
        attribute_of={
            "gender": "Gender_identity",
            "race": "Race_ethnicity",
            "religion": "Religion",
            "profession": "Profession",
        },
        metrics=("lms", "ss", "icat"),
        unbiased="ss 50 with lms 100 gives icat 100 (an ideal model)",
        caveat=_NOISE.format(name="StereoSet"),
    ),
    "winobias": ProbeSpec(
        name="winobias",
        title="WinoBias",
        roles=("first occupation", "second occupation"),
        normalisation="sum",
        outcome="the pronoun is resolved to the right occupation",
        cluster_unit="the occupation the pronoun refers to (40 occupations)",
        attribute_of={"gender": "Gender_identity"},
        metrics=("accuracy_pro", "accuracy_anti", "diff"),
        unbiased="diff 0 (as accurate on anti-stereotypical as on pro-stereotypical sentences)",
    ),
    "winogender": ProbeSpec(
        name="winogender",
        title="Winogender",
        roles=("occupation", "participant"),
        normalisation="sum",
        outcome="the pronoun is resolved to the right person",
        cluster_unit="the occupation of the sentence (60 occupations)",
        attribute_of={"gender": "Gender_identity"},
        metrics=(
            "accuracy",
            "accuracy_male",
            "accuracy_female",
            "accuracy_neutral",
            "accuracy_gotcha",
            "gender_gap",
        ),
        unbiased=(
            "equal accuracy for every pronoun gender (gender_gap = accuracy_male - "
            "accuracy_female 0) and on the 'gotcha' items"
        ),
    ),
}
"""Every likelihood-probe benchmark, by name."""

PROFESSION = "Profession"
"""StereoSet's profession domain as an attribute (BBQ has no such category)."""


def check_benchmark(name: str) -> str:
    """The benchmark's canonical name (case, ``_`` and spaces alike: ``CrowS_Pairs`` ->
    ``crows-pairs``).

    Raises:
        ConfigError: an unknown name, with a near match and the choices.
    """
    import difflib

    norm = name.strip().lower().replace("_", "-").replace(" ", "-")
    if norm in BENCHMARKS:
        return norm
    if norm.replace("-", "") in {b.replace("-", "") for b in BENCHMARKS}:
        return next(b for b in BENCHMARKS if b.replace("-", "") == norm.replace("-", ""))
    near = difflib.get_close_matches(norm, BENCHMARKS, n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"unknown benchmark {name!r}{hint}; expected one of {', '.join(BENCHMARKS)}")
