"""StereoSet items: ``dev.json`` and ``test.json`` -> :class:`ProbeItem` records."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..errors import DataError
from .parse import decode_utf8, line_error, short_repr
from .probes import PROBES, ProbeItem

SPLITS: Mapping[str, str] = {"dev": "dev.json", "test": "test.json"}
"""Split -> its file."""
TASKS = ("intrasentence", "intersentence")
"""The two tasks: fill a blank in a sentence, or continue a context sentence."""


def parse_stereoset(
    blobs: Mapping[str, bytes], paths: Mapping[str, str] | None = None
) -> tuple[ProbeItem, ...]:
    """Every StereoSet item of both splits and both tasks (dev: 2,106 intrasentence and
    2,123 intersentence items; test: 6,392 and 6,374), split by split, task by task, in
    file order.

    ``item_id`` is ``"{split}/{task}/{id}"``; the options are the item's three sentences
    put in the order of the roles ``stereotype``, ``anti-stereotype``, ``unrelated`` by
    their ``gold_label``. Intrasentence: no context, each option the whole filled sentence.
    Intersentence: the context sentence, and each option a candidate next sentence after a
    space (``" " + sentence``). The cluster is the target term (``grandfather``,
    ``Muslim``), the group the task; the ``profession`` domain is the attribute
    ``Profession``.

    Args:
        blobs: ``dev.json`` and ``test.json`` (LF line endings) by file name.
        paths: Where each was read from, for messages (default: its name).

    Raises:
        DataError: malformed JSON, a missing or ill-typed field, an unknown bias type, or an
            item without exactly one sentence per gold label, naming file, line and field.

    References:
        Nadeem, Bethke, Reddy, "StereoSet: Measuring stereotypical bias in pretrained
        language models", ACL-IJCNLP 2021. Files: ``data/dev.json`` of
        https://github.com/moinnadeem/StereoSet and ``data/stereoset/test.json`` of
        https://github.com/McGill-NLP/bias-bench (the full test set).
    """
    items: list[ProbeItem] = []
    for split, name in SPLITS.items():
        path = (paths or {}).get(name, name)
        text = decode_utf8(blobs[name], path, kind="text")
        data = _document(text, path)
        for task in TASKS:
            seen: set[str] = set()
            for k, rec in enumerate(data[task]):
                item = _item(rec, split, task, f"data.{task}[{k}]", text, path)
                if item.item_id in seen:
                    raise _error(path, text, rec, f"data.{task}[{k}].id", "repeats an earlier id")
                seen.add(item.item_id)
                items.append(item)
    return tuple(items)


def _document(text: str, path: str) -> Mapping[str, list[Any]]:
    """The ``data`` object of a StereoSet file, with a list per task."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise line_error(
            path, exc.lineno, f"malformed JSON: {exc.msg} at column {exc.colno}"
        ) from None
    except RecursionError:
        raise line_error(path, 1, "JSON nested too deeply; expected StereoSet's items") from None
    except ValueError:  # an integer literal of thousands of digits
        raise line_error(path, 1, "malformed JSON: a number with too many digits") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise line_error(
            path, 1, "no 'data' object; expected {'version': ..., 'data': {task: [items]}}"
        )
    for task in TASKS:
        if not isinstance(data.get(task), list):
            raise line_error(path, 1, f"field 'data.{task}' is not a list; expected its items")
    return data


def _item(rec: Any, split: str, task: str, where: str, text: str, path: str) -> ProbeItem:
    """One item of a task."""
    spec = PROBES["stereoset"]
    if not isinstance(rec, dict):
        raise _error(path, text, rec, where, "is not an object; expected a StereoSet item")
    for field in ("id", "target", "bias_type", "context"):
        value = rec.get(field)
        if not isinstance(value, str) or (field != "context" and not value.strip()):
            raise _error(
                path, text, rec, f"{where}.{field}", f"={short_repr(value)}; expected text"
            )
    bias = rec["bias_type"]
    if bias not in spec.attribute_of:
        raise _error(
            path,
            text,
            rec,
            f"{where}.bias_type",
            f"={short_repr(bias)}; expected one of {', '.join(spec.attribute_of)}",
        )
    by_role = _sentences(rec, where, text, path)
    if task == "intrasentence":
        context, options = "", tuple(by_role[r] for r in spec.roles)
    else:
        context, options = rec["context"], tuple(" " + by_role[r] for r in spec.roles)
    return ProbeItem(
        benchmark=spec.name,
        item_id=f"{split}/{task}/{rec['id']}",
        attribute=spec.attribute_of[bias],
        bias_type=bias,
        cluster=rec["target"],
        split=split,
        group=task,
        context=context,
        options=options,
        roles=spec.roles,
    )


def _sentences(rec: Mapping[str, Any], where: str, text: str, path: str) -> dict[str, str]:
    """The item's sentences by gold label: exactly one per role."""
    roles = PROBES["stereoset"].roles
    sentences = rec.get("sentences")
    if not isinstance(sentences, list) or len(sentences) != len(roles):
        count = len(sentences) if isinstance(sentences, list) else short_repr(sentences)
        raise _error(
            path,
            text,
            rec,
            f"{where}.sentences",
            f" holds {count}; expected a list of {len(roles)} sentences",
        )
    by_role: dict[str, str] = {}
    for j, sent in enumerate(sentences):
        here = f"{where}.sentences[{j}]"
        body = sent.get("sentence") if isinstance(sent, dict) else None
        if not isinstance(body, str) or not body.strip():
            raise _error(path, text, rec, f"{here}.sentence", f"={short_repr(body)}; expected text")
        gold = sent.get("gold_label")
        if gold not in roles or gold in by_role:
            why = "a second" if gold in by_role else "not a"
            raise _error(
                path,
                text,
                rec,
                f"{here}.gold_label",
                f"={short_repr(gold)} is {why} gold label; expected one sentence each of "
                f"{', '.join(roles)}",
            )
        by_role[gold] = body
    return by_role


def _error(path: str, text: str, rec: Any, field: str, what: str) -> DataError:
    """``path:line: field F...`` where the line is that of the item's id (else its context)."""
    line, values = 1, [rec.get(key) for key in ("id", "context")] if isinstance(rec, dict) else []
    quoted = [
        json.dumps(v, ensure_ascii=a) for v in values if isinstance(v, str) for a in (True, False)
    ]
    at = next((pos for q in quoted if (pos := text.find(q)) >= 0), -1)
    if at >= 0:
        line = text.count("\n", 0, at) + 1
    sep = "" if what.startswith(("=", " ")) else " "
    return line_error(path, line, f"field {field!r}{sep}{what}")
