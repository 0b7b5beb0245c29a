"""BBQ items: the vocabulary (categories, contexts, polarities), one typed item, category names."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import ConfigError

Context = Literal["ambig", "disambig"]
Polarity = Literal["neg", "nonneg"]
LabelType = Literal["name", "label"]

CONTEXTS: tuple[Context, ...] = get_args(Context)
POLARITIES: tuple[Polarity, ...] = get_args(Polarity)

CATEGORIES: tuple[str, ...] = (
    "Age",
    "Disability_status",
    "Gender_identity",
    "Nationality",
    "Physical_appearance",
    "Race_ethnicity",
    "Race_x_SES",
    "Race_x_gender",
    "Religion",
    "SES",
    "Sexual_orientation",
)
"""The 11 BBQ categories, spelled as in the data files."""


CATEGORY_ALIASES: Mapping[str, str] = {
    "age": "Age",
    "disability": "Disability_status",
    "disability_status": "Disability_status",
    "gender": "Gender_identity",
    "gender_identity": "Gender_identity",
    "nationality": "Nationality",
    "physical_appearance": "Physical_appearance",
    "appearance": "Physical_appearance",
    "race": "Race_ethnicity",
    "ethnicity": "Race_ethnicity",
    "race_ethnicity": "Race_ethnicity",
    "race_x_ses": "Race_x_SES",
    "race_ses": "Race_x_SES",
    "race_x_gender": "Race_x_gender",
    "race_gender": "Race_x_gender",
    "religion": "Religion",
    "ses": "SES",
    "socioeconomic": "SES",
    "sexual_orientation": "Sexual_orientation",
    "orientation": "Sexual_orientation",
}
"""Friendly names accepted wherever a category is expected (case-insensitive; ``-`` = ``_``)."""


@dataclass(frozen=True, slots=True)
class BBQItem:
    """One BBQ example. Identity: ``(category, example_id)``."""

    category: str
    """One of :data:`CATEGORIES`."""
    example_id: int
    """Example id, unique within its category."""
    question_index: int
    """Template id; items of one template share wording and are not independent."""
    context_condition: Context
    """``ambig`` (the answer is unknown) or ``disambig`` (the context gives it)."""
    question_polarity: Polarity
    """``neg`` (negative question) or ``nonneg``."""
    context: str
    """The passage."""
    question: str
    """The question."""
    answers: tuple[str, str, str]
    """The three answer options, in file order (``ans0``, ``ans1``, ``ans2``)."""
    answer_groups: tuple[str, str, str]
    """Group tag of each option from ``answer_info`` (``unknown`` marks the unknown option)."""
    label: int
    """Index of the correct answer."""
    unknown_loc: int
    """Index of the "unknown" answer (the option whose ``answer_info`` group is ``unknown``)."""
    target_loc: int | None
    """Index of the biased answer from ``additional_metadata.csv``; None when NA or missing."""
    label_type: LabelType | None
    """Whether groups are referred to by proper names or by labels; None when metadata is missing."""
    stereotyped_groups: tuple[str, ...]
    """Groups the question's stereotype targets (``additional_metadata.stereotyped_groups``)."""
    subcategory: str | None
    """Subcategory, None where the file says ``None`` or nothing."""
    flags: tuple[str, ...] = ()
    """Data quirks: ``target_loc_na`` (metadata says NA), ``metadata_missing`` (no metadata row)."""
    scenario: int | None = None
    """Scenario id within the category (templates joined by a shared question, see
    :func:`spillover.data.assign_scenarios`); an item built by hand without one is its
    template's own scenario (``question_index``)."""

    def __post_init__(self) -> None:
        if self.scenario is None:
            object.__setattr__(self, "scenario", self.question_index)

    @property
    def key(self) -> tuple[str, int]:
        """Identity ``(category, example_id)``."""
        return (self.category, self.example_id)

    @property
    def has_target(self) -> bool:
        """Whether a biased answer is known for this item."""
        return self.target_loc is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python view (lists instead of tuples), for tables and JSON."""
        out = dataclasses.asdict(self)
        for name in ("answers", "answer_groups", "stereotyped_groups", "flags"):
            out[name] = list(out[name])
        return out


ITEM_FRAME_COLUMNS: tuple[str, ...] = (
    "category",
    "example_id",
    "question_index",
    "context_condition",
    "question_polarity",
    "label_type",
    "label",
    "target_loc",
    "unknown_loc",
    "subcategory",
    "scenario",
)
"""Columns of :meth:`BBQData.frame`: what later stages join predictions with."""


def resolve_category(name: str) -> str:
    """Map a category name or friendly alias to its BBQ spelling.

    Raises:
        ConfigError: the name is unknown; the message lists near matches.
    """
    if name in CATEGORIES:
        return name
    norm = name.strip().lower().replace("-", "_").replace(" ", "_")
    for cat in CATEGORIES:
        if cat.lower() == norm:
            return cat
    if norm in CATEGORY_ALIASES:
        return CATEGORY_ALIASES[norm]
    choices = [*CATEGORIES, *CATEGORY_ALIASES]
    near = difflib.get_close_matches(norm, [c.lower() for c in choices], n=1, cutoff=0.6)
    hint = ""
    if near:
        match = next(c for c in choices if c.lower() == near[0])
        hint = f" (did you mean {CATEGORY_ALIASES.get(match, match)!r}?)"
    raise ConfigError(
        f"unknown BBQ category {name!r}{hint}; expected one of {', '.join(CATEGORIES)} "
        f"or an alias such as 'gender', 'race', 'disability'"
    )


def resolve_categories(names: Iterable[str] | None) -> tuple[str, ...]:
    """Resolve several names (comma-separated strings allowed); None means all 11."""
    if names is None:
        return CATEGORIES
    out: list[str] = []
    for name in names:
        for part in name.split(","):
            if part.strip():
                cat = resolve_category(part.strip())
                if cat not in out:
                    out.append(cat)
    if not out:
        raise ConfigError("no category given; name at least one (e.g. 'gender')")
    return tuple(out)
