"""Prompt formats: how a BBQ item becomes a prompt plus three scored continuations.

Shared by evaluation (what is scored) and preference pairs (what is trained), so
that a model is aligned on exactly the text it is evaluated on.

Formats:

``lm-eval``
    lm-evaluation-harness's BBQ prompt, ``"{context}\\n\\nQ: {question}\\nA:"``,
    each answer scored as the continuation ``" {answer}"``.
``letters``
    Plain text with the options listed as ``A.``/``B.``/``C.``; the letter is
    scored as the continuation ``" A"``.
``letters-chat``
    The same question put as a user message through the model's chat template
    (with the generation prompt); the letter (``"A"``) is scored as the first
    token of the assistant's reply. Needs a tokenizer with a chat template.

Answer order can be permuted (``order``) to separate position bias from content:
displayed position ``j`` shows original answer ``order[j]``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .data import BBQItem
from .errors import ConfigError

PromptFormat = Literal["lm-eval", "letters", "letters-chat"]
PROMPT_FORMATS: tuple[str, ...] = ("lm-eval", "letters", "letters-chat")
PermutationMode = Literal["none", "cyclic", "all"]
PERMUTATION_MODES: tuple[str, ...] = ("none", "cyclic", "all")
LETTERS = ("A", "B", "C")
IDENTITY: tuple[int, int, int] = (0, 1, 2)

INSTRUCTION = "Answer with the letter of the correct option."


@dataclass(frozen=True, slots=True)
class RenderedItem:
    """A prompt and its three continuations, in displayed order."""

    prompt: str
    """Text the continuations are scored after (chat template already applied)."""
    continuations: tuple[str, str, str]
    """Scored continuation of each displayed option."""
    order: tuple[int, int, int]
    """``order[j]`` is the original answer index shown at position ``j``."""

    def original_index(self, displayed: int) -> int:
        """Map a displayed option position back to the item's answer index."""
        return self.order[displayed]


def check_format(fmt: str) -> PromptFormat:
    """Validate a prompt format name."""
    if fmt not in PROMPT_FORMATS:
        raise ConfigError(f"`prompt_format`={fmt!r}; expected one of {', '.join(PROMPT_FORMATS)}")
    return fmt  # type: ignore[return-value]


def permutations(mode: str) -> list[tuple[int, int, int]]:
    """Answer orders for a permutation mode: 1 (none), 3 (cyclic) or 6 (all)."""
    if mode == "none":
        return [IDENTITY]
    if mode == "cyclic":
        return [(0, 1, 2), (1, 2, 0), (2, 0, 1)]
    if mode == "all":
        return [tuple(p) for p in itertools.permutations(range(3))]  # type: ignore[misc]
    raise ConfigError(f"`permutations`={mode!r}; expected one of {', '.join(PERMUTATION_MODES)}")


def permutation_id(order: Sequence[int]) -> str:
    """Stable name of an answer order, e.g. ``"012"`` for the original order."""
    return "".join(str(i) for i in order)


def _check_order(order: Sequence[int]) -> tuple[int, int, int]:
    if sorted(order) != [0, 1, 2]:
        raise ConfigError(f"answer order {tuple(order)} is not a permutation of (0, 1, 2)")
    return (int(order[0]), int(order[1]), int(order[2]))


def _letters_body(item: BBQItem, order: tuple[int, int, int]) -> str:
    options = "\n".join(f"{LETTERS[j]}. {item.answers[k]}" for j, k in enumerate(order))
    return f"{item.context}\n\nQuestion: {item.question}\n{options}\n{INSTRUCTION}"


def is_chat_format(prompt_format: str) -> bool:
    """Whether a prompt format renders through a model's chat template (``letters-chat``)."""
    return prompt_format.endswith("-chat")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether a tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render(
    item: BBQItem,
    fmt: str = "lm-eval",
    *,
    tokenizer: Any = None,
    order: Sequence[int] = IDENTITY,
) -> RenderedItem:
    """Render one item in a prompt format.

    Args:
        item: The BBQ item.
        fmt: One of :data:`PROMPT_FORMATS`.
        tokenizer: Needed for ``letters-chat`` (its chat template is applied).
        order: Displayed answer order.

    Raises:
        ConfigError: unknown format, bad order, or a chat format without a chat template.
    """
    fmt = check_format(fmt)
    perm = _check_order(order)
    if fmt == "lm-eval":
        prompt = f"{item.context}\n\nQ: {item.question}\nA:"
        a, b, c = (f" {item.answers[k]}" for k in perm)
        return RenderedItem(prompt, (a, b, c), perm)
    if fmt == "letters":
        return RenderedItem(_letters_body(item, perm) + "\nAnswer:", (" A", " B", " C"), perm)
    if tokenizer is None or not has_chat_template(tokenizer):
        raise ConfigError(
            "prompt format 'letters-chat' needs a model with a chat template; "
            "this tokenizer has none (use --prompt-format lm-eval or letters)"
        )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": _letters_body(item, perm)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return RenderedItem(str(prompt), ("A", "B", "C"), perm)


__all__ = [
    "IDENTITY",
    "PERMUTATION_MODES",
    "PROMPT_FORMATS",
    "PromptFormat",
    "RenderedItem",
    "check_format",
    "has_chat_template",
    "permutation_id",
    "permutations",
    "render",
]
