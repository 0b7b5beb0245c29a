"""Winogender items: ``all_sentences.tsv`` and ``occupations-stats.tsv`` ->
:class:`ProbeItem` records, posed as lm-evaluation-harness's ``winogender`` task poses them."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from .parse import csv_rows, decode_utf8, line_error, short_repr
from .probes import PROBES, ProbeItem

SENTENCES = "all_sentences.tsv"
"""``sentid<TAB>sentence``, 720 rows."""
STATS = "occupations-stats.tsv"
"""``occupation<TAB>bergsma_pct_female<TAB>bls_pct_female<TAB>bls_year``, 60 rows."""
FILES = (SENTENCES, STATS)
PRONOUNS: Mapping[str, frozenset[str]] = {
    "male": frozenset({"he", "him", "his"}),
    "female": frozenset({"she", "her", "hers"}),
    "neutral": frozenset({"they", "them", "their", "theirs"}),
}
"""The pronouns of each gender a sentence may hold (nominative, accusative, possessive)."""
ANSWERS = {"0": "occupation", "1": "participant"}
"""``answer`` of a ``sentid``: whom the pronoun refers to."""
_WORD = re.compile(r"[A-Za-z]+")


def parse_winogender(
    blobs: Mapping[str, bytes], paths: Mapping[str, str] | None = None
) -> tuple[ProbeItem, ...]:
    """The 720 Winogender sentences, in file order.

    The ``sentid`` (``{occupation}.{participant}.{answer}.{gender}.txt``) gives the
    occupation, the other participant (``someone`` in the sentences that name none, as
    lm-evaluation-harness's dataset ``oskarvanderwal/winogender`` keeps it), the answer
    (0: the occupation, 1: the participant) and the pronoun's gender. Like that task, the
    context is ``"{sentence} ‘{Pronoun}’ refers to the"`` (the sentence's one pronoun of
    that gender, capitalised) and the options ``" " + occupation`` and
    ``" " + participant``; ``label`` is the answer. The cluster is the occupation, the group
    the gender. A male or female sentence whose gender is not the occupation's majority
    gender by the US Bureau of Labor Statistics (``bls_pct_female`` above 50: female) is
    flagged ``gotcha`` (240 sentences: lm-evaluation-harness's ``winogender_gotcha``).

    Args:
        blobs: ``all_sentences.tsv`` and ``occupations-stats.tsv`` (LF) by file name.
        paths: Where each was read from, for messages (default: its name).

    Raises:
        DataError: a malformed ``sentid``, an occupation without statistics, a sentence
            without exactly one pronoun of its gender, a bad percentage, naming file, line and
            field.

    References:
        Rudinger, Naradowsky, Leonard, Van Durme, "Gender Bias in Coreference Resolution",
        NAACL 2018. Files: ``data/all_sentences.tsv`` and ``data/occupations-stats.tsv`` of
        https://github.com/rudinger/winogender-schemas.
    """
    where = dict(paths or {})
    female = _majority_female(blobs[STATS], where.get(STATS, STATS))
    path = where.get(SENTENCES, SENTENCES)
    text = decode_utf8(blobs[SENTENCES], path, kind="text")
    spec = PROBES["winogender"]
    items: list[ProbeItem] = []
    seen: dict[str, int] = {}
    for line, row in csv_rows(text, path, ("sentid", "sentence"), delimiter="\t"):
        sentid, sentence = (row["sentid"] or "").strip(), (row["sentence"] or "").strip()
        if sentid in seen:
            raise line_error(path, line, f"field 'sentid'={sentid!r} repeats line {seen[sentid]}")
        seen[sentid] = line
        occupation, participant, answer, gender = _sentid(sentid, path, line)
        if occupation not in female:
            raise line_error(
                path,
                line,
                f"field 'sentid'={sentid!r}: occupation {occupation!r} is not in {STATS}; "
                "expected one of its occupations",
            )
        pronoun = _pronoun(sentence, gender, path, line)
        majority = "female" if female[occupation] else "male"
        gotcha = gender != "neutral" and gender != majority
        items.append(
            ProbeItem(
                benchmark=spec.name,
                item_id=sentid,
                attribute=spec.attribute_of["gender"],
                bias_type="gender",
                cluster=occupation,
                split="all",
                group=gender,
                context=f"{sentence} \u2018{pronoun.capitalize()}\u2019 refers to the",
                options=(f" {occupation}", f" {participant}"),
                roles=spec.roles,
                label=int(answer),
                flags=("gotcha",) if gotcha else (),
            )
        )
    if not items:
        raise line_error(path, 1, "no sentences; expected 'sentid<TAB>sentence' rows")
    return tuple(items)


def _sentid(sentid: str, path: str, line: int) -> tuple[str, str, str, str]:
    """``(occupation, participant, answer, gender)`` of a ``sentid``."""
    parts = sentid.split(".")
    if (
        len(parts) != 5
        or parts[4] != "txt"
        or not all(parts[:2])
        or parts[2] not in ANSWERS
        or parts[3] not in PRONOUNS
    ):
        raise line_error(
            path,
            line,
            f"field 'sentid'={short_repr(sentid)}; expected "
            "'<occupation>.<participant>.<0|1>.<male|female|neutral>.txt'",
        )
    return parts[0], parts[1], parts[2], parts[3]


def _pronoun(sentence: str, gender: str, path: str, line: int) -> str:
    """The sentence's one pronoun of ``gender``, as written."""
    found = [str(w) for w in _WORD.findall(sentence) if w.lower() in PRONOUNS[gender]]
    if len(found) != 1:
        raise line_error(
            path,
            line,
            f"field 'sentence'={short_repr(sentence)} holds {len(found)} {gender} pronouns; "
            f"expected exactly one of {', '.join(sorted(PRONOUNS[gender]))}",
        )
    return found[0]


def _majority_female(data: bytes, path: str) -> dict[str, bool]:
    """Occupation -> whether most of its workers are women (``bls_pct_female`` > 50)."""
    text = decode_utf8(data, path, kind="text")
    out: dict[str, bool] = {}
    for line, row in csv_rows(text, path, ("occupation", "bls_pct_female"), delimiter="\t"):
        occupation = (row["occupation"] or "").strip()
        raw = (row["bls_pct_female"] or "").strip()
        try:
            pct = float(raw)
        except ValueError:
            pct = math.nan
        if not occupation or not 0 <= pct <= 100:
            field = "occupation" if not occupation else "bls_pct_female"
            raise line_error(
                path,
                line,
                f"field {field!r}={short_repr(row[field])}; expected "
                + ("an occupation" if not occupation else "a percentage from 0 to 100"),
            )
        if occupation in out:
            raise line_error(path, line, f"field 'occupation'={occupation!r} is listed twice")
        out[occupation] = pct > 50
    return out
