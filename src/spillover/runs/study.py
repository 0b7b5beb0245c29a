"""Running a study: every sub-run through the stage table, resumable, with one manifest each.

A stage whose completion record matches its key and whose outputs are intact is skipped;
a stage killed midway runs again (the evaluator resumes from its shards). With lists of
models, targets, methods or seeds, each combination is a sub-run under
``RUN/<model>__<target>__<method>__s<seed>/`` and a combined report is written at the top.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from .._io import atomic_write_text
from ..align import target_split
from ..data import BBQData, BBQItem, load_bbq
from ..errors import ConfigError, MissingDependencyError
from ..rundir import (
    PREDICTION_FILES,
    StageRecord,
    canonical_hash,
    is_done,
    mark_done,
    write_manifest,
)
from .config import RunConfig, SubRun
from .stages import STAGE_TABLE, STAGES, Context, EventFn, Stage

logger = logging.getLogger(__name__)


def load_data(cfg: RunConfig) -> BBQData:
    """BBQ from the config's source, verified."""
    return load_bbq(
        cfg.bbq.dir, cache_dir=cfg.bbq.cache_dir, allow_unverified=cfg.bbq.allow_unverified
    )


def load_items(cfg: RunConfig, sub: SubRun, data: BBQData) -> tuple[BBQItem, ...]:
    """The evaluation items of a sub-run: a seeded stratified sample, a list, or all.

    A sample draws the target's items from its held-out scenarios only (the split
    :func:`spillover.align.build_pairs` will make), so every evaluated target item is
    one the model never trained on; lists and full runs evaluate every item, and the
    comparison leaves the target's in-sample items out of its main cells.

    Raises:
        ConfigError: the selection is empty or lists unknown items.
    """
    selection = cfg.selection_for(sub)
    pool: Sequence[BBQItem] = data.items
    if selection.per_stratum is not None and cfg.prefs.heldout_frac > 0:
        _, held = target_split(data.items, cfg.prefs_for(sub))
        pool = [
            it
            for it in data.items
            if it.category not in held or it.question_index in held[it.category]
        ]
    items = tuple(selection.apply(pool))
    if not items:
        raise ConfigError("the selection is empty; check `eval.categories`, `eval.contexts`")
    return items


@dataclass
class _Ledger:
    """What the stages of one sub-run returned (or recorded, when skipped)."""

    timings: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_study(
    cfg: RunConfig,
    out: str | Path,
    *,
    force: Iterable[str] = (),
    on_event: EventFn | None = None,
) -> list[Path]:
    """Run every sub-run of ``cfg`` into ``out``; returns the sub-run directories.

    Args:
        cfg: The study.
        out: Run directory (created).
        force: Stages to rerun even when complete (later stages follow); ``all`` reruns
            everything.
        on_event: ``on_event(stage, status, info)`` progress callback.

    Raises:
        ConfigError, DataError, ModelError, MissingDependencyError.
    """
    forced = set(force)
    unknown = forced - set(STAGES) - {"all"}
    if unknown:
        raise ConfigError(
            f"`--force` {', '.join(sorted(unknown))}: unknown stage; expected one of "
            f"{', '.join(STAGES)} or all"
        )
    if "all" in forced:
        forced = set(STAGES)
    if cfg.eval.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from ..evaluate import VLLM_INSTALL_HINT

        raise MissingDependencyError(f"`eval.backend`: vllm: {VLLM_INSTALL_HINT}")
    data = load_data(cfg)
    subs = cfg.sub_runs()
    items = {sub: load_items(cfg, sub, data) for sub in subs}  # fail before any output
    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    _write_config(root, cfg)
    events: EventFn = on_event or (lambda stage, status, info: None)
    dirs: list[Path] = []
    for sub in subs:
        run_dir = root / sub.slug if cfg.is_sweep else root
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.is_sweep:
            _write_config(run_dir, cfg, sub)
        _run_sub(Context(cfg, root, sub, run_dir, data, items[sub], events), forced)
        dirs.append(run_dir)
    if cfg.is_sweep:
        from ..report import write_combined_report

        events("combined-report", "start", {})
        write_combined_report(root, dirs, cfg.report)
        events("combined-report", "done", {"path": str(root / "report.html")})
    return dirs


def _write_config(run_dir: Path, cfg: RunConfig, sub: SubRun | None = None) -> None:
    data = cfg.to_dict()
    if sub is not None:
        data.update(
            model=[sub.model], target=["+".join(sub.target)], method=[sub.method], seed=[sub.seed]
        )
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def _run_sub(ctx: Context, forced: set[str]) -> None:
    ledger = _Ledger()
    forcing = False
    for stage in STAGE_TABLE:
        forcing = forcing or stage.name in forced
        key = canonical_hash(stage.key(ctx))
        stage_dir = ctx.run_dir / stage.folder
        done = None if forcing else is_done(ctx.run_dir, stage_dir, key)
        if done is None and not forcing and stage.name == "eval-base" and ctx.cfg.is_sweep:
            done = _reuse_base_eval(ctx, stage_dir, key)
        ledger.keys[stage.name] = key
        if done is not None:
            ledger.timings[stage.name] = done.seconds
            if stage.recorded is not None:
                ledger.provenance[stage.name] = dict(stage.recorded(ctx))
            ctx.on_event(stage.name, "skip", {"seconds": done.seconds})
            continue
        _run_stage(ctx, stage, stage_dir, key, ledger)
    _write_manifest(ctx, ledger)


def _run_stage(ctx: Context, stage: Stage, stage_dir: Path, key: str, ledger: _Ledger) -> None:
    ctx.on_event(stage.name, "start", {})
    start = time.perf_counter()
    result = stage.run(ctx)
    seconds = time.perf_counter() - start
    stage_dir.mkdir(parents=True, exist_ok=True)
    record = mark_done(ctx.run_dir, stage_dir, stage.name, key, result.outputs, seconds)
    ledger.timings[stage.name] = record.seconds
    if result.provenance and stage.recorded is not None:
        ledger.provenance[stage.name] = dict(result.provenance)
    ctx.on_event(stage.name, "done", {"seconds": seconds})
    _write_manifest(ctx, ledger)


def _reuse_base_eval(ctx: Context, stage_dir: Path, key: str) -> StageRecord | None:
    """In a sweep, copy base predictions another sub-run made with the same key."""
    rel = PREDICTION_FILES["base"]
    for other in sorted(p for p in ctx.root.iterdir() if p.is_dir() and p != ctx.run_dir):
        if is_done(other, (other / rel).parent, key) is None:
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        target = ctx.run_dir / rel
        tmp = target.with_name(f".{target.name}.copy")
        shutil.copyfile(other / rel, tmp)
        tmp.replace(target)
        logger.info("reusing base predictions of %s", other.name)
        return mark_done(ctx.run_dir, stage_dir, "eval-base", key, [target], 0.0)
    return None


def _write_manifest(ctx: Context, ledger: _Ledger) -> None:
    sub = ctx.sub
    models = [{"role": role, **info} for role, info in ledger.provenance.items()]
    write_manifest(
        ctx.run_dir,
        {
            "spillover_version": __version__,
            "name": ctx.cfg.name,
            "config": ctx.cfg.to_dict(),
            "sub_run": {
                "model": sub.model,
                "target": list(sub.target),
                "method": sub.method,
                "seed": sub.seed,
            },
            "seeds": {
                "sample": sub.seed,
                "split": sub.seed,
                "train": sub.seed,
                "bootstrap": sub.seed,
            },
            "bbq": ctx.data.provenance(),
            "models": models or [{"role": "base", "model": sub.model}],
            "n_eval_items": len(ctx.items),
            "timings": dict(ledger.timings),
            "stage_keys": dict(ledger.keys),
            "warnings": list(ctx.data.warnings),
        },
    )
