"""``spillover report``: rebuild the HTML / Markdown report from a run's artifacts.

Its options are generated from :class:`~spillover.report.ReportConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..report import ReportConfig
from ._common import console, warn
from ._options import config_options, with_options

REPORT_OPTIONS = config_options(ReportConfig)


@with_options(REPORT_OPTIONS)
def report_command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="Run directory (holding stats/comparison.json), a folder made by hand "
            "(comparison.json from `spillover compare --json`, optionally base.parquet and "
            "aligned.parquet), or a sweep directory whose sub-directories are runs.",
            show_default=False,
        ),
    ],
    base: Annotated[
        Path | None,
        typer.Option("--base", help="Predictions of the base model, instead of the folder's."),
    ] = None,
    aligned: Annotated[
        Path | None,
        typer.Option(
            "--aligned", help="Predictions of the aligned model, instead of the folder's."
        ),
    ] = None,
    **options: Any,
) -> None:
    """Build report.html, report.md and figures/ from a run's artifacts (no model needed)."""
    from ..report import report_folder

    cfg = REPORT_OPTIONS.build(options)
    outcome = report_folder(run_dir, cfg, base=base, aligned=aligned)
    for w in outcome.warnings:
        warn(w)
    if outcome.sub_runs:
        console.print(f"combined report of {outcome.sub_runs} runs: {outcome.path}")
    else:
        console.print(f"report written to {outcome.path}")


__all__ = ["report_command"]
