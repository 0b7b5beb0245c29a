"""One prepared GPU check: LoRA DPO training steps (ours, TRL tuned) and scoring at 7B shape.

Everything runs on a Qwen2.5-7B-shaped model with random bfloat16 weights built directly on
the GPU from the published configuration (``bench/eval_gpu.py``'s ``QWEN25_7B`` and
``build_model``; speed and memory do not depend on weight values, and nothing is
downloaded). Sections, each in its own Python process (a clean peak-memory reading, and a
crash or CUDA out-of-memory in one is reported in the table while the others still run):

``ours``
    Our training path: ``spillover.align.build_trainer`` (the trainer ``train_adapter``
    builds, which ``bench/align_throughput.py`` times as "ours") with the ``qwen-2.5-7b``
    preset (LoRA r=16, alpha=16, dropout 0.05 on the seven projections, lr 5e-6, beta 0.1,
    cosine schedule, bf16 autocast, reference log-probs precomputed once, pair packing) at
    batch 8, one accumulation step and no gradient checkpointing (the preset checkpoints;
    at batch 8 of BBQ-length pairs a 7B model fits an H200 without it, and it matches the
    TRL arm). Unlike ``train_adapter`` the model is built here, not loaded, and after
    training only ``trainer.save_model`` runs, whose adapter files are then checked.
``trl-tuned``
    ``trl.DPOTrainer`` configured as ``bench/align_throughput.py``'s "trl-tuned" arm
    (``trl_tuned``): the same preset settings, LoRA, batch, bf16 and rows,
    ``precompute_ref_log_probs=True``, no gradient checkpointing, and our ``max_length``
    (the longest pair's tokens).
``eval``
    ``bench/eval_gpu.py``'s ``measure``: packed bf16 scores against one forward per answer
    in bf16 (tolerance) and float32 (the agreement check), then scoring throughput.

The DPO sections time ``--steps`` optimizer steps after ``--warmup`` steps (from the end of
the last warm-up step to the end of the last step, ``torch.cuda.synchronize`` at both ends)
and report steps/s and ``torch.cuda.max_memory_allocated`` over trainer construction
(reference precompute included) and training. ``--budget`` bounds the whole run: each
section gets what is left minus ``--reserve`` seconds for every later section, and one
that runs out is stopped and reported as timed out. At the end one table with every
number is printed and, with ``--out``, written as JSON.

Inputs: the GPU machine has no BBQ, so they are exported beforehand, as for
``bench/eval_gpu.py``: ``items.jsonl`` and ``tokenizer/`` (that script's export) plus
``pairs.parquet``, real preference pairs from BBQ's gender items as
``bench/align_throughput.py`` builds them (seed 0; prompts about 57 SmolLM2 tokens on
average, at most about 90, answers 2-4 tokens), so no synthetic rows are needed. The
SmolLM2 tokenizer is used with Qwen's larger vocabulary, as in ``bench/eval_gpu.py``.

That machine has torch, transformers, peft, accelerate and datasets but not trl, so TRL
travels as a wheel in ``.whl/`` (pure Python). Both ``.whl/`` and ``gpu-inputs/`` are ignored
by git: whatever copies the working tree to the GPU machine must be told to take them. Here,
from the repository root::

    python bench/gpu_check.py --export gpu-inputs --bbq-dir <bbq> --items 5000
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
        --platform manylinux2014_x86_64 -d .whl trl==1.16.0

(``trl==`` the installed version; its wheel is ``py3-none-any``, which these platform options
accept). There, from the repository root with ``gpu-inputs/`` and ``.whl/`` beside it::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
        PYTHONPATH=/tmp/site:src python bench/gpu_check.py --inputs gpu-inputs \\
        --budget 540 --out "$OUT/gpu_check.json"

``--config tiny --device cpu`` runs the same code on a 2-layer model in float32 (a smoke
test; ``tests/test_gpu_check.py`` runs it on the test fixtures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(BENCH), str(ROOT / "src")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SECTIONS: tuple[str, ...] = ("ours", "trl-tuned", "eval")
PRESET = "qwen-2.5-7b"
RESULT = "GPU_CHECK_RESULT "
"""Prefix of the line a section's process prints its result on."""
PAIRS_FILE = "pairs.parquet"


# ---- inputs ---------------------------------------------------------------------------


def write_pairs(out: Path, pairs: Any, n: int | None = None) -> int:
    """Write the ``prompt``/``chosen``/``rejected`` columns of ``pairs`` (a DataFrame) to
    ``out/pairs.parquet``, the first ``n`` rows (all with None)."""
    df = pairs[["prompt", "chosen", "rejected"]].reset_index(drop=True)
    if n is not None:
        df = df.head(n)
    out.mkdir(parents=True, exist_ok=True)
    df.to_parquet(out / PAIRS_FILE, index=False)
    return len(df)


def export(out: Path, bbq_dir: str, n_items: int, n_pairs: int, seed: int) -> None:
    """``bench/eval_gpu.py``'s inputs (items, tokenizer) plus the first ``n_pairs`` training
    pairs ``bench/align_throughput.py`` builds (BBQ gender items, seeded)."""
    import pandas as pd

    import align_throughput
    import eval_gpu

    eval_gpu.export(out, bbq_dir, n_items, seed)
    with tempfile.TemporaryDirectory() as tmp:
        align_throughput.make_pairs(bbq_dir, Path(tmp) / "pairs", seed)
        n = write_pairs(out, pd.read_parquet(Path(tmp) / "pairs" / "train.parquet"), n_pairs)
    print(f"wrote {n} preference pairs to {out / PAIRS_FILE}")


# ---- the sections (each runs in its own process) --------------------------------------


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clock(sync: Any) -> Any:
    """A ``TrainerCallback`` recording when training starts and each optimizer step ends
    (``ends``), ``sync()`` (``torch.cuda.synchronize``) before each reading."""
    from transformers import TrainerCallback

    class _Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.ends = [time.perf_counter()]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.ends.append(time.perf_counter())

    return _Clock()


def dpo_section(
    arm: str, inputs: Path, *, config: str, device: str, steps: int, warmup: int, batch: int
) -> dict[str, Any]:
    """One DPO arm (``ours`` or ``trl-tuned``): steps/s after warm-up and peak memory."""
    import pandas as pd
    import torch
    from transformers import AutoTokenizer, set_seed

    import align_throughput
    import eval_gpu
    from spillover.align import AlignConfig
    from spillover.align.sharding import missing_adapter_files
    from spillover.align.trainer import (
        build_trainer,
        longest_pair_tokens,
        lora_config,
        to_trl_dataset,
        used_rows,
    )

    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(dev)

    total = warmup + steps
    df = pd.read_parquet(inputs / PAIRS_FILE)
    tok = AutoTokenizer.from_pretrained(str(inputs / "tokenizer"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # the preset at batch `batch`, one accumulation step, no checkpointing, no checkpoints
    overrides: dict[str, Any] = {
        "grad_accum": 1,
        "gradient_checkpointing": False,
        "bf16": on_gpu,
        "save_strategy": "no",
    }
    out: dict[str, Any] = {"arm": arm, "config": config, "device": str(dev), "dtype": str(dtype)}
    if on_gpu:
        out["device_name"] = torch.cuda.get_device_name(dev)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = AlignConfig.from_preset(
            PRESET,
            Path(tmp) / "adapter",
            max_steps=total,
            batch_size=batch,
            device=device,
            **overrides,
        )
        set_seed(cfg.seed)
        t0 = time.perf_counter()
        model = eval_gpu.build_model(torch, config, dev, dtype)
        out["build_s"] = time.perf_counter() - t0
        out["parameters"] = sum(p.numel() for p in model.parameters())
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        if arm == "ours":
            trainer = build_trainer(model, tok, df, cfg, Path(tmp) / "ckpt", device=device)
        else:
            import trl

            rows = used_rows(to_trl_dataset(df, "dpo"), cfg)
            args, rows = align_throughput.trl_tuned(
                str(Path(tmp) / "trl"),
                df,
                total,
                batch,
                preset=PRESET,
                device=device,
                max_length=longest_pair_tokens(rows, tok),
                **overrides,
            )
            trainer = trl.DPOTrainer(
                model=model,
                args=args,
                train_dataset=rows,
                processing_class=tok,
                peft_config=lora_config(cfg),
            )
        sync()
        out["setup_s"] = time.perf_counter() - t0  # tokenisation, reference precompute
        clock = _clock(sync)
        trainer.add_callback(clock)
        trainer.train()
        ends = clock.ends
        out["steps"] = int(trainer.state.global_step)
        out["warmup_steps"] = warmup
        if len(ends) > warmup + 1:
            timed = len(ends) - 1 - warmup
            out["timed_steps"] = timed
            out["steps_per_s"] = timed / (ends[-1] - ends[warmup])
            out["first_step_s"] = ends[1] - ends[0]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out["last_loss"] = float(losses[-1]) if losses else None
        out["max_length"] = trainer.args.max_length
        out["tokens_per_pair"] = _mean_pair_tokens(trainer.train_dataset)
        if on_gpu:
            out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        if arm == "ours":
            saved = Path(tmp) / "saved"
            trainer.save_model(str(saved))
            missing = missing_adapter_files(saved)
            out["adapter_saved"] = not missing
            if missing:
                out["error"] = f"save_model wrote no {', '.join(missing)}"
    out["trainer"] = type(trainer).__name__
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _mean_pair_tokens(dataset: Any) -> float | None:
    """Mean prompt + chosen + rejected tokens of a processed DPO dataset."""
    names = set(dataset.column_names)
    if not {"prompt_ids", "chosen_ids", "rejected_ids"} <= names:
        return None
    rows = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    total = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    return total / max(len(rows), 1)


def eval_section(
    inputs: Path, *, config: str, device: str, items: int, check_items: int
) -> dict[str, Any]:
    """``bench/eval_gpu.py``'s check and scoring throughput."""
    import eval_gpu

    out = eval_gpu.measure(
        inputs, items=items, config=config, device=device, check_items=check_items
    )
    if not out["check_passed"]:
        out["error"] = (
            f"packed scores differ from the per-answer forwards by {out['max_packed_vs_naive']:.3g} "
            f"nats (tolerance {out['tolerance']})"
        )
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def worker(a: argparse.Namespace) -> None:
    """Run one section in this process and print its result line (errors included)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()
    try:
        if a.worker == "eval":
            res = eval_section(
                a.inputs,
                config=a.config,
                device=a.device,
                items=a.items,
                check_items=a.check_items,
            )
        else:
            res = dpo_section(
                a.worker,
                a.inputs,
                config=a.config,
                device=a.device,
                steps=a.steps,
                warmup=a.warmup,
                batch=a.batch_size,
            )
    except BaseException as exc:  # reported in the table; the other sections still run
        traceback.print_exc()
        res = {"error": _one_line(exc)}
    res["seconds"] = time.perf_counter() - t0
    print(RESULT + json.dumps(res, default=str), flush=True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:400]


# ---- the driver ------------------------------------------------------------------------


def run_section(name: str, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``--worker name`` in a child process (its output echoed, prefixed) within ``timeout``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--worker", name, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not line.startswith(RESULT):
                print(f"[{name}] {line}", end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    found = [x for x in lines if x.startswith(RESULT)]
    if found:
        res = dict(json.loads(found[-1][len(RESULT) :]))
    elif timed_out:
        res = {"error": f"timed out after {timeout:.0f} s (the --budget share of this section)"}
    else:
        last = next((x for x in reversed(lines) if x.strip()), "no output")
        res = {"error": f"exit code {rc}: {last.strip()[:300]}"}
    res["wall_s"] = seconds
    return res


def section_args(a: argparse.Namespace) -> list[str]:
    return [
        "--inputs", str(a.inputs), "--config", a.config, "--device", a.device,
        "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch-size", str(a.batch_size),
        "--items", str(a.items), "--check-items", str(a.check_items),
    ]  # fmt: skip


ROWS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "dpo": (
        ("steps_per_s", "steps/s (after warm-up)", "{:.3f}"),
        ("timed_steps", "steps timed", "{}"),
        ("first_step_s", "first step s", "{:.2f}"),
        ("peak_gpu_gib", "peak GPU memory GiB", "{:.2f}"),
        ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
        ("setup_s", "trainer setup s (incl. ref precompute)", "{:.1f}"),
        ("build_s", "model build s", "{:.1f}"),
        ("max_length", "max_length", "{}"),
        ("tokens_per_pair", "tokens per pair (prompt+chosen+rejected)", "{:.1f}"),
        ("last_loss", "last loss", "{:.4f}"),
        ("adapter_saved", "adapter saved and complete", "{}"),
        ("wall_s", "section wall s", "{:.1f}"),
    ),
    "eval": (
        ("items_per_s", "items/s", "{:.1f}"),
        ("forward_tokens_per_s", "tokens/s through the model", "{:,.0f}"),
        ("utilisation", "share of measured matmul rate", "{:.1%}"),
        ("matmul_peak_tflops", "measured matmul TFLOP/s", "{:.1f}"),
        ("projected_full_bbq_s", "projected full BBQ s", "{:.0f}"),
        ("check_passed", "packed = per-answer (tolerance)", "{}"),
        ("max_packed_vs_naive", "max |packed - naive| nats", "{:.3g}"),
        ("max_packed_vs_fp32", "max |packed - float32| nats", "{:.3g}"),
        ("fp32_agreement", "decisions equal to float32 (clear margin)", "{}"),
        ("peak_gpu_gib", "peak GPU memory GiB", "{:.2f}"),
        ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
        ("wall_s", "section wall s", "{:.1f}"),
    ),
}


def table(report: dict[str, Any]) -> str:
    """The one table of every number (``section  metric  value``)."""
    rows: list[tuple[str, str, str]] = []
    for name in report["sections_run"]:
        res = dict(report["sections"][name])
        if "fp32_decisions_clear" in res:
            res["fp32_agreement"] = f"{res['fp32_decisions_equal']}/{res['fp32_decisions_clear']}"
        if res.get("error"):
            rows.append((name, "ERROR", str(res["error"])))
        for key, label, fmt in ROWS["eval" if name == "eval" else "dpo"]:
            value = res.get(key)
            if value is None:
                continue
            rows.append((name, label, fmt.format(value) if not isinstance(value, str) else value))
    for key, label in (
        ("speedup", "ours / trl-tuned steps/s"),
        ("memory", "ours / trl-tuned peak"),
    ):
        if key in report.get("compare", {}):
            rows.append(("compare", label, f"{report['compare'][key]:.2f}x"))
    width = [max(len(r[i]) for r in [("section", "metric", "value"), *rows]) for i in range(2)]
    head = f"{'section':<{width[0]}}  {'metric':<{width[1]}}  value"
    out = [report["title"], head, "-" * max(len(head), 60)]
    out += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
    return "\n".join(out)


def compare(sections: dict[str, Any]) -> dict[str, float]:
    ours, trl = sections.get("ours", {}), sections.get("trl-tuned", {})
    out: dict[str, float] = {}
    if ours.get("steps_per_s") and trl.get("steps_per_s"):
        out["speedup"] = ours["steps_per_s"] / trl["steps_per_s"]
    key = "peak_gpu_gib" if ours.get("peak_gpu_gib") else "peak_rss_mib"
    if ours.get(key) and trl.get(key):
        out["memory"] = ours[key] / trl[key]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=None, help="write the inputs here and stop")
    ap.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    ap.add_argument("--pairs", type=int, default=512, help="preference pairs exported")
    ap.add_argument("--inputs", type=Path, default=Path("gpu-inputs"))
    ap.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    ap.add_argument("--config", choices=("qwen2.5-7b", "tiny"), default="qwen2.5-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=8, help="timed DPO steps after warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="DPO steps before timing")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per DPO step")
    ap.add_argument("--items", type=int, default=5000, help="items scored (eval)")
    ap.add_argument("--check-items", type=int, default=64, help="items checked (eval)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run")
    ap.add_argument(
        "--reserve", type=float, default=90.0, help="seconds kept for each later section"
    )
    ap.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    if a.export is not None:
        if not a.bbq_dir:
            raise SystemExit("give --bbq-dir or set SPILLOVER_BBQ_DIR")
        export(a.export, a.bbq_dir, a.items, a.pairs, a.seed)
        return
    chosen = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {', '.join(unknown)}; expected {', '.join(SECTIONS)}")

    start = time.perf_counter()
    sections: dict[str, Any] = {}
    argv = section_args(a)
    for i, name in enumerate(chosen):
        left = a.budget - (time.perf_counter() - start)
        share = left - a.reserve * (len(chosen) - i - 1)
        if left < 5:
            sections[name] = {"error": "not run: the --budget was spent"}
            continue
        print(f"== {name} (up to {max(share, min(left, a.reserve)):.0f} s)", flush=True)
        sections[name] = run_section(name, argv, max(share, min(left, a.reserve)))
    shape = "Qwen2.5-7B shape" if a.config == "qwen2.5-7b" else "tiny 2-layer shape"
    device = next((s["device_name"] for s in sections.values() if s.get("device_name")), a.device)
    report: dict[str, Any] = {
        "title": (
            f"GPU check: {shape}, random weights, {device}; DPO batch {a.batch_size}, "
            f"{a.steps} steps timed after {a.warmup}; eval {a.items} items"
        ),
        "config": a.config,
        "device": device,
        "arguments": {k: v for k, v in vars(a).items() if k not in ("worker", "export")},
        "versions": _versions(),
        "sections_run": chosen,
        "sections": sections,
        "compare": compare(sections),
        "elapsed_s": time.perf_counter() - start,
    }
    print()
    print(table(report))
    print(f"total {report['elapsed_s']:.0f} s of a {a.budget:.0f} s budget")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"results -> {a.out}")
    failed = [n for n in chosen if sections[n].get("error")]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
