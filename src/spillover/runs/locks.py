"""Concurrency safety of a run directory: one process per stage, a shared filesystem, a log.

Several processes may work on one run directory at once (``--jobs N``, Ray tasks, Slurm
jobs, or two ``spillover run`` started by hand). Three things keep them apart:

- **A lock per stage** (:func:`stage_lock`): ``RUN/.locks/<name>.lock``, an OS file lock
  (``fcntl``, through :mod:`filelock`), held while a stage runs. A process that finds a stage
  not done takes its lock, looks again (another process may have finished it meanwhile) and
  only then computes. The OS releases the lock of a killed process, so a crashed job leaves
  no stale lock behind (a lock file left on disk is not a held lock).
- **A driver marker** (:func:`write_driver_marker`, :func:`check_shared`): the process that
  dispatches the jobs writes ``RUN/.jobs/driver-<token>``; a job started on a node where
  that file is not visible is on a run directory that is not shared, and stops in one line
  before it computes anything.
- **An event log** (:func:`record_event`): ``RUN/events.jsonl``, one JSON line per stage a
  process computed (``done``) or copied from another sub-run (``reused``), with the job,
  the host and the process id, so "computed once" can be read back afterwards.

A stage is marked done only by its completion record (:func:`spillover.rundir.mark_done`),
written atomically after its outputs are in place; a job killed midway leaves no record.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError

LOCK_DIR = ".locks"
"""Folder of the stage locks inside a run directory."""
JOBS_DIR = ".jobs"
"""Folder of the driver's marker, the jobs' records and logs inside a run directory."""
EVENTS_FILE = "events.jsonl"
"""The run directory's event log: a line per stage computed or reused."""
MARKER_ENV = "SPILLOVER_DRIVER_MARKER"
"""Environment variable carrying the driver's marker token to a job started as a process."""


def _safe(name: str) -> str:
    """``name`` as one plain file name (sub-run slugs and job names are nearly that)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name)


@contextmanager
def stage_lock(root: Path, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the lock ``RUN/.locks/<name>.lock`` (blocking); ``on_wait`` is called once when
    another process holds it, before waiting."""
    from filelock import FileLock, Timeout

    path = root / LOCK_DIR / f"{_safe(name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: one lock object per call, nothing shared between threads
    lock = FileLock(str(path), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def record_event(root: Path, **fields: Any) -> None:
    """Append one line to ``RUN/events.jsonl`` (the time, host and process id added).

    One ``write`` of a short line to a file opened for appending: lines of concurrent
    processes do not interleave."""
    line = {
        "time": round(time.time(), 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **fields,
    }
    data = (json.dumps(line, sort_keys=True) + "\n").encode("utf-8")
    fd = os.open(root / EVENTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_events(root: Path) -> list[dict[str, Any]]:
    """The lines of ``RUN/events.jsonl`` (none when the run has not computed a stage)."""
    path = root / EVENTS_FILE
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def write_driver_marker(root: Path) -> str:
    """Write ``RUN/.jobs/driver-<token>`` (the driver's host inside); returns the token."""
    token = secrets.token_hex(8)
    folder = root / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"driver-{token}").write_text(socket.gethostname() + "\n", encoding="utf-8")
    return token


def check_shared(root: Path, token: str) -> None:
    """Refuse to work on a run directory this node does not share with the driver.

    Raises:
        ConfigError: the driver's marker is not visible here.
    """
    marker = root / JOBS_DIR / f"driver-{token}"
    if not marker.is_file():
        raise ConfigError(
            f"{root}: the run directory is not shared with this node ({socket.gethostname()}): "
            f"the driver's marker {marker} is not visible here; put --out on a filesystem "
            "every node mounts (NFS, Lustre, GPFS, ...)"
        )


def note_job(root: Path, job: str) -> Path:
    """Record that this process runs ``job`` (``RUN/.jobs/<job>.json``: host, pid, start);
    returns the path of the job's log file beside it."""
    folder = root / JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    info = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    (folder / f"{_safe(job)}.json").write_text(json.dumps(info) + "\n", encoding="utf-8")
    return folder / f"{_safe(job)}.log"


def job_record(root: Path, job: str) -> dict[str, Any] | None:
    """What :func:`note_job` recorded of ``job``, or None."""
    path = root / JOBS_DIR / f"{_safe(job)}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
