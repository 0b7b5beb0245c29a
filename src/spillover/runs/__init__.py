"""One command from model to report: the run config, the stage table, resumable studies.

``run_study`` sequences the stages through their public faces::

    eval-base -> prefs -> align -> eval-aligned -> compare -> report

into one run directory per combination of model x target x method x seed (layout:
``docs/run.md``), here one after the other or, given an :class:`ExecutorConfig`, as jobs
on processes, Ray or Slurm. Modules: ``config`` (:class:`RunConfig`, read from YAML by
``yaml_doc``), ``stages`` (the stage table, :func:`stages_for`), ``study`` (the sub-runs one
after the other), ``jobs`` (the study as a graph of jobs), ``locks`` (one process per stage,
the shared-filesystem check), ``executors`` (:class:`ExecutorConfig`, :func:`run_study`) and
``plan`` (:func:`plan_run`). Torch-dependent stages are imported inside the stage functions.
"""

from __future__ import annotations

from .config import RunConfig
from .executors import ExecutorConfig, run_study
from .plan import plan_run
from .study import prepare_run

__all__ = [
    "ExecutorConfig",
    "RunConfig",
    "plan_run",
    "prepare_run",
    "run_study",
]
