"""``spillover report``: rebuild the HTML / Markdown report from a run's artifacts.

Its options are generated from :class:`~spillover.report.ReportConfig`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError
from ..report import ReportConfig
from ..rundir import MANIFEST_FILE
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
    from ..report import find_comparison, find_run_dirs, write_combined_report, write_report

    values = REPORT_OPTIONS.values(options)
    for key in ("formats", "figure_formats"):
        if key in values:
            values[key] = tuple(v.lower() for v in values[key])
    try:
        cfg = ReportConfig(**values)
    except ConfigError as exc:
        raise ConfigError(REPORT_OPTIONS.flags(str(exc))) from None
    subs = [] if find_comparison(run_dir) is not None else find_run_dirs(run_dir)
    if subs:
        if base is not None or aligned is not None:
            raise ConfigError(
                f"{run_dir} is a sweep; --base and --aligned apply to the report of one folder"
            )
        out = write_combined_report(run_dir, subs, cfg)
        console.print(f"combined report of {len(subs)} runs: {out}")
        return
    out = write_report(run_dir, cfg, base=base, aligned=aligned)
    for w in _report_warnings(run_dir):
        warn(w)
    shown = out if "html" in cfg.formats else out.with_suffix(".md")
    console.print(f"report written to {shown}")


def _report_warnings(run_dir: Path) -> list[str]:
    """Warnings worth repeating on the terminal (unverified BBQ data)."""
    try:
        manifest = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    bbq = manifest.get("bbq") if isinstance(manifest, dict) else None
    if isinstance(bbq, dict) and bbq.get("verified") is False:
        return ["BBQ data of this run is NOT verified (see the report's warnings)"]
    return []


__all__ = ["report_command"]
