"""The statistics stage on files: two prediction files compared as a run compares them.

:func:`compare_files` is what ``spillover compare`` and the run's ``compare`` stage both
call: it reads and joins both files once, leaves the target's items on scenarios the
model was trained on out of the main cells (when a split is given), compares, and
summarises the target on its held-out scenarios (``heldout_target.json``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from ..data import BBQData
from ..errors import ConfigError
from ..predictions import join_with_bbq, read_predictions
from .compare import compare_runs, keep_heldout, on_templates
from .config import CompareConfig
from .guard import answer_mix
from .records import Comparison


@dataclass(frozen=True)
class FileComparison:
    """What :func:`compare_files` found."""

    comparison: Comparison
    """The comparison per stratum (``comparison.json``)."""
    heldout_target: dict[str, Any] | None
    """The target on its held-out scenarios (``heldout_target.json``); None without a split."""


def compare_files(
    base_path: str | os.PathLike[str],
    aligned_path: str | os.PathLike[str],
    bbq: BBQData,
    cfg: CompareConfig | None = None,
    *,
    heldout: Mapping[str, Collection[int]] | None = None,
    format: str = "auto",
    length_norm: str = "none",
) -> FileComparison:
    """Read two prediction files, join them with BBQ and compare them.

    Args:
        base_path: Predictions of the base model (Parquet, CSV, JSONL or an
            lm-evaluation-harness samples log).
        aligned_path: Predictions of the aligned model.
        bbq: Loaded BBQ; its warnings are carried into the result.
        cfg: Options; defaults to :class:`CompareConfig`. With ``heldout``, its
            ``targets`` name the targeted categories.
        heldout: The templates (``question_index``) a split held out, per target (as
            :func:`spillover.align.heldout_for` reads them). The targets' main cells then
            keep those items only, the others left out with a note (a split holding
            nothing out leaves nothing out), and the held-out summary is computed. None:
            every item is compared, no summary.
        format: Format of both files (``"auto"``: by suffix and content).
        length_norm: For lm-eval logs, which of lm-eval's decisions to read.

    Raises:
        DataError: unreadable or malformed files, unknown items, mismatched runs.
        ConfigError: bad options; ``heldout`` without ``cfg.targets``.
    """
    cfg = cfg or CompareConfig()
    if heldout is not None and not cfg.targets:
        raise ConfigError("`targets` is not set; a held-out comparison needs the target categories")
    base, aligned = (
        read_predictions(path, permutation=cfg.permutation, format=format, length_norm=length_norm)
        for path in (base_path, aligned_path)
    )
    jb, ja = join_with_bbq(base, bbq), join_with_bbq(aligned, bbq)
    held = {c: set(heldout.get(c, ())) for c in cfg.targets or ()} if heldout is not None else {}
    kb, ka, notes = (jb, ja, []) if not any(held.values()) else keep_heldout(jb, ja, held)
    result = compare_runs(kb, ka, cfg)
    result.warnings = [*bbq.warnings, *jb.attrs["notes"], *ja.attrs["notes"], *notes]
    summary = None
    if heldout is not None:
        summary = target_summary(jb, ja, cfg, held, list(bbq.warnings))
    return FileComparison(result, summary)


def target_summary(
    base: pd.DataFrame,
    aligned: pd.DataFrame,
    cfg: CompareConfig,
    held: Mapping[str, Collection[int]],
    warnings: list[str],
) -> dict[str, Any]:
    """The target on held-out scenarios (the honest answer to "did the alignment work"),
    its answer mix with the collapse guard, and, apart and labelled so, any evaluated
    target items the model was trained on; ``warnings`` (and each comparison's) carry the
    data's warnings (unverified BBQ files)."""
    targets = tuple(cfg.targets or ())
    cfg = dataclasses.replace(cfg, bootstrap=0)
    frames = []
    for df in (base, aligned):
        df = df[df["category"].isin(targets)]
        on_held = on_templates(df, {c: held.get(c, set()) for c in targets})
        frames.append((df[on_held], df[~on_held]))
    (hb, tb), (ha, ta) = frames

    def comparison(b: pd.DataFrame, a: pd.DataFrame) -> dict[str, Any]:
        result = compare_runs(b, a, cfg)
        result.warnings = [*warnings, *result.warnings]
        return result.to_json()

    summary: dict[str, Any] = {
        "targets": list(targets),
        "heldout_templates": {k: sorted(v) for k, v in held.items()},
        "n_items": len(hb),
        "n_in_sample": len(tb),
        "warnings": warnings,
    }
    if len(hb):
        summary["comparison"] = comparison(hb, ha)
        summary["answer_mix"] = answer_mix(hb, ha)
    else:
        summary["note"] = "no evaluated target item lies on a held-out scenario (sample too small)"
    if len(tb):
        summary["in_sample"] = {
            "note": "target items on scenarios the model was trained on: in-sample, not "
            "evidence of generalisation; left out of the main comparison",
            "comparison": comparison(tb, ta),
        }
    return summary


# --------------------------------------------------------------------------- likelihood probes


@dataclass(frozen=True)
class ProbeMetricsReport:
    """What :func:`load_and_compute_probe_metrics` found."""

    table: pd.DataFrame
    """One row per stratum with the benchmark's own metric names (:func:`probe_metrics`)."""
    warnings: list[str]
    """Data warnings (unverified files) and the benchmark's caveat."""
    notes: list[str]
    """Notes made while reading (what was assumed)."""

    def records(self) -> list[dict[str, Any]]:
        """The strata as strict-JSON records, the benchmark's metrics only."""
        from .._io import json_safe

        used = [c for c in self.table.columns if self.table[c].notna().any()]
        return json_safe(self.table[used].to_dict(orient="records"))  # type: ignore[no-any-return]


def _probe_frame(path: str | os.PathLike[str], data: Any) -> pd.DataFrame:
    """A probe benchmark's predictions file, read and joined with the benchmark's items."""
    from ..predictions import join_with_items

    return join_with_items(read_predictions(path, benchmark=data.name), data.frame())


def load_and_compute_probe_metrics(path: str | os.PathLike[str], data: Any) -> ProbeMetricsReport:
    """Read a likelihood-probe benchmark's predictions (any system's file: ``item_id`` and
    a score per option), join them with the benchmark's items and compute its published
    metrics per attribute and overall (``spillover metrics`` on such a file).

    Args:
        path: The predictions file.
        data: The benchmark, loaded (``spillover.data.load_benchmark``).

    Raises:
        DataError: unreadable or malformed predictions, items the benchmark lacks.
    """
    from ..data import PROBES
    from .probes import probe_metrics

    joined = _probe_frame(path, data)
    caveat = PROBES[data.name].caveat
    warnings = [*data.warnings, *([caveat] if caveat else [])]
    return ProbeMetricsReport(probe_metrics(joined), warnings, list(joined.attrs["notes"]))


def compare_probe_files(
    base_path: str | os.PathLike[str],
    aligned_path: str | os.PathLike[str],
    data: Any,
    cfg: CompareConfig | None = None,
) -> Any:
    """Two likelihood-probe predictions files of one benchmark compared item by item
    (``spillover compare`` on such files): :func:`~.probe_compare.compare_probes`, with the
    data's warnings and the reading notes in its ``warnings``.

    Raises:
        DataError: as :func:`load_and_compute_probe_metrics`, or different item sets.
    """
    from .probe_compare import compare_probes

    base, aligned = _probe_frame(base_path, data), _probe_frame(aligned_path, data)
    result = compare_probes(base, aligned, cfg or CompareConfig())
    result.warnings = [*data.warnings, *base.attrs["notes"], *aligned.attrs["notes"],
                       *result.warnings]  # fmt: skip
    return result
