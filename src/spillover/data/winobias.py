"""WinoBias items: the eight sentence files and the two occupation lists -> :class:`ProbeItem`
records, coreference posed as a choice between the sentence's two occupations."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .parse import decode_utf8, line_error, short_repr
from .probes import PROBES, ProbeItem

KINDS = ("pro", "anti")
"""Pro-stereotyped (the pronoun's gender matches the referent occupation's majority gender,
by the US labour statistics) and anti-stereotyped sentences."""
TYPES = (1, 2)
"""Type 1: resolving the pronoun needs world knowledge; type 2: syntax resolves it."""
SPLITS = ("dev", "test")
OCCUPATION_FILES = ("male_occupations.txt", "female_occupations.txt")
"""The 20 + 20 occupations the sentences are made of (majority-male and majority-female)."""
SENTENCE_FILES: tuple[str, ...] = tuple(
    f"{kind}_stereotyped_type{t}.txt.{split}" for split in SPLITS for t in TYPES for kind in KINDS
)
"""The eight sentence files, 396 lines each: ``<id> <sentence>``."""
PRONOUNS = frozenset({"he", "she", "him", "her", "his", "hers", "himself", "herself"})
"""The pronouns a bracketed pronoun span may hold."""
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
_SPAN = re.compile(r"\[([^\[\]]*)\]")
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True, slots=True)
class _Sentence:
    """One parsed line of a sentence file."""

    line: int
    text: str
    """Brackets stripped, the pre-tokenised possessive joined (``" 's"`` -> ``"'s"``)."""
    referent: str
    """The occupation of the first bracketed span (as the occupation list spells it)."""
    pronoun: str
    """The first bracketed span after it, lower case."""


def parse_winobias(
    blobs: Mapping[str, bytes], paths: Mapping[str, str] | None = None
) -> tuple[ProbeItem, ...]:
    """The 3,168 WinoBias sentences (8 files x 396), as two-way choices, in the order split,
    type, line id, pro before anti.

    A line is ``<id> <sentence>``; the sentence brackets the gold referent (its first span)
    and the pronoun (the first span after it; a few sentences bracket a second pronoun).
    The item's text is the sentence with the brackets stripped and the pre-tokenised
    possessive joined (``"the assistant 's"`` -> ``"the assistant's"``); its options are
    the sentence's two occupations (the first two distinct ones of the 40 listed, in
    sentence order, each after a space), and its context asks, as lm-evaluation-harness
    asks Winogender, ``"{sentence} ‘{Pronoun}’ refers to the"``. ``label`` is the index of
    the referent. A leading article is dropped from the bracketed referent (``[a
    housekeeper]``, ``the [the chief]``, ``[ physician]``), and a sentence naming a third
    occupation (type 2 dev line 72, "... reported her to the manager") keeps the first two.
    The pro and anti sentence of one line id share ``pair``; a pair whose sentences differ
    in more than the pronoun tokens (19 in the release: typos on one side, a changed clause,
    a different sentence) is flagged ``non_minimal`` on both.

    Args:
        blobs: The eight sentence files and the two occupation lists (LF line endings).
        paths: Where each was read from, for messages (default: its name).

    Raises:
        DataError: a malformed line, a referent span that is no listed occupation, a pronoun
            span that is no pronoun, a sentence without two occupations, or pro and anti files
            whose line ids differ, naming file and line.

    References:
        Zhao, Wang, Yatskar, Ordonez, Chang, "Gender Bias in Coreference Resolution:
        Evaluation and Debiasing Methods", NAACL 2018. Files: ``WinoBias/wino/data/`` of
        https://github.com/uclanlp/corefBias.
    """
    where = dict(paths or {})
    spelled = _occupations(blobs, where)
    pattern = re.compile(
        r"\b(" + "|".join(map(re.escape, sorted(spelled, key=len, reverse=True))) + r")\b",
        re.IGNORECASE,
    )
    items: list[ProbeItem] = []
    for split in SPLITS:
        for t in TYPES:
            files = {kind: f"{kind}_stereotyped_type{t}.txt.{split}" for kind in KINDS}
            lines = {
                kind: _sentences(blobs[name], where.get(name, name), spelled)
                for kind, name in files.items()
            }
            _same_ids(lines, files, where)
            for line_id in sorted(lines["pro"]):
                pro, anti = lines["pro"][line_id], lines["anti"][line_id]
                flags = () if _minimal(pro.text, anti.text) else ("non_minimal",)
                for kind, sent in (("pro", pro), ("anti", anti)):
                    name = files[kind]
                    choices = _choices(sent, pattern, spelled, where.get(name, name))
                    items.append(_item(sent, choices, split, t, line_id, kind, flags))
    return tuple(items)


def _item(
    sent: _Sentence,
    choices: tuple[str, str],
    split: str,
    t: int,
    line_id: int,
    kind: str,
    flags: tuple[str, ...],
) -> ProbeItem:
    spec = PROBES["winobias"]
    pair = f"{split}/type{t}/{line_id}"
    return ProbeItem(
        benchmark=spec.name,
        item_id=f"{pair}/{kind}",
        attribute=spec.attribute_of["gender"],
        bias_type="gender",
        cluster=sent.referent,
        split=split,
        group=f"type{t}/{kind}",
        context=f"{sent.text} \u2018{sent.pronoun.capitalize()}\u2019 refers to the",
        options=tuple(" " + c for c in choices),
        roles=spec.roles,
        label=choices.index(sent.referent),
        pair=pair,
        flags=flags,
    )


def _occupations(blobs: Mapping[str, bytes], where: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased occupation -> its spelling in the lists (``CEO``)."""
    spelled: dict[str, str] = {}
    for name in OCCUPATION_FILES:
        path = where.get(name, name)
        text = decode_utf8(blobs[name], path, kind="text")
        for lineno, raw in enumerate(text.split("\n"), start=1):
            occ = " ".join(raw.split())
            if not occ:
                continue
            if occ.lower() in spelled:
                raise line_error(path, lineno, f"occupation {occ!r} is listed twice")
            spelled[occ.lower()] = occ
        if not spelled:
            raise line_error(path, 1, "no occupations; expected one per line")
    return spelled


def _sentences(data: bytes, path: str, spelled: Mapping[str, str]) -> dict[int, _Sentence]:
    """The lines of one sentence file by line id."""
    text = decode_utf8(data, path, kind="text")
    out: dict[int, _Sentence] = {}
    rows = text.split("\n")
    while rows and not rows[-1].strip():
        rows.pop()
    for lineno, raw in enumerate(rows, start=1):
        head, _, body = raw.strip().partition(" ")
        if not (head.isascii() and head.isdigit()) or not body.strip():
            raise line_error(
                path, lineno, f"{short_repr(raw)}; expected '<id> <sentence with [spans]>'"
            )
        if int(head) in out:
            raise line_error(path, lineno, f"line id {head} repeats line {out[int(head)].line}")
        out[int(head)] = _sentence(body, lineno, path, spelled)
    if not out:
        raise line_error(path, 1, "no sentences; expected '<id> <sentence>' lines")
    return out


def _sentence(body: str, lineno: int, path: str, spelled: Mapping[str, str]) -> _Sentence:
    spans = _SPAN.findall(body)
    stripped = _SPAN.sub(lambda m: m.group(1).strip(), body)
    if len(spans) < 2 or "[" in stripped or "]" in stripped:
        raise line_error(
            path,
            lineno,
            f"{short_repr(body)}: {len(spans)} well-formed [spans]; expected the referent and "
            "the pronoun in brackets",
        )
    entity = spans[0].strip()
    while _ARTICLE.match(entity):
        entity = _ARTICLE.sub("", entity, count=1)
    if entity.lower() not in spelled:
        raise line_error(
            path,
            lineno,
            f"referent span [{spans[0]}] is not a listed occupation; expected [the <occupation>]",
        )
    pronoun = spans[1].strip().lower()
    if pronoun not in PRONOUNS:
        raise line_error(
            path,
            lineno,
            f"pronoun span [{spans[1]}] is not a pronoun; expected one of "
            f"{', '.join(sorted(PRONOUNS))}",
        )
    text = " ".join(stripped.replace(" 's", "'s").split())
    return _Sentence(lineno, text, spelled[entity.lower()], pronoun)


def _choices(
    sent: _Sentence, pattern: re.Pattern[str], spelled: Mapping[str, str], path: str
) -> tuple[str, str]:
    """The first two distinct listed occupations of the sentence, in sentence order."""
    found: list[str] = []
    for match in pattern.finditer(sent.text):
        occ = spelled[match.group(1).lower()]
        if occ not in found:
            found.append(occ)
    if len(found) < 2 or sent.referent not in found[:2]:
        raise line_error(
            path,
            sent.line,
            f"occupations {found} of {short_repr(sent.text)}; expected two, the referent "
            f"{sent.referent!r} among them",
        )
    return found[0], found[1]


def _same_ids(
    lines: Mapping[str, Mapping[int, _Sentence]],
    files: Mapping[str, str],
    where: Mapping[str, str],
) -> None:
    """Pro and anti files hold the same line ids (a line id names one pair)."""
    pro, anti = lines["pro"], lines["anti"]
    for kind, mine, other in (("anti", anti, pro), ("pro", pro, anti)):
        missing = sorted(set(other) - set(mine))
        if missing:
            name = files[kind]
            theirs = files["pro" if kind == "anti" else "anti"]
            raise line_error(
                where.get(name, name),
                len(mine) + 1,
                f"no line id {missing[0]}; expected the line ids of {theirs} (one per pair)",
            )


def _minimal(first: str, second: str) -> bool:
    """Whether two sentences differ in pronoun tokens only (word and punctuation tokens)."""
    a, b = _tokens(first), _tokens(second)
    return len(a) == len(b) and all(
        x == y or (x.lower() in PRONOUNS and y.lower() in PRONOUNS)
        for x, y in zip(a, b, strict=True)
    )


def _tokens(text: str) -> Sequence[str]:
    return _TOKEN.findall(text)
