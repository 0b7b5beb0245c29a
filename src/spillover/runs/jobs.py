"""A study as a graph of jobs, so any scheduler can drive it (``--list-subruns``, ``--subrun``).

Jobs, in this order (contiguous index ranges, so a scheduler can submit each kind as one
array)::

    base:<slug>    eval-base                         shared by >= 2 sub-runs of a sweep
    model:<slug>   [eval-base,] prefs .. eval-aligned  after its base job, if any
    stats:<slug>   compare, report                   after its model job
    report         the combined report of a sweep    after every stats job

Sub-runs whose base evaluation has the same stage key (the same model, seed, selection and
scoring config: e.g. the methods of one target and seed) share one base job: it computes the
evaluation in the first such sub-run's folder and the others copy it. A sub-run with nothing
to share evaluates its base model in its model job.

A job runs every stage of its sub-run up to its own last one: stages already complete are
skipped, and one an earlier job should have computed but did not (a scheduler that ignored
the dependencies) is computed under its lock, so it is still computed once. GPU jobs (the
evaluations and the training) and CPU jobs (statistics, reports) are apart, so a cluster
gives a GPU only to the work that uses one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import BBQData, BBQItem
from ..errors import ConfigError, DataError
from ..rundir import COMPARISON_FILE, canonical_hash
from .config import RunConfig, SubRun
from .locks import check_shared, note_job
from .stages import Context, EventFn, stages_for
from .study import (
    Preflight,
    StudyData,
    _run_sub,
    _write_config,
    check_force,
    check_machine,
    combined_report,
    preflight,
    sub_context,
)

logger = logging.getLogger(__name__)

KINDS = ("base", "model", "stats", "report")
"""The kinds of job, in the order they are listed."""


@dataclass(frozen=True)
class Job:
    """One unit of work a scheduler runs: some stages of one sub-run, or the combined report."""

    index: int
    """Position in the job list (what ``--subrun`` and ``$SLURM_ARRAY_TASK_ID`` take)."""
    name: str
    """``base:<slug>``, ``model:<slug>``, ``stats:<slug>`` or ``report``."""
    kind: str
    """One of :data:`KINDS`."""
    sub_index: int | None
    """The sub-run (its position in ``RunConfig.sub_runs()``); None for the report."""
    stages: tuple[str, ...]
    """The stages it computes (``combined-report`` for the report)."""
    after: tuple[int, ...]
    """The jobs that must finish first."""
    gpu: bool
    """Whether it scores or trains a model (given a GPU where the executor has one)."""

    def to_json(self, jobs: Sequence[Job]) -> dict[str, Any]:
        """Plain data (``--list-subruns --json``)."""
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "sub_run": self.sub_index,
            "stages": list(self.stages),
            "after": list(self.after),
            "after_names": [jobs[i].name for i in self.after],
            "gpu": self.gpu,
        }


def base_eval_key(cfg: RunConfig, sub: SubRun, data: BBQData, items: tuple[BBQItem, ...]) -> str:
    """The cache key of the sub-run's base evaluation, as the run computes it."""
    stage = stages_for(cfg)[0]
    ctx = Context(cfg, Path(), sub, Path(), data, items, None, lambda stage, status, info: None)
    return canonical_hash(stage.key(ctx))


def job_graph(cfg: RunConfig, checked: Preflight) -> tuple[Job, ...]:
    """The jobs of a study, in order (module docstring)."""
    subs = cfg.sub_runs()
    names = [s.name for s in stages_for(cfg)]
    split = names.index("compare")
    groups: dict[str, list[int]] = {}
    if cfg.is_sweep:  # a single run has nothing to share with
        for i, sub in enumerate(subs):
            key = base_eval_key(cfg, sub, checked.data, checked.items[sub])
            groups.setdefault(key, []).append(i)
    jobs: list[Job] = []
    base_of: dict[int, int] = {}
    for group in groups.values():
        if len(group) < 2:
            continue
        index = len(jobs)
        jobs.append(Job(index, f"base:{subs[group[0]].slug}", "base", group[0],
                        ("eval-base",), (), True))  # fmt: skip
        base_of.update(dict.fromkeys(group, index))
    model_of: dict[int, int] = {}
    for i, sub in enumerate(subs):
        shared = i in base_of
        model_of[i] = len(jobs)
        jobs.append(Job(len(jobs), f"model:{sub.slug}", "model", i,
                        tuple(names[1 if shared else 0 : split]),
                        (base_of[i],) if shared else (), True))  # fmt: skip
    stats = []
    for i, sub in enumerate(subs):
        stats.append(len(jobs))
        jobs.append(Job(len(jobs), f"stats:{sub.slug}", "stats", i, tuple(names[split:]),
                        (model_of[i],), False))  # fmt: skip
    if cfg.is_sweep:
        jobs.append(Job(len(jobs), "report", "report", None, ("combined-report",),
                        tuple(stats), False))  # fmt: skip
    return tuple(jobs)


def find_job(jobs: Sequence[Job], spec: str | int) -> Job:
    """The job ``spec`` names: its index (an integer, or digits) or its name.

    Raises:
        ConfigError: no such job.
    """
    text = str(spec).strip()
    if text.isdigit() and int(text) < len(jobs):
        return jobs[int(text)]
    for job in jobs:
        if job.name == text:
            return job
    raise ConfigError(
        f"`--subrun` {text!r}: no such job; expected an index in 0..{len(jobs) - 1} or a name "
        "that `spillover run CONFIG --list-subruns` prints"
    )


def job_force(cfg: RunConfig, job: Job, forced: Iterable[str]) -> set[str]:
    """The stages ``--force`` makes ``job`` rerun: from the first forced stage, but none that
    an earlier job of its chain computed (that job reran it already)."""
    order = [s.name for s in stages_for(cfg)]
    positions = [order.index(s) for s in forced if s in order]
    if not positions or job.kind == "report":
        return set()
    first = max(min(positions), order.index(job.stages[0]))
    return {order[first]} if first <= order.index(job.stages[-1]) else set()


def run_job(
    cfg: RunConfig,
    out: str | Path,
    job: str | int,
    *,
    force: Iterable[str] = (),
    on_event: EventFn | None = None,
    data: BBQData | StudyData | Preflight | None = None,
    marker: str | None = None,
) -> list[Path]:
    """Run one job of the study in this process; returns the sub-run folder it worked on
    (none for the report).

    Args:
        job: Its index or name (:func:`find_job`).
        force: The stages ``--force`` names for the whole study (:func:`job_force`).
        marker: The driver's marker token: the job refuses a run directory where the
            driver's marker is not visible (:func:`~spillover.runs.locks.check_shared`).

    Raises:
        ConfigError, DataError, ModelError, MissingDependencyError.
    """
    root = Path(out).expanduser()
    if marker is not None:
        check_shared(root, marker)
    forced = check_force(force)
    checked = data if isinstance(data, Preflight) else preflight(cfg, data)
    chosen = find_job(job_graph(cfg, checked), job)
    if chosen.gpu:  # statistics and reports need neither the trainer nor the scorer
        check_machine(cfg)
    events: EventFn = on_event or (lambda stage, status, info: None)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "config.yaml").is_file():
        _write_config(root, cfg)
    note_job(root, chosen.name)
    logger.info("job %d %s: %s", chosen.index, chosen.name, ", ".join(chosen.stages))
    subs = cfg.sub_runs()
    if chosen.sub_index is None:
        dirs = [root / sub.slug for sub in subs]
        missing = [d.name for d in dirs if not (d / COMPARISON_FILE).is_file()]
        if missing:
            raise DataError(
                f"{root}: the combined report needs every sub-run's comparison; not yet "
                f"complete: {', '.join(missing)}; run their jobs first (`--list-subruns`)"
            )
        combined_report(cfg, root, dirs, events)
        return []
    ctx = sub_context(cfg, root, subs[chosen.sub_index], checked, events)
    _run_sub(ctx, job_force(cfg, chosen, forced), until=chosen.stages[-1], job=chosen.name)
    return [ctx.run_dir]


def job_lines(jobs: Sequence[Job], resources: Callable[[Job], str] | None = None) -> list[str]:
    """One line per job: index, name, stages, the jobs it waits for, its resources
    (``resources(job)``; default: whether it uses a GPU)."""
    out = []
    for job in jobs:
        after = ", ".join(jobs[i].name for i in job.after) or "-"
        where = resources(job) if resources else "GPU (where there is one)" if job.gpu else "CPU"
        out.append(f"  [{job.index}] {job.name}: {', '.join(job.stages)}; after: {after}; {where}")
    return out
