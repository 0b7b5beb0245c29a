"""BBQ scenarios: the templates of one category joined when they share a question text.

A BBQ *template* is a ``question_index`` within a category. Templates come in
*scenarios*: BBQ writes a scenario (one context frame with a negative and a
non-negative question) several times, e.g. once with labels and once with proper names,
and the copies reuse the same question strings. Items of one scenario share wording, so
a model's answers to them are not independent; the statistics treat scenarios as the
clusters of their tests and intervals, and the held-out split holds out whole scenarios.
"""

from __future__ import annotations

from collections.abc import Iterable


def assign_scenarios(rows: Iterable[tuple[str, int, str]]) -> dict[tuple[str, int], int]:
    """Scenario id of every template, from the question texts of its items.

    Args:
        rows: ``(category, question_index, question)`` per item (any number of rows per
            template, in any order).

    Returns:
        ``{(category, question_index): scenario}``; scenarios are numbered per category
        ``0, 1, ...`` in order of the smallest ``question_index`` they contain, so the
        numbering does not depend on the order of ``rows``.

    Notes:
        Two templates of one category are linked when an item of each has exactly the
        same ``question`` string; scenarios are the connected components of these links
        (union-find). Templates of different categories are never joined. Question texts
        are compared exactly: in the 58,492 items of BBQ no two question strings of a
        category differ only by whitespace or case, and looser matching would be wrong,
        because BBQ's near-identical questions are opposite polarities ("Who is
        competent?" / "Who is incompetent?"). In full BBQ this gives 13 to 30 scenarios
        per category (e.g. Gender_identity: 50 templates, 28 scenarios; Race_x_SES: 26
        templates, 13 scenarios).
    """
    parent: dict[tuple[str, int], tuple[str, int]] = {}
    first: dict[tuple[str, str], tuple[str, int]] = {}

    def find(x: tuple[str, int]) -> tuple[str, int]:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for category, qindex, question in rows:
        key = (category, int(qindex))
        parent.setdefault(key, key)
        seen = first.setdefault((category, question), key)
        if seen != key:
            ra, rb = find(seen), find(key)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    out: dict[tuple[str, int], int] = {}
    numbering: dict[tuple[str, int], int] = {}
    per_category: dict[str, int] = {}
    for key in sorted(parent):  # smallest index first: ids follow each scenario's minimum
        root = find(key)
        if root not in numbering:
            numbering[root] = per_category.get(key[0], 0)
            per_category[key[0]] = numbering[root] + 1
        out[key] = numbering[root]
    return out
