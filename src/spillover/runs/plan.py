"""What a run will do, before doing it (``spillover run --dry-run``): sub-runs, item and
pair counts, and a compute estimate, without loading a model. The plan runs the checks a
real run makes before its first output (:func:`~spillover.runs.study.preflight`); what
this machine lacks for the run is reported, not refused (a plan may be for another one)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..data import BBQData, BBQItem
from ..errors import SpilloverError
from .config import RunConfig
from .stages import STAGES
from .study import check_machine, preflight

# parameter counts of the presets (for compute estimates without loading anything)
_PARAMS = {
    "smollm2-135m": 134.5e6,
    "mistral-7b": 7.25e9,
    "llama-3.1-8b": 8.03e9,
    "qwen-2.5-7b": 7.62e9,
}


@dataclass(frozen=True)
class Plan:
    """What a run will do."""

    cfg: RunConfig
    n_eval_items: int
    n_train_pairs: dict[str, int]
    n_heldout_pairs: dict[str, int]
    estimate: dict[str, Any]
    stages: tuple[str, ...] = STAGES
    warnings: tuple[str, ...] = ()
    """The data's warnings (unverified BBQ files), as every output of the run records them."""
    machine: str | None = None
    """What this machine lacks for the run (the error a real run would stop with), or None."""

    def lines(self) -> list[str]:
        """The plan as text, one line per sub-run and per model's compute."""
        subs = self.cfg.sub_runs()
        out = [f"{len(subs)} sub-run(s); stages: {' -> '.join(self.stages)}"]
        for sr in subs:
            t = "+".join(sr.target)
            out.append(
                f"  {sr.slug}: model {sr.model}, target {t}, method {sr.method}, seed {sr.seed}; "
                f"eval {self.n_eval_items} items x 2 models, pairs "
                f"{self.n_train_pairs.get(t, 0)} train / {self.n_heldout_pairs.get(t, 0)} held out"
            )
        for model, est in self.estimate.items():
            out.append(f"  compute {model}: {est['summary']}")
        return out


def estimate_compute(
    model: str, items: Sequence[BBQItem], steps: int, batch: int
) -> dict[str, Any]:
    """Rough FLOPs of two evaluations and the training steps (2 x params per token forward)."""
    # ~4 characters per token is a rough English average; prompts are shared by their answers
    eval_tokens = sum(
        (len(it.context) + len(it.question) + 12 + sum(len(a) + 1 for a in it.answers)) / 4
        for it in items
    )
    # a pair is a prompt plus two short answers (~40 characters)
    chars = sum(len(it.context) + len(it.question) + 40 for it in items)
    pair_tokens = chars / max(1, len(items)) / 4
    params = _PARAMS.get(model)
    if params is None:
        return {
            "summary": f"~{eval_tokens * 2 / 1e6:.2f} M tokens scored (parameter count unknown)"
        }
    eval_flops = 2 * params * eval_tokens * 2  # two evaluations
    # policy forward + backward (~3x forward) on chosen and rejected, plus a reference forward
    train_flops = steps * batch * 2 * pair_tokens * params * 2 * 4
    total = eval_flops + train_flops
    return {
        "params": params,
        "eval_tokens": int(eval_tokens * 2),
        "flops": total,
        "summary": (
            f"~{total / 1e12:.1f} TFLOP ({int(eval_tokens * 2):,} tokens scored, "
            f"{steps} training steps x {batch} pairs); about {total / 2e11 / 60:.0f} min at "
            f"0.2 TFLOP/s (2-core CPU), {total / 4e14:.1f} s at 400 TFLOP/s (one H100/H200, bf16)"
        ),
    }


def plan_run(cfg: RunConfig, *, data: BBQData | None = None) -> Plan:
    """Resolve items and pairs (cheap) and estimate compute, without loading a model.

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
    first = cfg.sub_runs()[0]
    items = checked.items[first]
    train: dict[str, int] = {}
    held: dict[str, int] = {}
    for sub in cfg.sub_runs():
        name = "+".join(sub.target)
        if name not in train:  # counts of the first seed
            train[name], held[name] = checked.pairs[sub.target, first.seed]
    estimate: dict[str, Any] = {}
    for model in cfg.models:
        sub = dataclasses.replace(first, model=model)
        acfg = cfg.align_for(sub, "unused")
        batch = acfg.batch_size * acfg.grad_accum
        steps = acfg.max_steps or int(
            (acfg.epochs or 1) * max(train.values() or [0]) / max(1, batch)
        )
        estimate[model] = estimate_compute(model, items, steps, batch)
    return Plan(
        cfg,
        len(items),
        train,
        held,
        estimate,
        warnings=tuple(checked.data.warnings),
        machine=machine,
    )
