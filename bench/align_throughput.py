"""Alignment throughput on CPU: our DPO configuration vs TRL ``DPOTrainer``, default and tuned.

Both arms train the same LoRA (r=16, alpha=32, dropout 0.05, the seven attention
and MLP projections) on the same model (the embedded SmolLM2-135M-Instruct) and
the same seeded gender pairs, at the same batch size, for the same number of
steps. Each arm runs in its own Python process so that its peak RSS is clean.

* ``trl-defaults``: ``trl.DPOConfig(output_dir, per_device_train_batch_size,
  max_steps, use_cpu=True)`` and nothing else (``use_cpu`` because
  TrainingArguments otherwise refuses TRL's default bf16 on a machine without a GPU), ``trl.DPOTrainer(model, args, train_dataset,
  processing_class, peft_config)``: TRL's defaults (bf16 autocast, gradient
  checkpointing, a reference forward pass every step, the whole dataset
  tokenized).
* ``trl-tuned``: ``trl.DPOTrainer`` with TRL's own best options for this hardware and the
  same settings as ours: the ``smollm2-135m`` preset's learning rate, beta, scheduler,
  warm-up, weight decay, gradient clipping, bf16 and seed, the same LoRA and batch,
  ``precompute_ref_log_probs=True`` (``precompute_ref_batch_size`` 32), no gradient
  checkpointing, one log per step, and the very rows ours trains on (the seeded
  ``max_steps`` sample), so that their loss trajectories can be compared. ``max_length``
  stays TRL's 1024, which truncates no BBQ pair (ours uses the longest pair's length; both
  pad each batch to its longest). ``padding_free`` is not available for DPO in TRL 1.16
  (it warns and falls back) and Liger kernels need a GPU, so neither applies here.
* ``ours``: ``spillover.align.train_adapter`` with the ``smollm2-135m`` preset
  (bf16 autocast where the CPU has bf16 instructions, reference log-probs precomputed once,
  no gradient checkpointing, pair packing, only the rows a ``max_steps`` run uses). Its loop
  time includes the preset's periodic held-out evaluation, which the TRL arms do not run;
  ``--variants '[{"eval_strategy": "no"}]'`` adds an arm doing the same work as theirs.

Reported per arm: training-loop steps/s (``trainer.train()`` only), end-to-end
steps/s (model loading, trainer construction, tokenization, reference
precompute and, for ours, saving the adapter included), peak RSS of the process, and the mean loss
of the last 5 steps. ``--trajectory N`` also trains our configuration for N
steps and reports the loss per step and the held-out implicit-reward accuracy
before and after.

Usage::

    python bench/align_throughput.py --bbq-dir BBQ --steps 20 --batch-size 8 --trajectory 40
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_pairs(bbq_dir: str, out: Path, seed: int) -> None:
    from spillover.align import PrefsConfig, build_pairs
    from spillover.align.prefs import write_pairs
    from spillover.data import load_bbq

    data = load_bbq(bbq_dir, categories=["gender"])
    pairs = build_pairs(
        data.items, PrefsConfig(targets=("gender",), seed=seed), provenance=data.provenance()
    )
    write_pairs(pairs, out, overwrite=True)


def _losses(history: list[dict[str, Any]]) -> list[float]:
    return [float(h["loss"]) for h in history if "loss" in h and "train_loss" not in h]


def worker_trl(pairs: Path, steps: int, batch: int, tuned: bool = False) -> dict[str, Any]:
    import pandas as pd
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from spillover.models import load_model

    t0 = time.perf_counter()
    loaded = load_model("smollm2-135m", device="cpu")
    df = pd.read_parquet(pairs / "train.parquet")[["prompt", "chosen", "rejected"]]
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["modules"],
        task_type="CAUSAL_LM",
    )
    with tempfile.TemporaryDirectory() as tmp:
        if tuned:
            args, train = trl_tuned(tmp, df, steps, batch)
        else:
            # use_cpu=True is the one addition: without it TrainingArguments refuses bf16 on CPU
            args = trl.DPOConfig(
                output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps, use_cpu=True
            )
            train = Dataset.from_pandas(df)
        trainer = trl.DPOTrainer(
            model=loaded.model,
            args=args,
            train_dataset=train,
            processing_class=loaded.tokenizer,
            peft_config=lora,
        )
        t1, c1 = time.perf_counter(), time.process_time()
        trainer.train()
        t2, c2 = time.perf_counter(), time.process_time()
        history = list(trainer.state.log_history)
    return {
        "arm": "trl-tuned" if tuned else "trl-defaults",
        "setup_s": t1 - t0,
        "train_s": t2 - t1,
        "train_cpu_s": c2 - c1,
        "steps": trainer.state.global_step,
        "losses": _losses(history),
        "train_loss": next((h["train_loss"] for h in history if "train_loss" in h), None),
        "settings": {
            "bf16": args.bf16,
            "gradient_checkpointing": args.gradient_checkpointing,
            "precompute_ref_log_probs": args.precompute_ref_log_probs,
            "logging_steps": args.logging_steps,
            "max_length": args.max_length,
        },
    }


def trl_tuned(
    tmp: str,
    df: Any,
    steps: int,
    batch: int,
    *,
    preset: str = "smollm2-135m",
    device: str = "cpu",
    max_length: int | None = None,
    **overrides: Any,
) -> tuple[Any, Any]:
    """TRL's config with our preset's settings and its own speed options; our rows.

    ``preset``, ``device`` and ``overrides`` (AlignConfig fields) pick the settings copied;
    ``max_length`` None keeps TRL's default (bench/gpu_check.py passes ours).
    """
    import trl

    from spillover.align import AlignConfig
    from spillover.align.trainer import resolve_bf16, to_trl_dataset, used_rows

    cfg = AlignConfig.from_preset(
        preset,
        Path(tmp) / "unused",
        max_steps=steps,
        batch_size=batch,
        device=device,
        **overrides,
    )
    extra: dict[str, Any] = {} if max_length is None else {"max_length": max_length}
    args = trl.DPOConfig(
        output_dir=tmp,
        per_device_train_batch_size=batch,
        max_steps=steps,
        use_cpu=device == "cpu",
        learning_rate=cfg.learning_rate,
        beta=cfg.beta,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        bf16=resolve_bf16(cfg.bf16, device),
        gradient_checkpointing=False,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=32,
        logging_steps=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to=[],
        **extra,
    )
    return args, used_rows(to_trl_dataset(df, "dpo"), cfg)


def worker_ours(pairs: Path, steps: int, batch: int, extra: dict[str, Any]) -> dict[str, Any]:
    from spillover.align import AlignConfig, train_adapter

    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig.from_preset(
            "smollm2-135m",
            Path(tmp) / "adapter",
            max_steps=steps,
            batch_size=batch,
            lora_r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=tuple(LORA["modules"]),
            device="cpu",
            **extra,
        )
        t0 = time.perf_counter()
        ref = train_adapter(pairs, cfg)
        t_end = time.perf_counter()
    return {
        "arm": "ours" + ("" if not extra else "+" + ",".join(f"{k}={v}" for k, v in extra.items())),
        # setup = all but the training loop: model load, tokenization, precompute, saving
        "setup_s": (t_end - t0) - ref.seconds,
        "train_s": ref.seconds,
        "train_cpu_s": ref.cpu_seconds,
        "steps": ref.steps,
        "losses": _losses(list(ref.log_history)),
        "train_loss": next((h["train_loss"] for h in ref.log_history if "train_loss" in h), None),
        "settings": {
            k: getattr(cfg, k)
            for k in (
                "bf16",
                "gradient_checkpointing",
                "precompute_ref",
                "pack_pairs",
                "max_length",
            )
        },
    }


def worker_trajectory(pairs: Path, steps: int, batch: int, n_heldout: int) -> dict[str, Any]:
    import pandas as pd

    from spillover.align import AlignConfig, train_adapter
    from spillover.align.diagnostics import reward_accuracy
    from spillover.models import load_model

    held = pd.read_parquet(pairs / "heldout.parquet")
    held = held.sample(min(n_heldout, len(held)), random_state=0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig.from_preset(
            "smollm2-135m", Path(tmp) / "adapter", max_steps=steps, batch_size=batch, device="cpu"
        )
        base = load_model("smollm2-135m", device="cpu")
        from peft import get_peft_model

        from spillover.align.trainer import lora_config

        fresh = get_peft_model(base.model, lora_config(cfg))
        before = reward_accuracy(fresh, base.tokenizer, held, beta=cfg.beta)
        ref = train_adapter(pairs, cfg)
        trained = load_model("smollm2-135m", adapter=ref.path, device="cpu")
        after = reward_accuracy(trained.model, trained.tokenizer, held, beta=cfg.beta)
    history = list(ref.log_history)
    return {
        "arm": "trajectory",
        "steps": ref.steps,
        "train_s": ref.seconds,
        "losses": _losses(history),
        "reward_accuracies": [
            h["rewards/accuracies"] for h in history if "rewards/accuracies" in h
        ],
        "heldout_before": before,
        "heldout_after": after,
        "config": {
            k: getattr(cfg, k)
            for k in ("learning_rate", "beta", "batch_size", "lora_r", "lora_alpha", "bf16")
        },
    }


def run_worker(argv: list[str]) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, __file__, *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker {argv[:2]} failed:\n{proc.stderr[-4000:]}")
    res = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    res["load_before"], res["load_after"] = load_before, os.getloadavg()[0]
    print(f"# {json.dumps(res)}", file=sys.stderr, flush=True)  # raw result, as soon as it is in
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument(
        "--defaults-steps",
        type=int,
        help="steps of the trl-defaults arm (default: --steps; it runs ~30x slower)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trajectory", type=int, default=0, help="also run N steps of ours")
    ap.add_argument("--heldout", type=int, default=128, help="held-out pairs scored")
    ap.add_argument(
        "--variants",
        default="[]",
        help="JSON list of extra arms: AlignConfig overrides, e.g. '[{\"pack_pairs\": false}]'",
    )
    ap.add_argument(
        "--worker", choices=["trl", "trl-tuned", "ours", "trajectory"], help=argparse.SUPPRESS
    )
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        import torch

        torch.manual_seed(a.seed)
        pairs = Path(a.pairs)
        if a.worker in ("trl", "trl-tuned"):
            res = worker_trl(pairs, a.steps, a.batch_size, tuned=a.worker == "trl-tuned")
        elif a.worker == "ours":
            res = worker_ours(pairs, a.steps, a.batch_size, json.loads(a.extra))
        else:
            res = worker_trajectory(pairs, a.steps, a.batch_size, a.heldout)
        res["peak_rss_mib"] = peak_rss_mib()
        print(json.dumps(res))
        return

    if not a.bbq_dir:
        raise SystemExit("give --bbq-dir or set SPILLOVER_BBQ_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        pairs = Path(tmp) / "pairs"
        make_pairs(a.bbq_dir, pairs, a.seed)
        common = ["--pairs", str(pairs), "--batch-size", str(a.batch_size), "--seed", str(a.seed)]
        arms = [
            run_worker(["--worker", "trl", "--steps", str(a.defaults_steps or a.steps), *common]),
            run_worker(["--worker", "ours", "--steps", str(a.steps), *common]),
            run_worker(["--worker", "trl-tuned", "--steps", str(a.steps), *common]),
        ]
        for extra in json.loads(a.variants):
            arms.append(
                run_worker(
                    [
                        "--worker",
                        "ours",
                        "--steps",
                        str(a.steps),
                        *common,
                        "--extra",
                        json.dumps(extra),
                    ]
                )
            )
        traj = None
        if a.trajectory:
            traj = run_worker(
                [
                    "--worker",
                    "trajectory",
                    "--steps",
                    str(a.trajectory),
                    *common,
                    "--heldout",
                    str(a.heldout),
                ]
            )

    print(
        f"SmolLM2-135M-Instruct, CPU ({os.cpu_count()} cores), gender pairs seed {a.seed}, "
        f"batch {a.batch_size}, LoRA r={LORA['r']} alpha={LORA['alpha']} on 7 projections, "
        f"{a.steps} steps (trl-defaults {a.defaults_steps or a.steps})"
    )
    header = (
        f"{'arm':<34} {'loop steps/s':>12} {'loop steps/CPU-s':>16} {'e2e steps/s':>12} "
        f"{'setup s':>8} {'peak RSS MiB':>12} {'loss (last 5)':>14} {'train_loss':>10} "
        f"{'load before/after':>17}"
    )
    print(header)
    print("-" * len(header))
    for r in arms:
        loop = r["steps"] / r["train_s"]
        e2e = r["steps"] / (r["train_s"] + r["setup_s"])
        last = r["losses"][-5:]
        loss = sum(last) / len(last) if last else math.nan
        cpu = r["steps"] / r["train_cpu_s"]
        print(
            f"{r['arm']:<34} {loop:>12.4f} {cpu:>16.4f} {e2e:>12.4f} {r['setup_s']:>8.1f} "
            f"{r['peak_rss_mib']:>12.0f} {loss:>14.4f} {r['train_loss'] or math.nan:>10.4f} "
            f"{r['load_before']:>8.2f}/{r['load_after']:<8.2f}"
        )
    base, ours = arms[0], arms[1]
    ratio_loop = (ours["steps"] / ours["train_s"]) / (base["steps"] / base["train_s"])
    ratio_e2e = (ours["steps"] / (ours["train_s"] + ours["setup_s"])) / (
        base["steps"] / (base["train_s"] + base["setup_s"])
    )
    ratio_cpu = base["train_cpu_s"] / base["steps"] / (ours["train_cpu_s"] / ours["steps"])
    print(
        f"speed-up: training loop {ratio_loop:.2f}x (CPU time {ratio_cpu:.2f}x), "
        f"end to end {ratio_e2e:.2f}x; "
        f"peak RSS {ours['peak_rss_mib']:.0f} vs {base['peak_rss_mib']:.0f} MiB"
    )
    tuned = arms[2]
    ratio_tuned = (ours["steps"] / ours["train_s"]) / (tuned["steps"] / tuned["train_s"])
    print(
        f"ours vs trl-tuned: training loop {ratio_tuned:.2f}x; "
        f"peak RSS {ours['peak_rss_mib']:.0f} vs {tuned['peak_rss_mib']:.0f} MiB"
    )
    first = list(zip(ours["losses"][:10], tuned["losses"][:10], strict=False))
    if first:
        gap = max(abs(x - y) for x, y in first)
        print(f"loss, first {len(first)} steps, ours | trl-tuned (max gap {gap:.2e}):")
        print("  " + " ".join(f"{x:.4f}|{y:.4f}" for x, y in first))
    for r in arms:
        print(f"settings {r['arm']}: {json.dumps(r['settings'])}")
    if traj is not None:
        print()
        print(f"trajectory: ours, {traj['steps']} steps, {traj['train_s']:.0f} s, {traj['config']}")
        print("loss per step: " + " ".join(f"{x:.3f}" for x in traj["losses"]))
        print(
            "reward accuracy per step: " + " ".join(f"{x:.2f}" for x in traj["reward_accuracies"])
        )
        for when in ("before", "after"):
            h = traj[f"heldout_{when}"]
            print(
                f"held-out ({int(h['n'])} pairs) {when}: reward accuracy {h['reward_accuracy']:.3f}, "
                f"mean reward margin {h['reward_margin']:.4f}, policy prefers chosen "
                f"{h['policy_accuracy']:.3f} (base model {h['reference_accuracy']:.3f})"
            )
        print(f"peak RSS trajectory run: {traj['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
