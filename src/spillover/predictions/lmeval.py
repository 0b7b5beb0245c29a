"""Logs of lm-evaluation-harness (``lm_eval --log_samples``) read as prediction rows.

lm-eval writes one ``samples_<task>_<date>.jsonl`` per task, one JSON object per document
(``lm_eval/evaluator.py``, ``lm_eval/loggers/evaluation_tracker.py``): ``doc_id``, ``doc``
(the task's document, for BBQ tasks the BBQ record), ``arguments`` (one ``(context,
continuation)`` request per choice: ``{"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...}``,
a list of lists in older versions), ``resps`` / ``filtered_resps`` (per choice
``[log-likelihood, is_greedy]``, written as strings), ``filter``, ``target``, the hashes and
the task's metrics. This module turns each sample into the row a prediction file holds:
``category`` and ``example_id`` from the ``doc``; ``pred_index``, the BBQ answer of the
highest-scoring choice (``np.argmax``, as lm-eval's ``acc``); ``score_0..2``, the summed
log-likelihood of each BBQ answer.

Choices are mapped to BBQ's answers by their text (case, punctuation and spacing ignored).
The stock ``bbq`` task offers 12 choices (``lm_eval/tasks/bbq/utils.py::doc_to_choice``):
the item's two answers that are not "unknown", then :data:`LM_EVAL_UNKNOWN_PHRASINGS`;
every phrasing maps to the item's unknown answer (``unknown_loc``), whose score is the
best of them. A custom task with choices ``[ans0, ans1, ans2]`` maps one to one. The table
and the rules: ``docs/predictions.md``, "Logs of lm-evaluation-harness".

Only the standard library is imported here: the command line reads the constants at start-up.
"""

from __future__ import annotations

import difflib
import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError

PredictionFormat = Literal["auto", "parquet", "csv", "jsonl", "lm-eval"]
PREDICTION_FORMATS: tuple[str, ...] = ("auto", "parquet", "csv", "jsonl", "lm-eval")
"""Values of ``format`` (``--format``): ``auto`` chooses by suffix and reads a JSONL file whose
first record is an lm-evaluation-harness sample as ``lm-eval``."""

LengthNorm = Literal["none", "char", "byte"]
LM_EVAL_LENGTH_NORMS: tuple[str, ...] = ("none", "char", "byte")
"""Values of ``length_norm`` (``--length-norm``) for lm-eval logs: which of lm-eval's
multiple-choice decisions to read, ``none`` = ``acc`` (argmax of the summed log-likelihoods),
``char`` = ``acc_norm`` (per character of the choice), ``byte`` = ``acc_bytes`` (per UTF-8
byte)."""

_METRIC_OF_NORM = {"none": "acc", "char": "acc_norm", "byte": "acc_bytes"}

LM_EVAL_UNKNOWN_PHRASINGS: tuple[str, ...] = (
    "Unknown",
    "Cannot answer",
    "Can't be determined",
    "Cannot be determined",
    "Can't answer",
    "Not known",
    "Not enough info",
    "Not enough information",
    "Not answerable",
    "Undetermined",
)
"""The ten "unknown" choices of lm-eval's stock ``bbq`` task (``UNKNOWN_RESPONSES`` in
``lm_eval/tasks/bbq/utils.py``, copied there from HELM), in its order."""

LM_EVAL_EXTRA_UNKNOWN: tuple[str, ...] = ("Don't know", "Do not know", "Can't know", "Cannot know")
"""Four more phrasings lm-eval's generation variant accepts (``UNKNOWN_RESPONSES_ALL``);
read as "unknown" choices too."""

SAMPLE_FIELDS: tuple[str, ...] = ("doc_id", "doc", "arguments", "filtered_resps")
"""Fields an lm-eval sample must have here (``resps`` stands in for ``filtered_resps``)."""

_LAYOUT_HINT = (
    "expected lm-eval's stock 12-choice bbq task (two answers, then its ten 'unknown' "
    "phrasings) or a task whose choices are BBQ's answers [ans0, ans1, ans2]"
)


def normalize_text(text: str) -> str:
    """Text as choices are compared: case-folded, punctuation dropped (any Unicode
    punctuation, so ``Can't`` = ``Can’t`` = ``Cant``), spacing collapsed."""
    kept = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.casefold().split())


_UNKNOWN_NORMS = frozenset(
    normalize_text(t) for t in (*LM_EVAL_UNKNOWN_PHRASINGS, *LM_EVAL_EXTRA_UNKNOWN)
)
_STOCK_UNKNOWN = tuple(normalize_text(t) for t in LM_EVAL_UNKNOWN_PHRASINGS)


def check_reading(format: str, length_norm: str) -> None:
    """Refuse an unknown ``format`` or ``length_norm`` (before any work).

    Raises:
        ConfigError: naming the option, the value, a near match and the choices.
    """
    for option, value, allowed in (
        ("--format", format, PREDICTION_FORMATS),
        ("--length-norm", length_norm, LM_EVAL_LENGTH_NORMS),
    ):
        if value not in allowed:
            near = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"`{option}`={value!r} is not one of {', '.join(allowed)}{hint}")


def is_lm_eval_sample(rec: object) -> bool:
    """Whether a JSON record looks like an lm-eval sample (and not like a prediction row)."""
    return (
        isinstance(rec, dict)
        and "pred_index" not in rec
        and isinstance(rec.get("doc"), dict)
        and ("filtered_resps" in rec or "resps" in rec)
        and ("doc_id" in rec or "arguments" in rec)
    )


@dataclass(frozen=True, slots=True)
class Sample:
    """One lm-eval sample read as a prediction row."""

    row: dict[str, Any]
    """``category``, ``example_id`` (as the doc has them), ``pred_index``, ``score_0..2``,
    ``label``, ``unknown_loc`` and ``doc_id``."""
    n_choices: int
    """Choices the task offered."""
    stock: bool
    """Whether the choices are the stock 12-choice layout."""
    own_metric_disagrees: bool
    """Whether the sample's own ``acc`` (``acc_norm``, ``acc_bytes``) disagrees with the
    correctness of ``pred_index`` against the doc's ``label``."""


class _Line:
    """Error messages for one line of a log."""

    def __init__(self, path: Path, lineno: int, doc_id: object) -> None:
        self.prefix = f"{path}:{lineno}: sample doc_id={doc_id!r}"

    def error(self, what: str) -> DataError:
        """``path:line: sample doc_id=N has ...`` or ``path:line: sample doc_id=N: what``."""
        sep = " " if what.startswith("has ") else ": "
        return DataError(f"{self.prefix}{sep}{what}")


def read_sample(
    path: Path, lineno: int, rec: Mapping[str, Any], length_norm: str = "none"
) -> Sample:
    """Map one lm-eval sample to a prediction row (see the module docstring).

    Raises:
        DataError: ``path:line``: no BBQ identity in the doc, missing or malformed
            requests or log-likelihoods, a choice that is no BBQ answer, a BBQ answer no
            choice offers.
    """
    line = _Line(path, lineno, rec.get("doc_id"))
    for name in ("doc", "arguments"):
        if name not in rec:
            raise line.error(f"has no {name!r} field; expected an lm-evaluation-harness sample")
    doc = rec["doc"]
    if not isinstance(doc, dict):
        raise line.error(f"field 'doc' is {type(doc).__name__}; expected the BBQ record")
    missing = [k for k in ("category", "example_id") if doc.get(k) is None]
    if missing:
        raise line.error(
            f"has no BBQ identity: its 'doc' lacks {' and '.join(map(repr, missing))} "
            f"(found {', '.join(map(repr, list(doc)[:8]))}); only tasks whose documents "
            "are BBQ records can be read"
        )
    answers = _answers(doc, line)
    unknown = _unknown_loc(doc, answers, line)
    choices = _choices(rec["arguments"], line)
    lls = _loglikelihoods(rec, len(choices), line)
    mapping = _map_choices(choices, answers, unknown, line)
    decisive = _normalised(lls, choices, length_norm, line)
    best = max(range(len(choices)), key=lambda j: (decisive[j], -j))  # np.argmax: first max
    pred = mapping[best]
    scores = [max(lls[j] for j in range(len(choices)) if mapping[j] == k) for k in range(3)]
    row = {
        "category": doc["category"],
        "example_id": doc["example_id"],
        "pred_index": pred,
        "score_0": scores[0],
        "score_1": scores[1],
        "score_2": scores[2],
        "label": doc.get("label"),
        "unknown_loc": unknown,
        "doc_id": rec.get("doc_id"),
    }
    own = rec.get(_METRIC_OF_NORM[length_norm])
    disagrees = (
        isinstance(own, (int, float))
        and not isinstance(own, bool)
        and isinstance(doc.get("label"), int)
        and bool(own) != (pred == doc["label"])
    )
    stock = len(choices) == 12 and tuple(normalize_text(c) for c in choices[2:]) == _STOCK_UNKNOWN
    return Sample(row, len(choices), stock, disagrees)


def _answers(doc: Mapping[str, Any], line: _Line) -> tuple[str, str, str]:
    texts = [doc.get(f"ans{i}") for i in range(3)]
    if not all(isinstance(t, str) for t in texts):
        bad = next(f"ans{i}" for i, t in enumerate(texts) if not isinstance(t, str))
        raise line.error(
            f"its 'doc' has no text answer {bad!r}; the BBQ answers ans0, ans1, ans2 are "
            "needed to map lm-eval's choices to them"
        )
    return (texts[0], texts[1], texts[2])  # type: ignore[return-value]


def _unknown_loc(doc: Mapping[str, Any], answers: Sequence[str], line: _Line) -> int:
    """BBQ's unknown answer: tagged ``unknown`` in ``answer_info`` (as spillover's data layer
    reads it), checked against the text (as lm-eval's ``doc_to_choice`` finds it)."""
    info = doc.get("answer_info")
    tagged: list[int] = []
    if isinstance(info, dict):
        for i in range(3):
            entry = info.get(f"ans{i}")
            if isinstance(entry, list) and len(entry) >= 2 and entry[-1] == "unknown":
                tagged.append(i)
    by_text = [i for i, a in enumerate(answers) if normalize_text(a) in _UNKNOWN_NORMS]
    if len(tagged) == 1:
        if by_text and tagged != by_text:
            raise line.error(
                f"its 'answer_info' tags ans{tagged[0]} as unknown but ans{by_text[0]} "
                f"({answers[by_text[0]]!r}) is an 'unknown' phrasing; the doc is not a BBQ record"
            )
        return tagged[0]
    if len(by_text) == 1:
        return by_text[0]
    raise line.error(
        "its 'doc' does not say which answer is BBQ's 'unknown' (no single answer_info "
        "tag 'unknown', no single answer among lm-eval's unknown phrasings)"
    )


def _choices(arguments: Any, line: _Line) -> list[str]:
    """The continuation of each request (``arg_1`` of ``gen_args_i``, or ``[context,
    continuation]`` in older logs)."""
    requests: list[Any]
    if isinstance(arguments, dict):
        keys = sorted(arguments, key=lambda k: (len(str(k)), str(k)))  # gen_args_2 < gen_args_10
        requests = [arguments[k] for k in keys]
    elif isinstance(arguments, list):
        requests = arguments
    else:
        raise line.error(f"field 'arguments' is {type(arguments).__name__}; expected the requests")
    out = []
    for j, req in enumerate(requests):
        cont = req.get("arg_1") if isinstance(req, dict) else None
        if isinstance(req, list) and len(req) == 2:
            cont = req[1]
        if not isinstance(cont, str):
            raise line.error(
                f"request {j} has no text continuation ({str(req)[:60]}); expected a "
                "log-likelihood (multiple_choice) task, not generate_until"
            )
        out.append(cont)
    if not out:
        raise line.error("has no requests (empty 'arguments')")
    return out


def _loglikelihoods(rec: Mapping[str, Any], n: int, line: _Line) -> list[float]:
    """The log-likelihood of each choice from ``filtered_resps`` (else the first of each
    ``resps``); lm-eval writes them as strings."""
    if "filtered_resps" in rec:
        resps = rec["filtered_resps"]
        field = "filtered_resps"
    else:
        raw = rec.get("resps")
        resps = (
            [r[0] if isinstance(r, list) and r else r for r in raw]
            if isinstance(raw, list)
            else raw
        )
        field = "resps"
    if not isinstance(resps, list) or len(resps) != n:
        size = len(resps) if isinstance(resps, list) else type(resps).__name__
        raise line.error(f"field {field!r} holds {size} responses for {n} choices")
    out = []
    for j, resp in enumerate(resps):
        value = resp[0] if isinstance(resp, list) and len(resp) == 2 else None
        ll = _float(value)
        if ll is None or math.isnan(ll) or ll == math.inf:
            raise line.error(
                f"field {field!r}[{j}]={str(resp)[:60]!r}; expected [log-likelihood, "
                "is_greedy] (a log-likelihood task, not generate_until)"
            )
        out.append(ll)
    return out


def _float(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _map_choices(
    choices: Sequence[str], answers: Sequence[str], unknown: int, line: _Line
) -> list[int]:
    """The BBQ answer each choice stands for: an answer's own text, else an unknown phrasing
    (-> ``unknown``); every answer must be offered, those not "unknown" exactly once."""
    norms = [normalize_text(a) for a in answers]
    mapping: list[int] = []
    for j, choice in enumerate(choices):
        text = normalize_text(choice)
        same = [i for i, a in enumerate(norms) if a == text]
        if len(same) > 1:
            raise line.error(
                f"choice {j} {choice.strip()!r} matches several BBQ answers "
                f"({', '.join(f'ans{i}' for i in same)})"
            )
        if same:
            mapping.append(same[0])
        elif text in _UNKNOWN_NORMS:
            mapping.append(unknown)
        else:
            raise line.error(
                f"choice {j} {choice.strip()[:60]!r} is neither a BBQ answer of the item "
                f"({', '.join(map(repr, answers))}) nor an 'unknown' phrasing; {_LAYOUT_HINT}"
            )
    for i in range(3):
        count = mapping.count(i)
        if count == 0:
            raise line.error(f"no choice offers BBQ answer ans{i} {answers[i]!r}; {_LAYOUT_HINT}")
        if count > 1 and i != unknown:
            raise line.error(
                f"BBQ answer ans{i} {answers[i]!r} is offered {count} times; {_LAYOUT_HINT}"
            )
    return mapping


def _normalised(
    lls: Sequence[float], choices: Sequence[str], length_norm: str, line: _Line
) -> list[float]:
    """What the argmax runs over: the log-likelihoods, or divided by each choice's length
    (the continuation less one leading space, lm-eval's default ``target_delimiter``)."""
    if length_norm == "none":
        return list(lls)
    out = []
    for j, (ll, choice) in enumerate(zip(lls, choices, strict=True)):
        text = choice.removeprefix(" ")
        size = len(text) if length_norm == "char" else len(text.encode("utf-8"))
        if size == 0:
            raise line.error(
                f"choice {j} is empty; --length-norm {length_norm} divides by its length"
            )
        out.append(ll / size)
    return out


def read_log(
    path: Path, records: Sequence[tuple[int, Any]], length_norm: str = "none"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Map every sample of one lm-eval samples file (``(line, record)`` pairs) to a row.

    Returns:
        The rows (as :class:`Sample.row`) in file order, and notes for the reader's
        ``attrs["notes"]``: the stock 12-choice layout's tilt, and samples whose own
        metric disagrees with the prediction read.

    Raises:
        DataError: ``path:line`` of the first sample that is not an lm-eval sample, or that
            mixes tasks or runs into the file (another choice layout, another ``filter``, a
            ``doc_id`` seen before), and any error of :func:`read_sample`.
    """
    rows: list[dict[str, Any]] = []
    first: tuple[int, Sample, object] | None = None
    seen: dict[str, int] = {}
    disagree = 0
    for lineno, rec in records:
        if not is_lm_eval_sample(rec):
            raise DataError(
                f"{path}:{lineno}: not an lm-evaluation-harness sample (expected fields "
                f"{', '.join(SAMPLE_FIELDS)}); a samples file holds one per line and nothing else"
            )
        sample = read_sample(path, lineno, rec, length_norm)
        doc_id = str(rec.get("doc_id"))
        if doc_id in seen:
            raise DataError(
                f"{path}:{lineno}: doc_id {rec.get('doc_id')!r} appears again (first at line "
                f"{seen[doc_id]}): the file mixes the samples of several tasks or runs; lm-eval "
                "writes one samples_<task>_<date>.jsonl per task: pass each on its own"
            )
        seen[doc_id] = lineno
        if first is None:
            first = (lineno, sample, rec.get("filter"))
        elif sample.n_choices != first[1].n_choices or sample.stock != first[1].stock:
            raise DataError(
                f"{path}:{lineno}: {_layout(sample)} where line {first[0]} has "
                f"{_layout(first[1])}: the file mixes tasks; pass each task's samples file "
                "on its own"
            )
        elif rec.get("filter") != first[2]:
            raise DataError(
                f"{path}:{lineno}: filter {rec.get('filter')!r} where line {first[0]} has "
                f"{first[2]!r}: the file mixes filters (lm-eval logs a sample per filter); "
                "keep the lines of one filter"
            )
        disagree += sample.own_metric_disagrees
        rows.append(sample.row)
    notes = []
    if first is not None and first[1].stock:
        notes.append(
            f"{path}: lm-eval's stock 12-choice BBQ layout: its ten 'unknown' phrasings are "
            "read as each item's unknown answer (score: the best of them); offering ten ways "
            "to say 'unknown' tilts predictions toward it (docs/predictions.md)"
        )
    if disagree:
        metric = _METRIC_OF_NORM[length_norm]
        notes.append(
            f"{path}: {disagree} sample(s) whose own {metric!r} disagrees with the prediction "
            "read from their log-likelihoods against the doc's label; check that the task's "
            f"target is BBQ's label and that --length-norm {length_norm} is the decision wanted"
        )
    return rows, notes


def _layout(sample: Sample) -> str:
    return "the stock 12-choice layout" if sample.stock else f"{sample.n_choices} choices"
