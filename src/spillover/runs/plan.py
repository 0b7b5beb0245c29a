"""What a run will do, before doing it (``spillover run --dry-run``): sub-runs, item and
pair counts, and a compute estimate per sub-run and in total, without loading a model. The
plan runs the checks a real run makes before its first output
(:func:`~spillover.runs.study.preflight`); what this machine lacks for the run is reported,
not refused (a plan may be for another one).

The total counts every sub-run's evaluations in rows scored (items x answer orders) and
counts a base evaluation that sub-runs share (a sweep reuses base predictions made with the
same stage key, :func:`~spillover.runs.study.run_study`) once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import BBQData, BBQItem
from ..errors import SpilloverError
from ..models import model_info
from ..prompts import permutations
from .config import RunConfig, SubRun
from .executors import ExecutorConfig
from .jobs import Job, base_eval_key, job_graph, job_lines
from .locks import JOBS_DIR
from .stages import STAGES, Context, probe_items_for, stages_for
from .study import Preflight, StudyData, check_machine, preflight

CPU_FLOPS_BF16 = 4.3e11
"""Effective FLOP/s of 2 CPU cores with bf16 instructions: the estimate's 145.6 TFLOP for the
default study over its 335.9 s of stages on such a CPU (docs/benchmarks.md, "Default run")."""
CPU_FLOPS_FP32 = (1.5e11, 2.4e11)
"""The same on 2 cores without them (float32 throughout): 954.9 s on an AVX2-only Zen 3 and
603-610 s on an Ice Lake Xeon; a range, as float32 rates differ between CPUs."""
GPU_FLOPS = 4e14
"""Sustained FLOP/s assumed for one H100/H200 in bf16."""


@dataclass(frozen=True)
class SubRunCompute:
    """The compute of one sub-run."""

    slug: str
    model: str
    n_items: int
    """Evaluated items."""
    orders: int
    """Answer orders each item is scored in (``eval.permutations``)."""
    evaluations: int
    """Evaluations this sub-run computes: 2, or 1 when it reuses another's base evaluation."""
    base_from: str | None
    """The sub-run whose base evaluation this one reuses, or None."""
    steps: int
    batch: int
    estimate: Mapping[str, Any]
    """:func:`estimate_compute` of the evaluations and training steps it computes (its probe
    evaluations included)."""
    probe_items: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Items of each likelihood-probe benchmark, each scored by both models."""

    @property
    def rows(self) -> int:
        """BBQ rows scored: items x orders x evaluations."""
        return self.n_items * self.orders * self.evaluations


@dataclass(frozen=True)
class Plan:
    """What a run will do."""

    cfg: RunConfig
    n_eval_items: int
    """Evaluated items of the first sub-run."""
    n_train_pairs: dict[str, int]
    n_heldout_pairs: dict[str, int]
    compute: tuple[SubRunCompute, ...]
    """Per sub-run, in run order."""
    stages: tuple[str, ...] = STAGES
    warnings: tuple[str, ...] = ()
    """The data's warnings (unverified BBQ files), as every output of the run records them."""
    machine: str | None = None
    """What this machine lacks for the run (the error a real run would stop with), or None."""
    jobs: tuple[Job, ...] = ()
    """The study as jobs (:func:`~spillover.runs.jobs.job_graph`)."""
    executor: ExecutorConfig | None = None
    """Where the jobs would run (None or local with one job: this process)."""

    @property
    def total(self) -> dict[str, Any]:
        """The compute over all sub-runs: rows and tokens scored, evaluations (shared base
        evaluations once), training steps, FLOPs (of the models with a known size)."""
        est = [c.estimate for c in self.compute]
        return {
            "sub_runs": len(self.compute),
            "rows": sum(c.rows for c in self.compute),
            "evaluations": sum(c.evaluations for c in self.compute),
            "shared_base": sum(c.base_from is not None for c in self.compute),
            "steps": sum(c.steps for c in self.compute),
            "eval_tokens": sum(int(e["eval_tokens"]) for e in est),
            "flops": sum(float(e.get("flops", 0.0)) for e in est),
            "unknown_size": sorted({c.model for c in self.compute if "flops" not in c.estimate}),
        }

    def lines(self) -> list[str]:
        """The plan as text: one line per sub-run and its compute, then the total."""
        subs = self.cfg.sub_runs()
        out = [f"{len(subs)} sub-run(s); stages: {' -> '.join(self.stages)}"]
        for sr, c in zip(subs, self.compute, strict=True):
            t = "+".join(sr.target)
            out.append(
                f"  {sr.slug}: model {sr.model}, target {t}, method {sr.method}, seed {sr.seed}; "
                f"eval {c.n_items} items x 2 models, pairs "
                f"{self.n_train_pairs.get(t, 0)} train / {self.n_heldout_pairs.get(t, 0)} held out"
            )
            shared = f"; base evaluation reused from {c.base_from}" if c.base_from else ""
            if c.probe_items:
                probes = ", ".join(f"{b} {n}" for b, n in c.probe_items.items())
                out.append(f"    likelihood probes, items x 2 models: {probes}")
            out.append(
                f"    compute {sr.model}: {c.estimate['summary']}; {c.rows:,} BBQ rows scored "
                f"({c.n_items} items x {c.orders} order(s) x {c.evaluations} evaluation(s)"
                f"{shared})"
            )
        out.append(total_line(self.total))
        if self.executor is not None and self.executor.distributed:
            out.extend(self.job_lines())
        return out

    def job_lines(self) -> list[str]:
        """The jobs: on which executor, their resources and dependencies, and what the run
        directory must be."""
        ex = self.executor or ExecutorConfig()
        shared = sum(j.kind == "base" for j in self.jobs)
        out = [
            f"jobs on {ex.describe()}: {len(self.jobs)} job(s), {shared} of them a base "
            "evaluation shared by several sub-runs (computed once)"
        ]
        out.extend(job_lines(self.jobs, ex.resources))
        if ex.kind != "local":
            out.append(
                "  the run directory must be on a filesystem every node mounts (NFS, Lustre, "
                f"GPFS, ...): each job checks the driver's marker in RUN/{JOBS_DIR}/ and stops "
                "in one line where it cannot see it"
            )
        return out


def total_line(total: Mapping[str, Any]) -> str:
    """The plan's last line: the compute of all sub-runs together."""
    flops = float(total["flops"])
    unknown = total["unknown_size"]
    size = (
        f"; parameter count unknown for {', '.join(unknown)} (not in the FLOPs)" if unknown else ""
    )
    return (
        f"  total over {total['sub_runs']} sub-run(s): ~{flops / 1e12:.1f} TFLOP, "
        f"{total['rows']:,} BBQ rows scored in {total['evaluations']} evaluation(s) "
        f"({total['sub_runs']} aligned, {total['evaluations'] - total['sub_runs']} base; "
        f"{total['shared_base']} sub-run(s) reuse another's base evaluation), "
        f"{total['eval_tokens']:,} tokens scored, {total['steps']:,} training steps; "
        f"{_times(flops)}{size}"
    )


def _cpu_bf16() -> bool:
    from ..models import native_cpu_bf16

    return native_cpu_bf16()


def _times(flops: float) -> str:
    """How long ``flops`` take on 2 cores of this machine's kind of CPU and on one large GPU.

    The CPU rate is the effective rate of the measured default runs: with bf16 instructions
    when this CPU has them (scoring and training then run in bf16), else float32's range.
    """
    if _cpu_bf16():
        cpu = (
            f"about {_duration(flops / CPU_FLOPS_BF16)} at {CPU_FLOPS_BF16 / 1e12:.2f} TFLOP/s "
            "(2 CPU cores with bf16 instructions, as this CPU has)"
        )
    else:
        low, high = CPU_FLOPS_FP32
        cpu = (
            f"about {_duration(flops / high)} to {_duration(flops / low)} at "
            f"{low / 1e12:.2f}-{high / 1e12:.2f} TFLOP/s (2 CPU cores in float32: this CPU "
            "has no bf16 instructions)"
        )
    gpu = f"{_duration(flops / GPU_FLOPS)} at {GPU_FLOPS / 1e12:.0f} TFLOP/s (one H100/H200, bf16)"
    return f"{cpu}, {gpu}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_compute(
    model: str,
    items: Sequence[BBQItem],
    steps: int,
    batch: int,
    *,
    orders: int = 1,
    evaluations: int = 2,
    probe_items: Sequence[Any] = (),
) -> dict[str, Any]:
    """Rough FLOPs of ``evaluations`` evaluations of ``items`` in ``orders`` answer orders
    each, of two evaluations of the likelihood-probe items, and of the training steps
    (2 x params per token forward)."""
    # ~4 characters per token is a rough English average; prompts are shared by their answers
    per_eval = orders * sum(
        (len(it.context) + len(it.question) + 12 + sum(len(a) + 1 for a in it.answers)) / 4
        for it in items
    )
    # a probe item scores each option whole after its (shared) context
    per_probe = sum(
        (len(it.context) + sum(len(o) + 1 for o in it.options)) / 4 for it in probe_items
    )
    eval_tokens = int(per_eval * evaluations + 2 * per_probe)
    # a pair is a prompt plus two short answers (~40 characters)
    chars = sum(len(it.context) + len(it.question) + 40 for it in items)
    pair_tokens = chars / max(1, len(items)) / 4
    info = model_info(model)
    params = info.parameters if info is not None else None
    train = f"{steps} training steps x {batch} pairs"
    if params is None:
        return {
            "eval_tokens": eval_tokens,
            "summary": f"~{eval_tokens / 1e6:.2f} M tokens scored, {train} "
            "(parameter count unknown)",
        }
    eval_flops = 2 * params * eval_tokens
    # policy forward + backward (~3x forward) on chosen and rejected, plus a reference forward
    train_flops = steps * batch * 2 * pair_tokens * params * 2 * 4
    total = eval_flops + train_flops
    return {
        "params": params,
        "eval_tokens": eval_tokens,
        "flops": total,
        "summary": (
            f"~{total / 1e12:.1f} TFLOP ({eval_tokens:,} tokens scored, {train}); {_times(total)}"
        ),
    }


def _context(cfg: RunConfig, sub: SubRun, checked: Preflight) -> Context:
    """A stage context of ``sub`` with no run directory: enough for keys and item choices."""
    return Context(
        cfg, Path(), sub, Path(), checked.data, checked.items[sub], None,
        lambda stage, status, info: None, checked.probes,
    )  # fmt: skip


def plan_run(
    cfg: RunConfig,
    *,
    data: BBQData | StudyData | None = None,
    executor: ExecutorConfig | None = None,
) -> Plan:
    """Resolve items and pairs (cheap), estimate compute and lay out the jobs (for
    ``executor``, where they would run), without loading a model.

    Raises:
        ConfigError, DataError: what would stop the run before its first output (the data,
            any sub-run's selection or pairs).
    """
    checked = preflight(cfg, data)
    machine: str | None = None
    try:
        check_machine(cfg)
    except SpilloverError as exc:
        machine = str(exc)
    subs = cfg.sub_runs()
    train: dict[str, int] = {}
    held: dict[str, int] = {}
    for sub in subs:
        name = "+".join(sub.target)
        if name not in train:  # counts of the first seed
            train[name], held[name] = checked.pairs[sub.target, sub.seed]
    orders = len(permutations(cfg.eval.permutations))
    first_with: dict[str, str] = {}  # base evaluation key -> the sub-run that computes it
    compute = []
    for sub in subs:
        items = checked.items[sub]
        base_from = None
        if cfg.is_sweep:  # a single run has nothing to share with
            key = base_eval_key(cfg, sub, checked.data, items)
            base_from = first_with.setdefault(key, sub.slug)
            base_from = None if base_from == sub.slug else base_from
        acfg = cfg.align_for(sub, "unused")
        batch = acfg.batch_size * acfg.grad_accum
        pairs = checked.pairs[sub.target, sub.seed][0]
        steps = acfg.max_steps or int((acfg.epochs or 1) * pairs / max(1, batch))
        evaluations = 1 if base_from else 2
        ctx = _context(cfg, sub, checked)
        probe = {b: probe_items_for(ctx, b) for b in cfg.benchmarks if b != "bbq"}
        est = estimate_compute(
            sub.model, items, steps, batch, orders=orders, evaluations=evaluations,
            probe_items=[it for chosen in probe.values() for it in chosen],
        )  # fmt: skip
        compute.append(
            SubRunCompute(
                sub.slug,
                sub.model,
                len(items),
                orders,
                evaluations,
                base_from,
                steps,
                batch,
                est,
                {b: len(chosen) for b, chosen in probe.items()},
            )
        )
    return Plan(
        cfg,
        len(checked.items[subs[0]]),
        train,
        held,
        tuple(compute),
        stages=tuple(s.name for s in stages_for(cfg)),
        warnings=tuple(checked.data.warnings),
        machine=machine,
        jobs=job_graph(cfg, checked),
        executor=executor,
    )
