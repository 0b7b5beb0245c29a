"""Running a study: every sub-run through the stage table, resumable, with one manifest each.

A stage whose completion record matches its key and whose outputs are intact is skipped;
a stage killed midway runs again (the evaluator resumes from its shards). With lists of
models, targets, methods or seeds, each combination is a sub-run under
``RUN/<model>__<target>__<method>__s<seed>/`` and a combined report is written at the top.

Everything that can be checked without computing is checked before the run directory is
made (:func:`preflight`, :func:`check_machine`); a run that fails before any stage wrote an
output removes the folders it created.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from .._io import atomic_write_text
from ..align import target_split
from ..data import BBQData, BBQItem, BenchmarkData, DownloadProgress, load_bbq, load_benchmark
from ..errors import ConfigError, MissingDependencyError
from ..prompts import is_chat_format
from ..rundir import (
    PREDICTION_FILES,
    StageRecord,
    canonical_hash,
    is_done,
    mark_done,
    write_manifest,
)
from .config import RunConfig, SubRun
from .locks import LOCK_DIR, record_event, stage_lock
from .stages import PROBE_STAGE_NAMES, STAGES, Context, EventFn, Stage, stages_for

logger = logging.getLogger(__name__)


def load_data(cfg: RunConfig, progress: DownloadProgress | None = None) -> BBQData:
    """BBQ from the config's source, verified (``progress``: of a download, if one is needed)."""
    return load_bbq(
        cfg.bbq.dir,
        cache_dir=cfg.bbq.cache_dir,
        allow_unverified=cfg.bbq.allow_unverified,
        progress=progress,
    )


@dataclass(frozen=True)
class StudyData:
    """Every benchmark a study evaluates, loaded and verified."""

    bbq: BBQData
    """BBQ."""
    probes: Mapping[str, BenchmarkData]
    """The likelihood-probe benchmarks of ``benchmarks:``, by name."""


def load_probes(
    cfg: RunConfig, progress: DownloadProgress | None = None
) -> dict[str, BenchmarkData]:
    """The study's likelihood-probe benchmarks from the ``probes`` section's source, verified."""
    return {
        b: load_benchmark(
            b,
            cfg.probes.dir,
            cache_dir=cfg.bbq.cache_dir,
            allow_unverified=cfg.probes.allow_unverified,
            progress=progress,
        )
        for b in cfg.benchmarks
        if b != "bbq"
    }


def study_data(cfg: RunConfig, data: BBQData | StudyData | None = None) -> StudyData:
    """``data`` completed: what is not given is loaded."""
    if isinstance(data, StudyData):
        return data
    return StudyData(data or load_data(cfg), load_probes(cfg))


def prepare_run(
    cfg: RunConfig,
    run_dir: str | Path,
    force: Iterable[str] = (),
    *,
    machine: bool = True,
    progress: DownloadProgress | None = None,
) -> StudyData:
    """What ``spillover run`` checks before its run directory is made, then the data:
    the stages ``force`` names, the run directory, this machine (unless ``machine`` is
    false: a dry run reports what it lacks instead), BBQ and the likelihood-probe
    benchmarks (downloaded when not cached, with ``progress``).

    Raises:
        ConfigError, DataError, MissingDependencyError.
    """
    check_force(force)
    check_run_dir(Path(run_dir).expanduser())
    if machine:
        check_machine(cfg)  # a missing package or device fails before BBQ is downloaded
    return StudyData(load_data(cfg, progress=progress), load_probes(cfg, progress=progress))


def eval_heldout(cfg: RunConfig, sub: SubRun, data: BBQData) -> dict[str, tuple[int, ...]] | None:
    """The templates a sub-run's evaluations draw each target's items from: the held-out
    scenarios :func:`spillover.align.build_pairs` will make, for a sampled selection (so
    every evaluated target item is one the model never trained on); None for item lists
    and full runs, which evaluate every item (the comparison then leaves the target's
    in-sample items out of its main cells)."""
    pcfg = cfg.prefs_for(sub)
    if cfg.selection_for(sub).per_stratum is None or pcfg.heldout_frac <= 0:
        return None
    if pcfg.source != "bbq":  # pairs from another benchmark: no BBQ item was trained on
        return None
    _, held = target_split(data.items, pcfg)
    return held


def load_items(cfg: RunConfig, sub: SubRun, data: BBQData) -> tuple[BBQItem, ...]:
    """The evaluation items of a sub-run: a seeded stratified sample, a list, or all
    (the targets' items of a sample on their held-out scenarios, :func:`eval_heldout`).

    Raises:
        ConfigError: the selection is empty or lists unknown items.
    """
    items = tuple(cfg.selection_for(sub).apply(data.items, heldout=eval_heldout(cfg, sub, data)))
    if not items:
        raise ConfigError("the selection is empty; check `eval.categories`, `eval.contexts`")
    return items


@dataclass(frozen=True)
class Preflight:
    """What a run will work on, resolved before any output: the data, every sub-run's
    items and every target x seed's pair counts."""

    data: BBQData
    items: dict[SubRun, tuple[BBQItem, ...]]
    pairs: dict[tuple[tuple[str, ...], int], tuple[int, int]]
    """(target, seed) -> (training pairs, held-out pairs)."""
    probes: Mapping[str, BenchmarkData] = dataclasses.field(default_factory=dict)
    """The likelihood-probe benchmarks, by name."""


def preflight(cfg: RunConfig, data: BBQData | StudyData | None = None) -> Preflight:
    """Load the data, select every sub-run's items and build every target's pairs (cheap,
    no model), so a selection or pair set that would fail a later stage fails now.

    Raises:
        ConfigError, DataError: the data, the selection or the pairs.
    """
    from ..align import build_pairs, probe_target_split

    loaded = study_data(cfg, data)
    data = loaded.bbq
    subs = cfg.sub_runs()
    items = {sub: load_items(cfg, sub, data) for sub in subs}
    pairs: dict[tuple[tuple[str, ...], int], tuple[int, int]] = {}
    for sub in subs:
        if (sub.target, sub.seed) in pairs:
            continue
        pcfg = cfg.prefs_for(sub)
        if pcfg.source != "bbq":
            if pcfg.source not in loaded.probes:
                raise ConfigError(
                    f"`prefs.source`={pcfg.source!r} builds pairs from {pcfg.source}; list it "
                    "in `benchmarks` too, so its held-out items are evaluated"
                )
            probe_items = loaded.probes[pcfg.source].items
            held = probe_target_split(probe_items, pcfg)
            chosen = [it for it in probe_items if it.attribute in pcfg.targets]
            n_held = sum(it.cluster in held.get(it.attribute, ()) for it in chosen)
            pairs[sub.target, sub.seed] = (len(chosen) - n_held, n_held)
            continue
        if is_chat_format(pcfg.prompt_format):  # counts do not depend on the chat template
            pcfg = dataclasses.replace(pcfg, prompt_format="letters")
        built = build_pairs(data.items, pcfg)
        pairs[sub.target, sub.seed] = (len(built.train), len(built.heldout))
    return Preflight(data, items, pairs, loaded.probes)


def check_machine(cfg: RunConfig) -> None:
    """Check what the run needs from this machine: the device, the scoring backend and,
    per model x method, the trainer, 4-bit support and the experiment tracker.

    Raises:
        ConfigError: the device is absent here.
        MissingDependencyError: a package the run needs is not installed.
    """
    from ..align import check_environment
    from ..evaluate import check_backend

    try:
        check_backend(cfg.eval)
    except MissingDependencyError as exc:
        raise MissingDependencyError(str(exc).replace("`backend`", "`eval.backend`")) from None

    device = cfg.device
    if device is not None and device != "auto":
        import torch

        if device.startswith("cuda:") and torch.cuda.is_available():
            count = torch.cuda.device_count()
            if int(device.split(":")[1]) >= count:
                raise ConfigError(
                    f"`device`={device!r} but this machine has {count} CUDA device(s) "
                    f"(cuda:0..cuda:{count - 1})"
                )
        if device == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("`device`='mps' but MPS is not available here; use cpu")
    for model in cfg.models:
        for method in cfg.methods:
            sub = SubRun(model, cfg.targets[0], method, cfg.seeds[0])
            check_environment(cfg.align_for(sub, "unused"))


def _is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a spillover run (its resolved ``config.yaml``)."""
    config = path / "config.yaml"
    try:
        if not config.is_file() or config.stat().st_size > 1 << 20:
            return False
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, yaml.YAMLError, RecursionError):
        return False
    return isinstance(data, dict) and {"name", "model", "target", "method", "bbq"} <= set(data)


def check_force(force: Iterable[str]) -> set[str]:
    """The stages ``--force`` names (``all``: every stage).

    Raises:
        ConfigError: an unknown stage name.
    """
    forced = set(force)
    unknown = forced - set(STAGES) - set(PROBE_STAGE_NAMES) - {"all"}
    if unknown:
        raise ConfigError(
            f"`--force` {', '.join(sorted(unknown))}: unknown stage; expected one of "
            f"{', '.join(STAGES)}, eval-base-<benchmark>, eval-aligned-<benchmark> or all"
        )
    return set(STAGES) | set(PROBE_STAGE_NAMES) if "all" in forced else forced


def check_run_dir(root: Path) -> None:
    """Refuse a run directory that is a file, or a non-empty folder that is not a run (a run
    writes config.yaml, report.html and stage folders into it).

    Raises:
        ConfigError: naming the folder.
    """
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: the run directory is a file; choose a folder with --out")
    if root.is_dir() and any(root.iterdir()) and not _is_run_dir(root):
        raise ConfigError(
            f"{root}: the folder is not empty and holds no spillover run (no config.yaml "
            "written by `spillover run`); choose a new folder with --out, or an earlier run's"
        )


def _only_scaffolding(folder: Path) -> bool:
    """Whether ``folder`` holds nothing but folders and ``config.yaml`` files: no stage
    output, shard, record or manifest."""
    return all(
        p.is_dir() or p.name == "config.yaml" or p.parent.name == LOCK_DIR
        for p in folder.rglob("*")
    )


def _remove_new(created: Sequence[Path]) -> None:
    """Remove the folders this run created (innermost first) that hold no work."""
    for folder in reversed(created):
        if folder.is_dir() and _only_scaffolding(folder):
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class _Ledger:
    """What the stages of one sub-run returned (or recorded, when skipped)."""

    timings: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_sequential(
    cfg: RunConfig,
    out: str | Path,
    *,
    force: Iterable[str] = (),
    on_event: EventFn | None = None,
    data: BBQData | StudyData | None = None,
) -> list[Path]:
    """Run every sub-run of ``cfg`` into ``out``, one after the other in this process
    (what :func:`spillover.runs.run_study` does without an executor); returns the sub-run
    directories.

    Args:
        cfg: The study.
        out: Run directory (created).
        force: Stages to rerun even when complete (later stages follow); ``all`` reruns
            everything.
        on_event: ``on_event(stage, status, info)`` progress callback.
        data: BBQ as :func:`load_data` loads it for ``cfg`` (loaded here when not given).

    Raises:
        ConfigError, DataError, ModelError, MissingDependencyError.
    """
    forced = check_force(force)
    root = Path(out).expanduser()
    check_run_dir(root)
    # everything checkable without computing fails here, before any output
    check_machine(cfg)
    checked = preflight(cfg, data)
    events: EventFn = on_event or (lambda stage, status, info: None)
    dirs: list[Path] = []
    created = [p for p in (*reversed(root.parents), root) if not p.exists()]
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_config(root, cfg)
        for sub in cfg.sub_runs():
            run_dir = root / sub.slug if cfg.is_sweep else root
            if not run_dir.exists():
                created.append(run_dir)
            _run_sub(sub_context(cfg, root, sub, checked, events), forced)
            dirs.append(run_dir)
    except BaseException:
        _remove_new(created)
        raise
    if cfg.is_sweep:
        combined_report(cfg, root, dirs, events)
    return dirs


def sub_context(
    cfg: RunConfig, root: Path, sub: SubRun, checked: Preflight, events: EventFn
) -> Context:
    """The context of one sub-run, its folder made (with its ``config.yaml`` in a sweep)."""
    run_dir = root / sub.slug if cfg.is_sweep else root
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.is_sweep:
        _write_config(run_dir, cfg, sub)
    held = eval_heldout(cfg, sub, checked.data)
    items = checked.items[sub]
    return Context(cfg, root, sub, run_dir, checked.data, items, held, events, checked.probes)


def combined_report(cfg: RunConfig, root: Path, dirs: Sequence[Path], events: EventFn) -> None:
    """Write a sweep's combined report (one process at a time)."""
    from ..report import write_combined_report

    with stage_lock(root, "combined-report"):
        events("combined-report", "start", {})
        write_combined_report(root, list(dirs), cfg.report)
        events("combined-report", "done", {"path": str(root / "report.html")})


def _write_config(run_dir: Path, cfg: RunConfig, sub: SubRun | None = None) -> None:
    data = cfg.to_dict()
    if sub is not None:
        data.update(
            model=[sub.model], target=["+".join(sub.target)], method=[sub.method], seed=[sub.seed]
        )
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def _run_sub(ctx: Context, forced: set[str], *, until: str | None = None, job: str = "run") -> None:
    """Run the stages of one sub-run (those complete are skipped), up to and including
    ``until`` (None: all of them); ``job`` names the work in the event log.

    Every stage found not done is computed under its lock (:func:`stage_lock`) after a
    second look, so two processes on one run directory never compute the same stage: the
    second waits and then finds it done. A sweep's base evaluation is locked by its stage
    key, so sub-runs sharing it compute it once, whichever job gets there first.
    """
    ledger = _Ledger()
    forcing = False
    for stage in stages_for(ctx.cfg):
        forcing = forcing or stage.name in forced
        key = canonical_hash(stage.key(ctx))
        stage_dir = ctx.run_dir / stage.folder
        ledger.keys[stage.name] = key
        done = None if forcing else is_done(ctx.run_dir, stage_dir, key)
        if done is None:
            with stage_lock(ctx.root, _lock_name(ctx, stage.name, key), _waiting(ctx, stage)):
                done = None if forcing else is_done(ctx.run_dir, stage_dir, key)
                if done is None and not forcing and stage.name == "eval-base" and ctx.cfg.is_sweep:
                    done = _reuse_base_eval(ctx, stage_dir, key)
                    if done is not None:
                        record_event(ctx.root, job=job, sub_run=ctx.sub.slug, stage=stage.name,
                                     status="reused", seconds=0.0)  # fmt: skip
                if done is None:
                    _run_stage(ctx, stage, stage_dir, key, ledger, job)
        if done is not None:
            ledger.timings[stage.name] = done.seconds
            if stage.recorded is not None:
                ledger.provenance[stage.name] = dict(stage.recorded(ctx))
            ctx.on_event(stage.name, "skip", {"seconds": done.seconds, "label": stage.label})
        if stage.name == until:
            break
    _write_manifest(ctx, ledger)


def _lock_name(ctx: Context, stage: str, key: str) -> str:
    """The lock of a stage: a sweep's base evaluation by its key (sub-runs share it),
    every other stage by its sub-run."""
    if stage == "eval-base" and ctx.cfg.is_sweep:
        return f"eval-base-{key[:16]}"
    return f"{ctx.sub.slug}.{stage}" if ctx.cfg.is_sweep else stage


def _waiting(ctx: Context, stage: Stage) -> Callable[[], None]:
    def on_wait() -> None:
        ctx.on_event(stage.name, "wait", {"label": stage.label})

    return on_wait


def _run_stage(
    ctx: Context, stage: Stage, stage_dir: Path, key: str, ledger: _Ledger, job: str
) -> None:
    """Compute one stage and write its completion record (after its outputs), then log it
    in the event log at once (the manifest written next takes a while)."""
    ctx.on_event(stage.name, "start", {"label": stage.label})
    start = time.perf_counter()
    result = stage.run(ctx)
    seconds = time.perf_counter() - start
    stage_dir.mkdir(parents=True, exist_ok=True)
    record = mark_done(ctx.run_dir, stage_dir, stage.name, key, result.outputs, seconds)
    record_event(ctx.root, job=job, sub_run=ctx.sub.slug, stage=stage.name, status="done",
                 seconds=record.seconds)  # fmt: skip
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
