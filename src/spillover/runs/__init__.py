"""One command from model to report: the run config, the stage table, resumable studies.

``run_study`` sequences the stages through their public faces::

    eval-base -> prefs -> align -> eval-aligned -> compare -> report

into one run directory per combination of model x target x method x seed (layout:
``docs/run.md``). Modules: ``config`` (:class:`RunConfig`, read from YAML by
``yaml_doc``), ``stages`` (:data:`STAGE_TABLE`), ``study`` (:func:`run_study`) and
``plan`` (:func:`plan_run`). Torch-dependent stages are imported inside the stage
functions.
"""

from __future__ import annotations

from .config import DEFAULT_PER_STRATUM, DEFAULT_STUDY, RunConfig, SubRun
from .plan import Plan, estimate_compute, plan_run
from .stages import STAGE_TABLE, STAGES, Context, EventFn, Stage, StageResult, eval_provenance
from .study import check_force, check_machine, check_run_dir, load_data, load_items, run_study

__all__ = [
    "DEFAULT_PER_STRATUM",
    "DEFAULT_STUDY",
    "STAGES",
    "STAGE_TABLE",
    "Context",
    "EventFn",
    "Plan",
    "RunConfig",
    "Stage",
    "StageResult",
    "SubRun",
    "check_force",
    "check_machine",
    "check_run_dir",
    "estimate_compute",
    "eval_provenance",
    "load_data",
    "load_items",
    "plan_run",
    "run_study",
]
