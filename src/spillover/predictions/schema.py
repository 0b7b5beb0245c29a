"""The predictions contract: record kinds, their columns and their Parquet schema.

A predictions file holds one row per scored item (per answer order, for BBQ). Each
benchmark is a *record kind*: its item identity (``key``), the columns any system's file
must carry (``required``), the full schema spillover itself writes (``columns``, in
order, with their Arrow types) and its per-option score columns. Every column name of a
predictions file is defined here and nowhere else; readers, writers, the evaluator, the
statistics and the report import them.

Only the standard library is imported here: the command line reads these names at
start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

METADATA_KEY = b"spillover"
"""Parquet key-value metadata key holding a predictions file's provenance (JSON)."""

ArrowType = Literal["string", "int64", "float64", "bool"]


@dataclass(frozen=True)
class RecordKind:
    """One benchmark's predictions: what identifies a row and what a file must hold."""

    name: str
    """The benchmark's name (``--benchmark``)."""
    key: tuple[str, ...]
    """Columns that identify an item (a row, with ``permutation`` where the kind has one)."""
    required: tuple[str, ...]
    """Columns every predictions file of this kind must have, whoever wrote it."""
    columns: Mapping[str, ArrowType]
    """The full schema spillover writes: column -> Arrow type, in file order."""
    nullable: frozenset[str]
    """Columns of ``columns`` that may hold nulls."""
    score_columns: tuple[str, ...] = ()
    """Optional per-option scores (log-probabilities); a file has all of them or none."""
    permutation_column: str | None = None
    """Column naming the answer order a row was scored under, where the kind has orders."""

    def arrow_schema(self) -> Any:
        """The pyarrow schema of a file spillover writes (without metadata)."""
        import pyarrow as pa

        types = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64()}
        types["bool"] = pa.bool_()
        return pa.schema(
            [pa.field(c, types[t], nullable=c in self.nullable) for c, t in self.columns.items()]
        )


# --------------------------------------------------------------------------- BBQ


@dataclass(frozen=True, slots=True)
class Prediction:
    """One scored BBQ item under one answer order (a row of a BBQ predictions file)."""

    category: str
    """BBQ category."""
    example_id: int
    """Example id within the category."""
    question_index: int
    """Template id."""
    context_condition: str
    """``ambig`` or ``disambig``."""
    question_polarity: str
    """``neg`` or ``nonneg``."""
    label_type: str | None
    """``name`` or ``label`` (None when metadata is missing)."""
    label: int
    """Index of the correct answer."""
    target_loc: int | None
    """Index of the biased answer; None when unknown."""
    unknown_loc: int
    """Index of the "unknown" answer."""
    permutation: str
    """Displayed answer order, e.g. ``"120"``: position j shows original answer int(permutation[j])."""
    pred_index: int
    """Predicted answer, as an ORIGINAL answer index."""
    displayed_pred: int
    """Displayed position of the predicted answer (for position bias)."""
    score_0: float
    """Summed log-probability of original answer 0 (under this permutation)."""
    score_1: float
    """Summed log-probability of original answer 1."""
    score_2: float
    """Summed log-probability of original answer 2."""
    n_tokens_0: int
    """Scored tokens of original answer 0."""
    n_tokens_1: int
    """Scored tokens of original answer 1."""
    n_tokens_2: int
    """Scored tokens of original answer 2."""
    correct: bool
    """``pred_index == label``."""
    biased: bool | None
    """``pred_index == target_loc``; None when the target is unknown."""
    unknown: bool
    """``pred_index == unknown_loc``."""
    model: str
    """Model name as given (alias, hub id or folder)."""
    model_id: str
    """Canonical model id."""
    model_revision: str | None
    """Hub revision or weights digest."""
    adapter: str | None
    """Applied LoRA adapter folder, if any."""
    prompt_format: str
    """Prompt format."""
    length_norm: str
    """Normalisation used for ``pred_index``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict view, columns in schema order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _arrow_type(annotation: str) -> ArrowType:
    base = annotation.replace(" | None", "")
    return {"str": "string", "int": "int64", "float": "float64", "bool": "bool"}[base]  # type: ignore[return-value]


PREDICTION_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Prediction))
"""Column names of a BBQ predictions file spillover writes, in order."""

KEY_COLUMNS: tuple[str, str] = ("category", "example_id")
"""Identity of a BBQ item: ``(category, example_id)``."""

SCORE_COLUMNS: tuple[str, str, str] = ("score_0", "score_1", "score_2")
"""Optional per-option log-probabilities (or any log-scale scores); softmax gives probabilities."""

PERMUTATION_COLUMN = "permutation"
"""Optional column: which answer-order permutation a row was evaluated under."""

IDENTITY_PERMUTATION = "012"
"""The permutation id of BBQ's own answer order (ids name the original answer shown at each
position, as the evaluator writes them: ``"012"``, ``"120"``, ``"201"``, ...)."""

LEGACY_IDENTITY = "0"
"""What files written before permutation ids were kept as strings call the identity."""

BBQ = RecordKind(
    name="bbq",
    key=KEY_COLUMNS,
    required=(*KEY_COLUMNS, "pred_index"),
    columns={f.name: _arrow_type(str(f.type)) for f in dataclasses.fields(Prediction)},
    nullable=frozenset(
        f.name for f in dataclasses.fields(Prediction) if str(f.type).endswith("| None")
    ),
    score_columns=SCORE_COLUMNS,
    permutation_column=PERMUTATION_COLUMN,
)
"""BBQ predictions: one row per item and answer order (:class:`Prediction`)."""

PRED_REQUIRED: tuple[str, ...] = BBQ.required
"""Columns every BBQ predictions file must have."""

JOINED_REQUIRED: tuple[str, ...] = (
    *BBQ.required,
    "context_condition",
    "question_polarity",
    "label",
    "target_loc",
    "unknown_loc",
)
"""Columns a BBQ predictions frame joined with BBQ's items has, for metrics and comparisons."""

POSITION_COLUMNS: tuple[str, str, str] = ("permutation", "displayed_pred", "correct")
"""What the answer-position view of the report reads from a BBQ predictions frame."""

# --------------------------------------------------------------------------- likelihood probes


@dataclass(frozen=True, slots=True)
class ProbePrediction:
    """One scored item of a likelihood-probe benchmark (CrowS-Pairs, StereoSet, WinoBias,
    Winogender; :class:`spillover.data.probes.ProbeItem`): a row of its predictions file."""

    benchmark: str
    """The benchmark."""
    item_id: str
    """The item's id within the benchmark."""
    attribute: str
    """The BBQ category it probes (or ``Profession``)."""
    bias_type: str
    """The benchmark's own bias label."""
    cluster: str
    """The unit its items cluster by (writer, target term, occupation)."""
    split: str
    """``dev``, ``test`` or ``all``."""
    group: str
    """The benchmark's subset (e.g. ``type1/pro``, ``female``, ``intrasentence``)."""
    label: int | None
    """Index of the correct option, where the benchmark has one."""
    n_options: int
    """Options scored (2 or 3)."""
    score_0: float
    """Summed log-probability of option 0 (in the benchmark's role order) after the context."""
    score_1: float
    """Summed log-probability of option 1."""
    score_2: float | None
    """Summed log-probability of option 2 (StereoSet's unrelated option), else None."""
    n_tokens_0: int
    """Scored tokens of option 0."""
    n_tokens_1: int
    """Scored tokens of option 1."""
    n_tokens_2: int | None
    """Scored tokens of option 2, else None."""
    pred_index: int
    """The option the model prefers under :attr:`normalisation` (ties: the earlier one)."""
    normalisation: str
    """``sum`` or ``mean`` (per scored token): how options are compared."""
    model: str
    """Model name as given (alias, hub id or folder)."""
    model_id: str
    """Canonical model id."""
    model_revision: str | None
    """Hub revision or weights digest."""
    adapter: str | None
    """Applied LoRA adapter folder, if any."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict view, columns in schema order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


PROBE_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ProbePrediction))
"""Column names of a likelihood-probe predictions file spillover writes, in order."""


def _probe_kind(name: str, n_options: int) -> RecordKind:
    scores = tuple(f"score_{i}" for i in range(n_options))
    return RecordKind(
        name=name,
        key=("item_id",),
        required=("item_id", *scores),
        columns={f.name: _arrow_type(str(f.type)) for f in dataclasses.fields(ProbePrediction)},
        nullable=frozenset(
            f.name for f in dataclasses.fields(ProbePrediction) if str(f.type).endswith("| None")
        ),
        score_columns=scores,
    )


CROWS_PAIRS = _probe_kind("crows-pairs", 2)
"""CrowS-Pairs predictions: ``score_0`` = sent_more, ``score_1`` = sent_less."""
STEREOSET = _probe_kind("stereoset", 3)
"""StereoSet predictions: stereotype, anti-stereotype, unrelated."""
WINOBIAS = _probe_kind("winobias", 2)
"""WinoBias predictions: the two occupations of the sentence, in sentence order."""
WINOGENDER = _probe_kind("winogender", 2)
"""Winogender predictions: occupation, participant."""

KINDS: Mapping[str, RecordKind] = {
    k.name: k for k in (BBQ, CROWS_PAIRS, STEREOSET, WINOBIAS, WINOGENDER)
}
"""Every record kind, by benchmark name (:data:`spillover.data.probes.BENCHMARKS`)."""
