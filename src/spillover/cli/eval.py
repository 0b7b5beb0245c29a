"""``spillover eval``: score a benchmark's items with a model, write predictions.

Its options are generated from :class:`~spillover.data.Selection` (which BBQ items),
:class:`~spillover.data.ProbeSelection` (which items of a likelihood-probe benchmark) and
:class:`~spillover.evaluate.EvalConfig` (how they are scored), the objects the run config
builds too.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ..data import BENCHMARKS, BBQSource, ProbeSelection, Selection
from ..errors import ConfigError, ModelError
from ..evaluate import EvalConfig
from ._common import (
    AllowUnverifiedOption,
    Bars,
    BBQDirOption,
    CacheDirOption,
    DataDirOption,
    console,
    download_progress,
    err_console,
    path_text,
    print_table,
    warn,
)
from ._options import config_options, with_options

SELECTION_OPTIONS = config_options(Selection)
PROBE_OPTIONS = config_options(ProbeSelection, exclude=("seed", "limit"))
EVAL_OPTIONS = config_options(EvalConfig, exclude=("seed",))
_BBQ_ONLY = ("categories", "contexts", "per_stratum", "items")
BenchmarkName = enum.Enum(  # type: ignore[misc]
    "BenchmarkName", [(b.replace("-", "_"), b) for b in BENCHMARKS], type=str
)
"""What ``--benchmark`` takes (typer shows and checks the choices)."""


@with_options(SELECTION_OPTIONS, PROBE_OPTIONS, EVAL_OPTIONS)
def eval_command(
    model: Annotated[
        str, typer.Option("--model", help="Model alias (e.g. smollm2-135m), hub id or folder.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Predictions Parquet file to write.", dir_okay=False)
    ],
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", help="PEFT LoRA adapter folder to apply (not merged)."),
    ] = None,
    all_items: Annotated[
        bool, typer.Option("--all", help="Score every item (after --categories/--contexts).")
    ] = False,
    heldout_from: Annotated[
        Path | None,
        typer.Option(
            "--heldout-from",
            help="Pairs folder (or its split.json): take its targets' items only from the "
            "scenarios it held out, as spillover run samples them.",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu, cuda, cuda:N (default: auto).")
    ] = None,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16."),
    ] = "auto",
    benchmark: Annotated[
        BenchmarkName,
        typer.Option(
            "--benchmark",
            case_sensitive=False,
            help="Benchmark to score. The likelihood probes take --splits, --groups, "
            "--attributes, --per-attribute (default: every item).",
        ),
    ] = BenchmarkName("bbq"),
    bbq_dir: BBQDirOption = None,
    data_dir: DataDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    cache_dir: CacheDirOption = None,
    **options: Any,
) -> None:
    """Score a benchmark's items with a causal LM and write per-item predictions (Parquet).

    Finished chunks are kept in <out>.shards/ while the run goes: rerunning the
    same command after an interruption resumes where it stopped.
    """
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    if benchmark.value != "bbq":
        _check_probe_options(
            benchmark.value, options, all_items=all_items, heldout_from=heldout_from
        )
        probe_eval_command(
            model, benchmark.value, out, adapter, options, device=device, dtype=dtype,
            data_dir=path_text(data_dir), cache_dir=path_text(cache_dir),
            allow_unverified=allow_unverified,
        )  # fmt: skip
        return
    _check_bbq_options(options, all_items)
    selection = SELECTION_OPTIONS.build(options)
    cfg = EVAL_OPTIONS.build(options, seed=selection.seed)
    if cfg.backend == "vllm" and device is not None and not device.startswith(("cuda", "auto")):
        raise ConfigError(f"--backend vllm runs on CUDA GPUs, not --device {device}")
    held = None
    if heldout_from is not None:  # a bad split file fails before BBQ or the model is read
        from ..align import heldout_for

        # a split of pairs from a probe benchmark held out every BBQ item: none restricted
        held = {c: t for c, t in heldout_for(heldout_from, items=())[1].items() if t}
    source = BBQSource(path_text(bbq_dir), path_text(cache_dir), allow_unverified)
    _run(model, out, adapter, source, selection, cfg, device=device, dtype=dtype, held=held)


def _run(
    model: str,
    out: Path,
    adapter: Path | None,
    source: BBQSource,
    selection: Selection,
    cfg: EvalConfig,
    *,
    device: str | None,
    dtype: str,
    held: dict[str, set[int]] | None = None,
) -> None:
    from ..evaluate import evaluate_selection
    from ..models import resolve_model

    keys = selection.keys()
    resolve_model(model)  # a missing folder fails before BBQ is read
    cats = list(selection.categories) if selection.categories is not None else None
    if cats is None and keys is not None:  # read only the listed items' categories
        cats = sorted({c for c, _ in keys})
    with download_progress() as fetching:  # BBQ is downloaded when not cached
        data = source.load(categories=cats, progress=fetching)
    for w in data.warnings:
        warn(w)
    bars = Bars(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=True,
        unit="rows",
    )
    task: int | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:  # shown once scoring starts, with its total
            task = bars.add("scoring", total=total)
        bars.update(task, done, total)

    with bars:
        outcome = evaluate_selection(
            model, data, selection, cfg, out=out, heldout=held, adapter=adapter, device=device,
            dtype=dtype, cache_dir=source.cache_dir, progress=on_progress,
        )  # fmt: skip
        if task is not None:
            bars.finish(task)
    if not outcome.main_process:
        return
    if outcome.predictions is None:
        console.print(
            f"merged the predictions of {outcome.processes} processes into {out} "
            f"({outcome.n_rows} rows, {outcome.score_seconds:.1f}s)"
        )
        return
    n_items = len({(p.category, p.example_id) for p in outcome.predictions})
    _print_summary(outcome.predictions, out, n_items, outcome.model, cfg, outcome)


def _check_bbq_options(options: dict[str, Any], all_items: bool) -> None:
    """Refuse the likelihood probes' item options on BBQ, and anything but exactly one of
    BBQ's item choices, in one line."""
    given = PROBE_OPTIONS.values(options)
    if given:
        flags = ", ".join(PROBE_OPTIONS.flags(f"`{k}`") for k in given)
        raise ConfigError(
            f"{flags} select items of the likelihood-probe benchmarks; BBQ takes "
            "--categories, --contexts and --per-stratum, --items or --all"
        )
    picked = SELECTION_OPTIONS.values(options)
    chosen = [
        name
        for name, on in (
            ("--per-stratum", "per_stratum" in picked),
            ("--items", "items" in picked),
            ("--all", all_items),
        )
        if on
    ]
    if len(chosen) != 1:
        what = "none was given" if not chosen else f"got {' and '.join(chosen)}"
        raise ConfigError(f"choose exactly one of --per-stratum, --items or --all ({what})")


def _check_probe_options(
    name: str, options: dict[str, Any], *, all_items: bool, heldout_from: Path | None
) -> None:
    """Refuse BBQ's item options on a likelihood-probe benchmark, in one line."""
    given = [k for k in SELECTION_OPTIONS.values(options) if k in _BBQ_ONLY]
    flags = [SELECTION_OPTIONS.flags(f"`{k}`") for k in given]
    flags += ["--all"] * all_items + ["--heldout-from"] * (heldout_from is not None)
    if flags:
        raise ConfigError(
            f"{', '.join(flags)} select BBQ items; --benchmark {name} takes --splits, "
            "--groups, --attributes, --per-attribute, --seed and --limit (default: every item)"
        )


def probe_eval_command(
    model: str,
    name: str,
    out: Path,
    adapter: Path | None,
    options: dict[str, Any],
    *,
    device: str | None,
    dtype: str,
    data_dir: str | None,
    cache_dir: str | None,
    allow_unverified: bool,
) -> None:
    """``spillover eval --benchmark NAME`` for a likelihood-probe benchmark."""
    from ..data import load_benchmark
    from ..evaluate import evaluate_benchmark
    from ..models import resolve_model

    picked = SELECTION_OPTIONS.values(options)
    selection = PROBE_OPTIONS.build(options, seed=picked.get("seed", 0), limit=picked.get("limit"))
    cfg = EVAL_OPTIONS.build(options, seed=selection.seed)

    resolve_model(model)  # a missing folder fails before the data is read
    with download_progress() as fetching:
        data = load_benchmark(
            name, data_dir, cache_dir=cache_dir, allow_unverified=allow_unverified,
            progress=fetching,
        )  # fmt: skip
    for w in data.warnings:
        warn(w)
    bars = Bars(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), transient=True, unit="items",
    )  # fmt: skip
    task: int | None = None

    def on_progress(done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = bars.add("scoring", total=total)
        bars.update(task, done, total)

    with bars:
        outcome = evaluate_benchmark(
            model, data, selection, cfg, out=out, adapter=adapter, device=device,
            dtype=dtype, cache_dir=cache_dir, progress=on_progress,
        )  # fmt: skip
        if task is not None:
            bars.finish(task)
    console.print(
        f"wrote {outcome.n_rows} {data.name} predictions to {out} (model load "
        f"{outcome.load_seconds:.1f}s, scoring {outcome.score_seconds:.1f}s)",
        highlight=False,
        soft_wrap=True,
    )


def _print_summary(
    preds: Any, out: Path, n_items: int, model: str, cfg: EvalConfig, outcome: Any
) -> None:
    from ..evaluate import summarize_predictions

    table = Table(title=f"{n_items} items, {model}, {cfg.prompt_format}")
    cols = ("permutation", "n", "accuracy", "accuracy_ambig", "accuracy_disambig")
    extra = ("unknown_rate", "position_0", "position_1", "position_2")
    for col in (*cols, *extra):
        table.add_column(col, justify="right")
    for row in summarize_predictions(preds):
        table.add_row(*(_fmt(row[c]) for c in (*cols, *extra)))
    print_table(table)
    stats = outcome.scorer_stats
    if stats.get("boundary_merges") or stats.get("split_requests"):
        err_console.print(
            f"[yellow]note:[/] {stats.get('boundary_merges', 0)} answer(s) had a token merging "
            f"across the prompt boundary; {stats.get('split_requests', 0)} item(s) were scored "
            "per answer because their answers did not share the prompt tokens",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"wrote {len(preds)} predictions to {out} "
        f"(model load {outcome.load_seconds:.1f}s, scoring {outcome.score_seconds:.1f}s, "
        f"{len(preds) / max(outcome.score_seconds, 1e-9):.1f} rows/s)",
        highlight=False,
        soft_wrap=True,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


__all__ = ["eval_command"]
