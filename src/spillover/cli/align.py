"""``spillover prefs`` and ``spillover align``.

Their options are generated from :class:`~spillover.align.PrefsConfig` and
:class:`~spillover.align.AlignConfig`, the objects the run config builds too. This is
the only module of these two stages that prints; the library reports through logging
and callbacks.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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

from ..align import PRESET_FIELDS, AlignConfig, PrefsConfig
from ..data import BBQSource
from ..errors import ConfigError
from ._common import (
    AllowUnverifiedOption,
    Bars,
    BBQDirOption,
    DataDirOption,
    console,
    path_text,
    print_table,
    warn,
)
from ._options import Opt, config_options, with_options

PREFS_OPTIONS = config_options(PrefsConfig, exclude=("targets",))
ALIGN_OPTIONS = config_options(
    AlignConfig,
    [
        Opt(f.name, flag="--lr") if f.name == "learning_rate" else Opt(f.name)
        for f in dataclasses.fields(AlignConfig)
        if f.name not in ("model", "output_dir", "trl_args")
    ],
    preset=PRESET_FIELDS,
)

# --------------------------------------------------------------------------- prefs


@with_options(PREFS_OPTIONS)
def prefs_command(
    target: Annotated[
        list[str],
        typer.Option(
            "--target",
            help="Target attribute (BBQ category or alias, e.g. gender); repeat for several.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the pairs to.", show_default=False)
    ],
    model: Annotated[
        str | None,
        typer.Option(help="Model whose tokenizer renders chat formats (letters-chat only)."),
    ] = None,
    bbq_dir: BBQDirOption = None,
    data_dir: DataDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing pairs folder (only one spillover made)."
        ),
    ] = False,
    **options: Any,
) -> None:
    """Build preference pairs for target attributes, holding out whole scenarios."""
    from ..align import make_pairs

    cfg = PREFS_OPTIONS.build(options, targets=tuple(target))
    out_path = Path(out).expanduser()
    source: Any = BBQSource(path_text(bbq_dir), None, allow_unverified)
    if cfg.source != "bbq":  # pairs from a likelihood probe's items
        from ..data import load_benchmark

        source = load_benchmark(cfg.source, path_text(data_dir), allow_unverified=allow_unverified)
    pairs = make_pairs(source, cfg, out_path, model=model, overwrite=overwrite)
    prov = pairs.provenance.get("bbq") or pairs.provenance.get("data") or {}
    for w in prov.get("warnings", []):
        warn(w)
    table = Table(title=f"Preference pairs -> {out_path}", show_edge=False)
    for col in ("category", "train scenarios", "held-out scenarios", "held-out templates"):
        table.add_column(col)
    for cat in cfg.targets:
        table.add_row(
            cat,
            str(pairs.counts["train_scenarios"].get(cat, 0)),
            str(pairs.counts["heldout_scenarios"].get(cat, 0)),
            ", ".join(map(str, pairs.heldout_templates.get(cat, ()))),
        )
    print_table(table)
    counts = pairs.counts
    console.print(
        f"{counts['train_pairs']} training pairs, {counts['heldout_pairs']} held-out "
        f"pairs from {counts['items']} items ({counts['skipped_no_target']} skipped: "
        f"no known biased answer); strategy {cfg.strategy}",
        highlight=False,
    )
    for role in ("chosen", "rejected"):
        kinds = counts[f"{role}_kind"]["train"]
        text = ", ".join(f"{k} {kinds.get(k, 0)}" for k in ("unknown", "biased", "other"))
        console.print(f"training pairs, {role} answer: {text}", highlight=False)


# --------------------------------------------------------------------------- align


@contextmanager
def _training_progress(
    total_hint: int | None,
) -> Iterator[Callable[[int, int, Mapping[str, float]], None]]:
    bars = Bars(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        unit="steps",
    )
    task: int | None = None

    def update(step: int, total: int, logs: Mapping[str, float]) -> None:
        nonlocal task
        if task is None:  # shown once training runs, not while checks may still fail
            bars.__enter__()
            task = bars.add("training", total=total or total_hint)
        note = None
        if "loss" in logs:
            parts = [f"loss {logs['loss']:.4f}"]
            if "rewards/accuracies" in logs:
                parts.append(f"acc {logs['rewards/accuracies']:.2f}")
            if "rewards/margins" in logs:
                parts.append(f"margin {logs['rewards/margins']:.3f}")
            note = "  ".join(parts)
        bars.update(task, step, total or None, note=note)

    ok = False
    try:
        yield update
        ok = True
    finally:
        if task is not None:
            if ok:
                bars.finish(task)
            bars.__exit__()


@with_options(ALIGN_OPTIONS)
def align_command(
    model: Annotated[str, typer.Option(help="Model alias, hub id or folder.", show_default=False)],
    pairs: Annotated[
        Path,
        typer.Option(help="Pairs folder written by `spillover prefs`.", show_default=False),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the adapter to.", show_default=False)
    ],
    trl_arg: Annotated[
        list[str] | None,
        typer.Option(
            "--trl-arg",
            help="Another setting of the method's TRL config (DPOConfig / TrainingArguments), "
            "key=value; repeat for several (e.g. --trl-arg optim=adafactor).",
            show_default=False,
        ),
    ] = None,
    **options: Any,
) -> None:
    """Train a LoRA adapter on preference pairs with a TRL trainer."""
    from ..align import parse_trl_arg, resolve_trl_args, train_adapter

    values = ALIGN_OPTIONS.values(options)
    try:
        trl_args = dict(parse_trl_arg(a) for a in trl_arg or ())
        cfg = resolve_trl_args(
            AlignConfig.from_preset(
                model, out, preset=values.pop("preset", None), trl_args=trl_args, **values
            )
        )
    except ConfigError as exc:
        message = str(exc).replace("`trl_args`:", "--trl-arg:").replace("`trl_args`", "--trl-arg")
        raise ConfigError(ALIGN_OPTIONS.flags(message).replace("`output_dir`", "--out")) from None
    # under `accelerate launch` / torchrun only the main process (RANK 0) reports
    if os.environ.get("RANK", "0") != "0":
        train_adapter(pairs, cfg)
        return
    with _training_progress(cfg.max_steps) as progress:
        ref = train_adapter(pairs, cfg, progress=progress)
    loss = f"{ref.train_loss:.4f}" if ref.train_loss is not None else "n/a"
    resumed = f", resumed from step {ref.resumed_step}" if ref.resumed_step is not None else ""
    console.print(
        f"adapter -> {ref.path} ({ref.method}, {ref.steps} steps{resumed}, {ref.seconds:.0f} s, "
        f"final loss {loss})",
        highlight=False,
    )
    if ref.merged is not None:
        console.print(f"merged model -> {ref.merged}", highlight=False)


__all__ = ["align_command", "prefs_command"]
