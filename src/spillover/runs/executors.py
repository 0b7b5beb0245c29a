"""Where the jobs of a study run: here, one after the other (the default), as processes
here (``--jobs N``), as Ray tasks (``--executor ray``) or as Slurm jobs through submitit
(``--executor slurm``).

Every executor runs the same jobs (:func:`~spillover.runs.jobs.job_graph`) through the same
function (:func:`~spillover.runs.jobs.run_job`), on the same run directory, with the same
locks: a distributed run writes what a sequential run writes, and any of them resumes what
another left (completed stages are skipped). The driver (the ``spillover run`` process)
writes the run's config and a marker (:func:`~spillover.runs.locks.write_driver_marker`)
before it dispatches; each job checks it can see the marker, so a run directory that is not
shared between the nodes fails in one line instead of computing into a private folder.

- ``local`` with ``--jobs N``: N processes at once (``spillover run RUN/config.yaml --subrun
  JOB``), each with one GPU (``CUDA_VISIBLE_DEVICES``) when this machine has GPUs, else with
  the cores split between them (``OMP_NUM_THREADS``); a job's output goes to
  ``RUN/.jobs/<job>.log``.
- ``ray``: one Ray task per job, a job's dependencies passed as ObjectRefs (Ray starts it
  once they are done); ``num_gpus=1`` for evaluation and training jobs where the cluster has
  GPUs, CPUs only for statistics and reports. A task whose worker dies is retried
  (``max_retries``); an error raised by the job itself is not (it would fail again).
- ``slurm``: one submitit job per job, each dependency an ``afterok`` (with
  ``kill_on_invalid_dep``); submitit's ``local`` cluster runs the same jobs as processes here
  (used by the tests), the driver then waiting for a job's dependencies before submitting it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import BBQData
from ..errors import ConfigError, JobError, MissingDependencyError, SpilloverError
from .config import RunConfig
from .jobs import Job, job_graph, run_job
from .locks import JOBS_DIR, MARKER_ENV, write_driver_marker
from .stages import EventFn
from .study import (
    StudyData,
    _write_config,
    check_force,
    check_machine,
    check_run_dir,
    preflight,
    run_sequential,
)

EXECUTORS = ("local", "ray", "slurm")
"""What ``--executor`` takes."""
SLURM_CLUSTERS = ("slurm", "local")
"""What ``--slurm-cluster`` takes: a real Slurm cluster, or submitit's local executor."""


def parse_minutes(text: str) -> int:
    """A Slurm time limit (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``,
    ``D-HH:MM:SS``) in whole minutes, rounded up.

    Raises:
        ConfigError: not such a time.
    """
    value = text.strip()
    try:
        days, rest = value.split("-", 1) if "-" in value else ("0", value)
        parts = [int(p) for p in rest.split(":")]
        if len(parts) > 3:
            raise ValueError(value)
        if "-" in value:  # after the days: hours[:minutes[:seconds]]
            h, m, s = [*parts, 0, 0][:3]
        elif len(parts) == 3:
            h, m, s = parts
        else:  # minutes[:seconds]
            h, (m, s) = 0, [*parts, 0][:2]
        seconds = ((int(days) * 24 + h) * 60 + m) * 60 + s
        if min(int(days), h, m, s) < 0 or seconds <= 0:
            raise ValueError(value)
    except ValueError:
        raise ConfigError(
            f"`--slurm-time`={text!r}; expected a Slurm time limit such as 90 (minutes), "
            "4:00:00 or 1-00:00:00"
        ) from None
    return -(-seconds // 60)


@dataclass(frozen=True)
class ExecutorConfig:
    """Where the jobs of a study run (``spillover run --executor ...``)."""

    kind: str = "local"
    """``local`` (this machine), ``ray`` or ``slurm``."""
    jobs: int = 1
    """Jobs at once with ``local`` (1: the sub-runs one after the other in this process)."""
    cpus_per_job: int | None = None
    """CPU cores per job; None: ``local`` splits this machine's cores, Ray and Slurm give 1."""
    max_retries: int = 2
    """Ray: times a task whose worker died is run again."""
    ray_address: str | None = None
    """Ray: an existing cluster (``HOST:PORT`` or ``auto``); None: start a local one."""
    slurm_partition: str | None = None
    """Slurm: the partition (None: the cluster's default)."""
    slurm_time: str = "4:00:00"
    """Slurm: each job's time limit (``HH:MM:SS``, ``D-HH:MM:SS`` or minutes)."""
    slurm_gpus: int = 0
    """Slurm: GPUs of each evaluation and training job (0: CPU nodes)."""
    slurm_mem_gb: int | None = None
    """Slurm: memory per job in GB (None: the partition's default)."""
    slurm_cluster: str = "slurm"
    """``slurm``, or ``local``: submitit's local executor (the jobs as processes here)."""
    slurm_folder: str | None = None
    """Slurm: folder of submitit's job files and logs (None: ``RUN/.jobs/submitit``)."""

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(f"`--executor`={self.kind!r}; expected one of {', '.join(EXECUTORS)}")
        if self.jobs < 1:
            raise ConfigError(f"`--jobs`={self.jobs}; expected 1 or more")
        if self.jobs > 1 and self.kind != "local":
            raise ConfigError(
                f"`--jobs` {self.jobs} is for `--executor local`; {self.kind} runs as many "
                "jobs at once as its cluster has room for"
            )
        if self.cpus_per_job is not None and self.cpus_per_job < 1:
            raise ConfigError(f"`--cpus-per-job`={self.cpus_per_job}; expected 1 or more")
        if self.max_retries < 0:
            raise ConfigError(f"`--max-retries`={self.max_retries}; expected 0 or more")
        if self.slurm_gpus < 0:
            raise ConfigError(f"`--slurm-gpus`={self.slurm_gpus}; expected 0 or more")
        if self.slurm_mem_gb is not None and self.slurm_mem_gb < 1:
            raise ConfigError(f"`--slurm-mem`={self.slurm_mem_gb}; expected 1 (GB) or more")
        if self.slurm_cluster not in SLURM_CLUSTERS:
            raise ConfigError(
                f"`--slurm-cluster`={self.slurm_cluster!r}; expected one of "
                f"{', '.join(SLURM_CLUSTERS)}"
            )
        parse_minutes(self.slurm_time)

    @property
    def distributed(self) -> bool:
        """Whether the jobs run outside this process."""
        return self.kind != "local" or self.jobs > 1

    def describe(self) -> str:
        """Where the jobs run, in words (the dry run's jobs line)."""
        if self.kind == "ray":
            return f"Ray at {self.ray_address}" if self.ray_address else "a local Ray cluster"
        if self.kind == "slurm":
            where = "Slurm" if self.slurm_cluster == "slurm" else "submitit's local executor"
            return where + (f", partition {self.slurm_partition}" if self.slurm_partition else "")
        return f"{self.jobs} process(es) on this machine"

    def resources(self, job: Job) -> str:
        """What a job asks for, in words."""
        cpus = self.cpus_per_job
        if self.kind == "ray":
            gpu = "num_gpus=1 where the cluster has GPUs, " if job.gpu else ""
            return f"{gpu}num_cpus={cpus or 1}, max_retries={self.max_retries}"
        if self.kind == "slurm":
            gpus = self.slurm_gpus if job.gpu else 0
            mem = f", mem {self.slurm_mem_gb} GB" if self.slurm_mem_gb else ""
            return f"{gpus} GPU(s), {cpus or 1} CPU(s), time {self.slurm_time}{mem}"
        threads = cpus or max(1, (os.cpu_count() or 1) // self.jobs)
        return f"1 GPU (CUDA_VISIBLE_DEVICES) where there are GPUs, else {threads} CPU thread(s)"


def check_executor(executor: ExecutorConfig) -> None:
    """Check the executor's package is installed.

    Raises:
        MissingDependencyError: Ray or submitit is missing.
    """
    import importlib.util

    package = {"ray": "ray", "slurm": "submitit"}.get(executor.kind)
    if package is not None and importlib.util.find_spec(package) is None:
        raise MissingDependencyError(
            f"`--executor {executor.kind}` needs {package}: pip install 'spillover[cluster]'"
        )


def run_study(
    cfg: RunConfig,
    out: str | Path,
    *,
    force: Iterable[str] = (),
    on_event: EventFn | None = None,
    data: BBQData | StudyData | None = None,
    executor: ExecutorConfig | None = None,
    job: str | int | None = None,
) -> list[Path]:
    """Run every sub-run of ``cfg`` into ``out``; returns the sub-run directories.

    Args:
        cfg: The study.
        out: Run directory (created).
        force: Stages to rerun even when complete (later stages follow); ``all`` reruns
            everything.
        on_event: ``on_event(stage, status, info)`` progress callback (a distributed run
            reports its jobs: ``start`` and ``done`` per job name).
        data: BBQ as :func:`~spillover.runs.study.load_data` loads it for ``cfg`` (loaded
            here when not given).
        executor: Where the jobs run (None: one after the other in this process).
        job: Run only this job here (its index or name, ``--subrun``).

    Raises:
        ConfigError, DataError, ModelError, MissingDependencyError, JobError.
    """
    if job is not None:
        if executor is not None and executor.distributed:
            raise ConfigError(
                "`--subrun` runs one job in this process; leave out `--executor` and `--jobs`"
            )
        marker = os.environ.get(MARKER_ENV) or None
        return run_job(cfg, out, job, force=force, on_event=on_event, data=data, marker=marker)
    if executor is None or not executor.distributed:
        return run_sequential(cfg, out, force=force, on_event=on_event, data=data)
    check_executor(executor)
    check_force(force)
    root = Path(out).expanduser()
    check_run_dir(root)
    check_machine(cfg)
    checked = preflight(cfg, data)
    jobs = job_graph(cfg, checked)
    root.mkdir(parents=True, exist_ok=True)
    _write_config(root, cfg)
    token = write_driver_marker(root)
    events: EventFn = on_event or (lambda stage, status, info: None)
    runner = {"local": _run_pool, "ray": _run_ray, "slurm": _run_submitit}[executor.kind]
    runner(_Dispatch(cfg, root, jobs, tuple(force), executor, token, events))
    return [root / s.slug if cfg.is_sweep else root for s in cfg.sub_runs()]


@dataclass(frozen=True)
class _Dispatch:
    """What every executor is given."""

    cfg: RunConfig
    root: Path
    jobs: tuple[Job, ...]
    force: tuple[str, ...]
    executor: ExecutorConfig
    token: str
    events: EventFn

    def started(self, job: Job) -> None:
        self.events(job.name, "start", {"label": f"job {job.name}"})

    def finished(self, job: Job) -> None:
        self.events(job.name, "done", {})


def job_entry(
    cfg_data: Mapping[str, Any],
    root: str,
    index: int,
    force: Sequence[str],
    token: str,
    cwd: str,
) -> int:
    """Run one job on a worker or a cluster node (what Ray and submitit call): the config
    rebuilt from its resolved data, relative paths read from the driver's folder."""
    if os.path.isdir(cwd):  # the config's relative paths (bbq.dir, ...) are the driver's
        os.chdir(cwd)
    run_job(RunConfig.from_mapping(cfg_data), root, index, force=force, marker=token)
    return index


def _ray_job(
    cfg_data: Mapping[str, Any],
    root: str,
    index: int,
    force: Sequence[str],
    token: str,
    cwd: str,
    *after: object,
) -> int:
    """A Ray task: ``after`` are the results of the jobs it waits for (Ray resolves them
    before it starts this one, and fails this one when one of them failed)."""
    return job_entry(cfg_data, root, index, force, token, cwd)


# --------------------------------------------------------------------------- local processes


def _cuda_devices() -> list[str]:
    """This machine's GPUs, as ``CUDA_VISIBLE_DEVICES`` would name them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _start_process(
    d: _Dispatch, job: Job, slot: int, gpus: Sequence[str], threads: int
) -> tuple[subprocess.Popen[bytes], Path]:
    env = {**os.environ, MARKER_ENV: d.token, "PYTHONUNBUFFERED": "1"}
    if gpus:  # one GPU per process, round robin over the slots
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    else:  # the cores split between the processes (torch reads OMP_NUM_THREADS)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    forced = [arg for name in d.force for arg in ("--force", name)]
    command = [sys.executable, "-m", "spillover", "run", str(d.root / "config.yaml"),
               "--out", str(d.root), "--subrun", job.name, *forced]  # fmt: skip
    log = d.root / JOBS_DIR / f"{job.name.replace(':', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    return proc, log


def _run_pool(d: _Dispatch) -> None:
    """Run the jobs as processes here, ``--jobs`` at once, each when its dependencies are
    done; after a failure no new job starts, the running ones finish."""
    gpus = _cuda_devices()
    threads = d.executor.cpus_per_job or max(1, (os.cpu_count() or 1) // d.executor.jobs)
    free = list(range(d.executor.jobs))
    waiting = list(d.jobs)
    running: dict[int, tuple[Job, int, subprocess.Popen[bytes], Path]] = {}
    finished: set[int] = set()
    failed: list[tuple[Job, int, Path]] = []
    try:
        while running or (waiting and not failed):
            for job in [j for j in waiting if all(i in finished for i in j.after)]:
                if failed or not free:
                    break
                slot = free.pop(0)
                waiting.remove(job)
                proc, log = _start_process(d, job, slot, gpus, threads)
                running[job.index] = (job, slot, proc, log)
                d.started(job)
            time.sleep(0.2)
            for index, (job, slot, proc, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[index]
                free.append(slot)
                if code == 0:
                    finished.add(index)
                    d.finished(job)
                else:
                    failed.append((job, code, log))
    finally:
        for _, _, proc, _ in running.values():  # interrupted: stop what this driver started
            proc.terminate()
    if failed:
        job, code, log = failed[0]
        raise JobError(
            f"job {job.name} failed (exit code {code}): {_last_line(log)} (log: {log}); "
            "rerun the same command to resume"
        )


def _last_line(log: Path) -> str:
    """The last line of a job's log that says what went wrong."""
    try:
        lines = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if line.startswith("error:") or "Error:" in line:
            return line
    return next((x for x in reversed(lines) if x), "no output")


# --------------------------------------------------------------------------- Ray


def _run_ray(d: _Dispatch) -> None:
    """Run the jobs as Ray tasks on an existing cluster or a local one (started and
    stopped here)."""
    import ray

    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=d.executor.ray_address, include_dashboard=False,
                     log_to_driver=False)  # fmt: skip
        except ConnectionError as exc:
            raise JobError(f"`--ray-address` {d.executor.ray_address}: {exc}") from None
    try:
        has_gpu = float(ray.cluster_resources().get("GPU", 0)) > 0  # type: ignore[no-untyped-call]
        remote = ray.remote(_ray_job)
        args = (d.cfg.to_dict(), str(d.root))
        refs: dict[int, Any] = {}
        for job in d.jobs:
            options = {
                "num_cpus": d.executor.cpus_per_job or 1,
                "num_gpus": 1 if job.gpu and has_gpu else 0,
                "max_retries": d.executor.max_retries,
                "name": job.name,
            }
            after = [refs[i] for i in job.after]
            refs[job.index] = remote.options(**options).remote(
                *args, job.index, list(d.force), d.token, os.getcwd(), *after
            )
            d.started(job)
        by_ref = {ref: d.jobs[i] for i, ref in refs.items()}
        pending = list(refs.values())
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                _ray_result(ray, ref, by_ref[ref])
                d.finished(by_ref[ref])
    finally:
        if started:
            ray.shutdown()


def _ray_result(ray: Any, ref: Any, job: Job) -> None:
    """Wait for a task; its spillover error as it was raised, a dead worker as one line."""
    try:
        ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, SpilloverError):
            raise cause from None
        raise
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise JobError(
            f"job {job.name}: {type(exc).__name__}: {first}; rerun the same command to resume"
        ) from None


# --------------------------------------------------------------------------- Slurm (submitit)


def _run_submitit(d: _Dispatch) -> None:
    """Submit one job per job through submitit (dependencies as ``afterok`` on Slurm; the
    local cluster has none, so the driver waits for them before submitting), then wait."""
    import submitit

    ex = d.executor
    folder = Path(ex.slurm_folder) if ex.slurm_folder else d.root / JOBS_DIR / "submitit"
    slurm = ex.slurm_cluster == "slurm"
    submitted: dict[int, Any] = {}
    for job in d.jobs:
        params: dict[str, Any] = {
            "name": f"spillover-{job.name}",
            "timeout_min": parse_minutes(ex.slurm_time),
            "cpus_per_task": ex.cpus_per_job or 1,
        }
        if slurm:
            extra: dict[str, str] = {}
            if job.after:
                ids = ":".join(str(submitted[i].job_id) for i in job.after)
                extra = {"dependency": f"afterok:{ids}", "kill_on_invalid_dep": "yes"}
            params["slurm_additional_parameters"] = extra
            if ex.slurm_partition:
                params["slurm_partition"] = ex.slurm_partition
            if job.gpu and ex.slurm_gpus:
                params["gpus_per_node"] = ex.slurm_gpus
            if ex.slurm_mem_gb:
                params["mem_gb"] = ex.slurm_mem_gb
        else:
            for i in job.after:
                _submitit_result(d.jobs[i], submitted[i])
        # a fresh executor per job: parameters set for one job never leak into the next
        executor = submitit.AutoExecutor(folder=str(folder / "%j"), cluster=ex.slurm_cluster)
        executor.update_parameters(**params)
        submitted[job.index] = executor.submit(
            job_entry, d.cfg.to_dict(), str(d.root), job.index, list(d.force), d.token,
            os.getcwd(),
        )  # fmt: skip
        d.started(job)
    for job in d.jobs:
        _submitit_result(job, submitted[job.index])
        d.finished(job)


def _submitit_result(job: Job, handle: Any) -> None:
    """Wait for a submitit job; a failure as one line naming the job and its log."""
    try:
        handle.result()
    except Exception as exc:
        text = str(exc)
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        ours = [x for x in lines if x.startswith("spillover.errors.")]
        reason = ours[-1].split(": ", 1)[-1] if ours else (lines[-1] if lines else repr(exc))
        raise JobError(
            f"job {job.name} (id {handle.job_id}) failed: {reason} (log: "
            f"{handle.paths.stderr}); rerun the same command to resume"
        ) from None
