"""One command from model to report: the run config, the stage table, resumable studies.

``run_study`` sequences the stages through their public faces::

    eval-base -> prefs -> align -> eval-aligned -> compare -> report

into one run directory per combination of model x target x method x seed (layout:
``docs/run.md``). Modules: ``config`` (:class:`RunConfig`, read from YAML by
``yaml_doc``), ``stages`` (the stage table, :func:`stages_for`), ``study`` (:func:`run_study`) and
``plan`` (:func:`plan_run`). Torch-dependent stages are imported inside the stage
functions.
"""

from __future__ import annotations

from .config import RunConfig
from .plan import plan_run
from .study import prepare_run, run_study

__all__ = [
    "RunConfig",
    "plan_run",
    "prepare_run",
    "run_study",
]
