"""CrowS-Pairs items: ``crows_pairs_anonymized.csv`` -> :class:`ProbeItem` records."""

from __future__ import annotations

from collections.abc import Mapping

from .parse import as_id, csv_rows, decode_utf8, field_count, line_error, short_repr
from .probes import PROBES, ProbeItem

FILE = "crows_pairs_anonymized.csv"
"""The one file of the benchmark."""
COLUMNS = (
    "", "sent_more", "sent_less", "stereo_antistereo", "bias_type", "annotations",
    "anon_writer", "anon_annotators",
)  # fmt: skip
"""The header of the file (the first column, the row index, has no name)."""
DIRECTIONS = ("stereo", "antistereo")
"""``stereo_antistereo``: whether ``sent_more`` states a stereotype about the disadvantaged
group, or ``sent_less`` violates one (``sent_more`` is the more stereotypical sentence
either way)."""


def parse_crows_pairs(
    blobs: Mapping[str, bytes], paths: Mapping[str, str] | None = None
) -> tuple[ProbeItem, ...]:
    """The 1,508 sentence pairs of CrowS-Pairs, in file order.

    One item per row: no context, the options ``(sent_more, sent_less)`` (roles ``more``,
    ``less``), the row index as ``item_id``, the anonymised writer as the cluster and
    ``stereo`` / ``antistereo`` as the group. A row whose two sentences equal an earlier
    row's is kept and flagged ``duplicate`` (rows 1459 and 1502 of the release). Fields are
    read as the CSV quotes them, so row 1293, whose ``sent_less`` holds a line break
    (``"... he was white\\n."``), is one record, scored as written.

    Args:
        blobs: ``crows_pairs_anonymized.csv`` (LF line endings) by file name.
        paths: Where the file was read from, for messages (default: its name).

    Raises:
        DataError: a missing column or field, a bad index, an unknown direction or bias
            type, or an empty sentence or writer, naming file, line and field.

    References:
        Nangia, Vania, Bhalerao, Bowman, "CrowS-Pairs: A Challenge Dataset for Measuring
        Social Biases in Masked Language Models", EMNLP 2020. File:
        ``data/crows_pairs_anonymized.csv`` of https://github.com/nyu-mll/crows-pairs.
    """
    path = (paths or {}).get(FILE, FILE)
    spec = PROBES["crows-pairs"]
    text = decode_utf8(blobs[FILE], path, kind="csv")
    items: list[ProbeItem] = []
    ids: dict[int, int] = {}
    pairs: dict[tuple[str, str], int] = {}
    for line, row in csv_rows(text, path, COLUMNS):
        if None in row or None in row.values():
            raise line_error(
                path,
                line,
                f"{field_count(row)} fields where the header has {len(COLUMNS)}; expected "
                "one field per column",
            )
        index = as_id(row[""])
        if index is None:
            raise line_error(
                path,
                line,
                f"field '' (the row index)={short_repr(row[''])}; expected a whole number",
            )
        if index in ids:
            raise line_error(
                path, line, f"field '' (the row index)={index} repeats line {ids[index]}"
            )
        ids[index] = line
        for name in ("sent_more", "sent_less", "anon_writer"):
            if not row[name].strip():
                raise line_error(path, line, f"field {name!r} is empty; expected text")
        direction = row["stereo_antistereo"].strip()
        if direction not in DIRECTIONS:
            raise line_error(
                path,
                line,
                f"field 'stereo_antistereo'={short_repr(row['stereo_antistereo'])}; "
                f"expected {' or '.join(DIRECTIONS)}",
            )
        bias = row["bias_type"].strip()
        if bias not in spec.attribute_of:
            raise line_error(
                path,
                line,
                f"field 'bias_type'={short_repr(row['bias_type'])}; expected one of "
                f"{', '.join(spec.attribute_of)}",
            )
        pair = (row["sent_more"], row["sent_less"])
        flags = ("duplicate",) if pair in pairs else ()
        pairs.setdefault(pair, index)
        items.append(
            ProbeItem(
                benchmark=spec.name,
                item_id=str(index),
                attribute=spec.attribute_of[bias],
                bias_type=bias,
                cluster=row["anon_writer"].strip(),
                split="all",
                group=direction,
                context="",
                options=pair,
                roles=spec.roles,
                flags=flags,
            )
        )
    if not items:
        raise line_error(path, 1, "no rows; expected the CrowS-Pairs sentence pairs")
    return tuple(items)
