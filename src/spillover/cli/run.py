"""``spillover run``: the whole study from one command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ._common import Bars, console, download_progress, print_table, warn

# labels of the stages (the stage table's), and of the sweep's combined report
_EXTRA_LABELS = {"combined-report": "write combined report"}


def run_command(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="YAML config (see configs/). Without one: the embedded default study "
            "(SmolLM2-135M, target gender, DPO, stratified sample of all 11 categories x 2 contexts).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run directory. Default: runs/<name>.", show_default=False),
    ] = None,
    force: Annotated[
        list[str] | None,
        typer.Option(
            "--force",
            help="Rerun this stage and every later one even if complete (repeatable; "
            "eval-base, prefs, align, eval-aligned, compare, report, or all).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate, print the planned stages, item counts and compute; do nothing.",
        ),
    ] = False,
    report_to: Annotated[
        str | None,
        typer.Option(
            "--report-to",
            help="Training logs to tensorboard, wandb or none (overrides align.report_to).",
            show_default=False,
        ),
    ] = None,
    bbq_dir: Annotated[
        Path | None,
        typer.Option(
            "--bbq-dir",
            help="BBQ folder (overrides bbq.dir).",
            envvar="SPILLOVER_BBQ_DIR",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the study: baseline eval -> prefs -> align -> aligned eval -> compare -> report."""
    import dataclasses

    from ..align import REPORT_TO
    from ..errors import ConfigError
    from ..runs import RunConfig

    cfg = RunConfig.load(config) if config is not None else RunConfig.default()
    if report_to is not None:
        if report_to not in REPORT_TO:
            raise ConfigError(
                f"`--report-to`={report_to!r}; expected one of {', '.join(REPORT_TO)}"
            )
        cfg = dataclasses.replace(cfg, align={**dict(cfg.align), "report_to": report_to})
    if bbq_dir is not None:
        cfg = dataclasses.replace(cfg, bbq=dataclasses.replace(cfg.bbq, dir=str(bbq_dir)))
    run_dir = out if out is not None else Path("runs") / cfg.name
    if dry_run:
        _dry_run(cfg, run_dir, force or ())
    else:
        _run(cfg, run_dir, force or ())


def _run(cfg: Any, run_dir: Path, force: list[str] | tuple[str, ...]) -> None:
    """Run the study with progress, then print each sub-run's summary."""
    from ..runs import prepare_run, run_study

    with download_progress() as fetching:  # BBQ is downloaded when not cached
        data = prepare_run(cfg, run_dir, force, progress=fetching)
    with _StageProgress() as on_event:
        dirs = run_study(cfg, run_dir, force=force, on_event=on_event, data=data)
    for d in dirs:
        _print_summary(d)
    for top in (run_dir / "report.html", run_dir / "report.md"):
        if top.is_file():
            console.print(f"report: {top}", highlight=False)
            break


def _dry_run(cfg: Any, run_dir: Path, force: list[str] | tuple[str, ...]) -> None:
    """Check everything a run would check before its first stage, print the plan, write nothing."""
    from ..runs import plan_run, prepare_run

    with download_progress() as fetching:
        data = prepare_run(cfg, run_dir, force, machine=False, progress=fetching)
    plan = plan_run(cfg, data=data)
    for w in plan.warnings:
        warn(w)
    if plan.machine is not None:
        warn(f"on this machine the run would stop before its first stage: {plan.machine}")
    console.print(f"[bold]Plan[/] for {cfg.name!r} -> {run_dir}", highlight=False, soft_wrap=True)
    for line in plan.lines():  # one line each, whatever the width: logs are grepped
        console.print(escape(line), highlight=False, soft_wrap=True)
    console.print("dry run: nothing was executed")


class _StageProgress:
    """A progress bar per stage (a line per stage and periodic lines off a terminal), fed
    by :func:`spillover.runs.run_study`'s events."""

    def __init__(self) -> None:
        self.labels = dict(_EXTRA_LABELS)
        self.tasks: dict[str, int] = {}
        self.bars = Bars(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )

    def __enter__(self) -> _StageProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.__exit__(*exc)

    def __call__(self, stage: str, status: str, info: Any) -> None:
        if isinstance(info.get("label"), str):  # the stage names itself when it starts
            self.labels[stage] = info["label"]
        label, tasks, bars = self.labels.get(stage, stage), self.tasks, self.bars
        if status == "skip":
            console.print(f"[dim]skip[/] {label} (already complete)")
        elif status == "start":
            unit = "steps" if stage == "align" else "rows" if stage.startswith("eval") else ""
            tasks[stage] = bars.add(label, unit=unit)
        elif status == "progress" and stage in tasks:
            note = f"loss {info['loss']:.4f}" if isinstance(info.get("loss"), float) else None
            bars.update(tasks[stage], info["done"], info["total"], note=note)
        elif status == "done" and stage in tasks:
            seconds = f"{info.get('seconds', 0):.1f} s" if bars.live else ""  # lines time it
            bars.finish(tasks.pop(stage), note=seconds)


def _print_summary(run_dir: Path) -> None:
    import json

    from ..rundir import COMPARISON_FILE, HELDOUT_TARGET_FILE
    from ..stats import Comparison

    comp_path = run_dir / COMPARISON_FILE
    if not comp_path.is_file():
        return
    comp = Comparison.from_json(json.loads(comp_path.read_text(encoding="utf-8")), str(comp_path))
    target_path = run_dir / HELDOUT_TARGET_FILE
    if target_path.is_file():
        mix = json.loads(target_path.read_text(encoding="utf-8")).get("answer_mix") or {}
        if mix.get("collapsed"):
            console.print(
                "[bold red]collapse guard[/]: on the target's held-out scenarios "
                f"{'; '.join(mix['reasons'])}. {mix['advice']}.",
                highlight=False,
                soft_wrap=True,  # one line in a log, whatever its width
            )
    for w in comp.warnings:
        warn(w)
    for flag in sorted(comp.flags, key=lambda f: f.kind != "over_abstention"):
        label = flag.kind.replace("_", "-")
        console.print(
            f"[yellow]{label}[/]: {escape(flag.message)}", highlight=False, soft_wrap=True
        )
    rows = [
        r
        for r in comp.rows
        if {"significant_degradation", "significant_improvement"} & set(r.flags)
    ]
    table = Table(title=f"Significant changes after correction: {run_dir.name or run_dir}")
    for col in ("category", "context", "n", "Δ accuracy", "p adj.", "p adj. item", "change"):
        table.add_column(
            col, justify="left" if col in ("category", "context", "change") else "right"
        )
    for r in rows:
        change = "[red]degraded[/]" if "significant_degradation" in r.flags else "[blue]improved[/]"
        table.add_row(
            r.category,
            r.context_condition,
            str(r.n),
            f"{100 * r.delta_accuracy:+.1f} pp",
            f"{r.p_adjusted:.3g}" if r.p_adjusted is not None else "—",
            f"{r.p_adjusted_item:.3g}" if r.p_adjusted_item is not None else "—",
            change,
        )
    if rows:
        print_table(table)
    else:
        console.print(f"{run_dir}: no stratum changed significantly after correction")
