"""``spillover report``: rebuild the HTML / Markdown report from a run's artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._cli_common import console, handle_errors, warn


def _split(value: str, option: str) -> tuple[str, ...]:
    from .errors import ConfigError

    items = tuple(v.strip().lower() for v in value.split(",") if v.strip())
    if not items:
        raise ConfigError(f"`{option}`={value!r}; expected a comma-separated list")
    return items


@handle_errors
def report_command(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="Run directory (holding stats/comparison.json), or a sweep directory whose "
            "sub-directories are runs.",
            show_default=False,
        ),
    ],
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Significance level for adjusted p-values. Default: the level recorded by "
            "the stats stage, else 0.05.",
            show_default=False,
        ),
    ] = None,
    formats: Annotated[
        str, typer.Option("--formats", help="Documents to write: html, md or both (comma list).")
    ] = "html,md",
    figure_formats: Annotated[
        str,
        typer.Option("--figure-formats", help="Figure files to write: png, svg or both."),
    ] = "png",
    title: Annotated[str | None, typer.Option(help="Report title.", show_default=False)] = None,
) -> None:
    """Build report.html, report.md and figures/ from a run's artifacts (no model needed)."""
    from .report import (
        COMPARISON_FILE,
        ReportConfig,
        find_run_dirs,
        write_combined_report,
        write_report,
    )

    cfg = ReportConfig(
        alpha=alpha,
        formats=_split(formats, "--formats"),
        figure_formats=_split(figure_formats, "--figure-formats"),
        title=title,
    )
    subs = [] if (run_dir / COMPARISON_FILE).is_file() else find_run_dirs(run_dir)
    if subs:
        out = write_combined_report(run_dir, subs, cfg)
        console.print(f"combined report of {len(subs)} runs: {out}")
        return
    out = write_report(run_dir, cfg)
    for w in _report_warnings(run_dir):
        warn(w)
    shown = out if "html" in cfg.formats else out.with_suffix(".md")
    console.print(f"report written to {shown}")


def _report_warnings(run_dir: Path) -> list[str]:
    """Warnings worth repeating on the terminal (unverified BBQ data)."""
    import json

    try:
        manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    bbq = manifest.get("bbq") if isinstance(manifest, dict) else None
    if isinstance(bbq, dict) and bbq.get("verified") is False:
        return ["BBQ data of this run is NOT verified (see the report's warnings)"]
    return []


__all__ = ["report_command"]
