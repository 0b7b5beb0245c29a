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


# the command's options (module-level, so its signature stays short)
_ConfigOpt = Annotated[
    Path | None,
    typer.Argument(
        help="YAML config (see configs/). Without one: the embedded default study "
        "(SmolLM2-135M, target gender, DPO, stratified sample of all 11 categories x 2 contexts).",
        show_default=False,
    ),
]

_OutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Run directory. Default: runs/<name>.", show_default=False),
]

_ForceOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--force",
        help="Rerun this stage and every later one even if complete (repeatable; "
        "eval-base, prefs, align, eval-aligned, compare, report, or all).",
        show_default=False,
    ),
]

_DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Validate, print the planned stages, item counts and compute; do nothing.",
    ),
]

_ReportToOpt = Annotated[
    str | None,
    typer.Option(
        "--report-to",
        help="Training logs to tensorboard, wandb or none (overrides align.report_to).",
        show_default=False,
    ),
]

_BbqDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--bbq-dir",
        # no envvar here: $SPILLOVER_BBQ_DIR is where a config without bbq.dir reads BBQ
        # (load_bbq's default), it never overrides a config's own bbq.dir
        help="BBQ folder (overrides bbq.dir; a config without bbq.dir reads $SPILLOVER_BBQ_DIR).",
        show_default=False,
    ),
]

_ExecutorOpt = Annotated[
    str,
    typer.Option(
        "--executor",
        help="Where the jobs run: local (this machine), ray or slurm (through submitit; "
        "pip install 'spillover[cluster]').",
    ),
]

_JobsOpt = Annotated[
    int,
    typer.Option(
        "--jobs",
        help="local: jobs at once, as processes (one GPU each where there are GPUs, else "
        "the cores split); 1: the sub-runs one after the other in this process.",
    ),
]

_ListSubrunsOpt = Annotated[
    bool,
    typer.Option(
        "--list-subruns",
        help="Print the jobs (index, name, stages, dependencies) any scheduler can run "
        "with --subrun; do nothing.",
    ),
]

_AsJsonOpt = Annotated[bool, typer.Option("--json", help="With --list-subruns: the jobs as JSON.")]

_SubrunOpt = Annotated[
    str | None,
    typer.Option(
        "--subrun",
        help="Run only this job (its index or name from --list-subruns) here. Default: "
        "$SLURM_ARRAY_TASK_ID inside a Slurm array job, else every job.",
        show_default=False,
    ),
]

_CpusPerJobOpt = Annotated[
    int | None,
    typer.Option(
        "--cpus-per-job",
        help="CPU cores per job (default: local splits this machine's, Ray and Slurm 1).",
        show_default=False,
    ),
]

_RayAddressOpt = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="Ray: an existing cluster (HOST:PORT or auto). Default: start a local one.",
        show_default=False,
    ),
]

_MaxRetriesOpt = Annotated[
    int, typer.Option("--max-retries", help="Ray: reruns of a task whose worker died.")
]

_SlurmPartitionOpt = Annotated[
    str | None,
    typer.Option("--slurm-partition", help="Slurm partition.", show_default=False),
]

_SlurmTimeOpt = Annotated[
    str, typer.Option("--slurm-time", help="Slurm time limit per job (HH:MM:SS, D-HH:MM:SS).")
]

_SlurmGpusOpt = Annotated[
    int,
    typer.Option("--slurm-gpus", help="Slurm: GPUs of each evaluation and training job."),
]

_SlurmMemOpt = Annotated[
    int | None,
    typer.Option("--slurm-mem", help="Slurm: memory per job in GB.", show_default=False),
]

_SlurmClusterOpt = Annotated[
    str,
    typer.Option(
        "--slurm-cluster",
        help="slurm, or local: submitit's local executor (the jobs as processes here).",
    ),
]

_SlurmFolderOpt = Annotated[
    Path | None,
    typer.Option(
        "--slurm-folder",
        help="Folder of submitit's job files and logs. Default: RUN/.jobs/submitit.",
        show_default=False,
    ),
]


def run_command(
    config: _ConfigOpt = None,
    out: _OutOpt = None,
    force: _ForceOpt = None,
    dry_run: _DryRunOpt = False,
    report_to: _ReportToOpt = None,
    bbq_dir: _BbqDirOpt = None,
    executor: _ExecutorOpt = "local",
    jobs: _JobsOpt = 1,
    list_subruns: _ListSubrunsOpt = False,
    as_json: _AsJsonOpt = False,
    subrun: _SubrunOpt = None,
    cpus_per_job: _CpusPerJobOpt = None,
    ray_address: _RayAddressOpt = None,
    max_retries: _MaxRetriesOpt = 2,
    slurm_partition: _SlurmPartitionOpt = None,
    slurm_time: _SlurmTimeOpt = "4:00:00",
    slurm_gpus: _SlurmGpusOpt = 0,
    slurm_mem: _SlurmMemOpt = None,
    slurm_cluster: _SlurmClusterOpt = "slurm",
    slurm_folder: _SlurmFolderOpt = None,
) -> None:
    """Run the study: baseline eval -> prefs -> align -> aligned eval -> compare -> report."""
    import dataclasses
    import os

    from ..align import REPORT_TO
    from ..errors import ConfigError
    from ..runs import ExecutorConfig, RunConfig

    ex = ExecutorConfig(
        kind=executor, jobs=jobs, cpus_per_job=cpus_per_job, max_retries=max_retries,
        ray_address=ray_address, slurm_partition=slurm_partition, slurm_time=slurm_time,
        slurm_gpus=slurm_gpus, slurm_mem_gb=slurm_mem, slurm_cluster=slurm_cluster,
        slurm_folder=str(slurm_folder) if slurm_folder is not None else None,
    )  # fmt: skip
    if as_json and not list_subruns:
        raise ConfigError("`--json` goes with `--list-subruns`")
    if subrun is None and not ex.distributed and os.environ.get("SLURM_ARRAY_TASK_ID"):
        subrun = os.environ["SLURM_ARRAY_TASK_ID"]  # one job of an array: the task's
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
    if list_subruns:
        _list_jobs(cfg, run_dir, as_json)
    elif dry_run:
        _dry_run(cfg, run_dir, force or (), ex)
    else:
        _run(cfg, run_dir, force or (), ex, subrun)


def _run(
    cfg: Any, run_dir: Path, force: list[str] | tuple[str, ...], ex: Any, subrun: str | None
) -> None:
    """Run the study (or one job of it) with progress, then print each sub-run's summary."""
    from ..runs import prepare_run, run_study

    with download_progress() as fetching:  # BBQ is downloaded when not cached
        data = prepare_run(cfg, run_dir, force, progress=fetching)
    with _StageProgress() as on_event:
        dirs = run_study(
            cfg, run_dir, force=force, on_event=on_event, data=data, executor=ex, job=subrun
        )
    for d in dirs:
        _print_summary(d)
    for top in (run_dir / "report.html", run_dir / "report.md"):
        if top.is_file():
            console.print(f"report: {top}", highlight=False)
            break


def _list_jobs(cfg: Any, run_dir: Path, as_json: bool) -> None:
    """Print the jobs of the study (what ``--subrun`` takes), as text or JSON."""
    import json

    from ..runs import plan_run, prepare_run

    data = prepare_run(cfg, run_dir, machine=False)
    jobs = plan_run(cfg, data=data).jobs
    if as_json:
        print(json.dumps([job.to_json(jobs) for job in jobs], indent=2))
        return
    for job in jobs:  # tab-separated, as written (no console markup or tab expansion)
        after = ",".join(str(i) for i in job.after) or "-"
        print(f"{job.index}\t{job.name}\t{','.join(job.stages)}\tafter {after}")


def _dry_run(cfg: Any, run_dir: Path, force: list[str] | tuple[str, ...], ex: Any) -> None:
    """Check everything a run would check before its first stage, print the plan, write nothing."""
    from ..runs import plan_run, prepare_run

    with download_progress() as fetching:
        data = prepare_run(cfg, run_dir, force, machine=False, progress=fetching)
    plan = plan_run(cfg, data=data, executor=ex)
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
        elif status == "wait":
            console.print(f"[dim]wait[/] {label}: another process is computing it")
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
