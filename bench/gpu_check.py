"""One prepared GPU check: correctness first (log-probabilities against TRL's, three steps
through ``train_adapter`` with a resume, one-process FSDP launches), then LoRA DPO training
steps (ours, TRL tuned) and scoring at 7B shape.

The versions of every library involved are printed first. The timed sections run on a
Qwen2.5-7B-shaped model with random bfloat16 weights built directly on the GPU from the
published configuration (``bench/eval_gpu.py``'s ``QWEN25_7B`` and ``build_model``; speed
and memory do not depend on weight values, and nothing is downloaded). The sections that
go through the model loader (``train``, ``fsdp``) save a small model of the same family to
a folder first (``TINY``: what they check is the code path, not speed). Sections, each in
its own Python process (a clean peak-memory reading, and a crash or CUDA out-of-memory in
one is reported in the table while the others still run), in this order:

``logprobs``
    Step 1 of our trainer and of ``trl.DPOTrainer`` (the ``ours`` and ``trl-tuned`` arms
    below, one step each, one after the other on the same weights and the same first batch):
    their logged ``logps/chosen`` and ``logps/rejected`` must agree (at step 1 the LoRA
    update is zero, so both are the base model's log-probabilities; ours packs the shared
    prompt, TRL does not), not only the loss (``ln 2`` for both at step 1).
``train``
    ``train_adapter`` itself, three steps with the preset's settings (gradient
    checkpointing, pair packing, reference precompute, the preset's dtype and bf16),
    checkpointing every step: interrupted after step 2, run again (it must resume from
    step 1's checkpoint and end at step 3), and against an uninterrupted run of the same
    three steps (the adapters' largest difference is reported).
``fsdp``
    ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 -m
    spillover align`` (the shipped FSDP config: first-process loading, full-state saving),
    then again with ``--adapter`` from the first (TRL adds its frozen reference adapter).
    Both must exit 0 and leave a complete adapter.
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
    ``bench/eval_gpu.py``'s ``measure`` at the row sizes ``spillover eval`` uses (its
    default ``batch_tokens``, the scorer's default row width; ``--batch-tokens`` and
    ``--max-row-tokens`` change them): packed bf16 scores against one forward per answer in
    bf16 (tolerance) and float32 (the agreement check), then scoring throughput.

The DPO sections time ``--steps`` optimizer steps after ``--warmup`` steps (from the end of
the last warm-up step to the end of the last step, ``torch.cuda.synchronize`` at both ends)
and report steps/s and ``torch.cuda.max_memory_allocated`` over trainer construction
(reference precompute included) and training. ``--budget`` (default 420 s, about seven
minutes) bounds the whole run: each section gets what is left minus ``--reserve`` seconds
for every later section, and one that runs out is stopped and reported as timed out. At the
end one table with every number is printed and, with ``--out``, written as JSON.

Inputs: the GPU machine has no BBQ, so they are exported beforehand, as for
``bench/eval_gpu.py``: ``items.jsonl`` and ``tokenizer/`` (that script's export) plus
``pairs.parquet``, real preference pairs from BBQ's gender items as
``bench/align_throughput.py`` builds them (seed 0; prompts about 57 SmolLM2 tokens on
average, at most about 90, answers 2-4 tokens), so no synthetic rows are needed. The
SmolLM2 tokenizer is used with Qwen's larger vocabulary, as in ``bench/eval_gpu.py``.

Libraries: the GPU machine's own transformers, accelerate, peft, datasets (and no trl) may
differ from the ones tested here, so the pure-Python releases installed here travel as
wheels in ``.whl/`` (with huggingface_hub, and the small abi3 wheels of tokenizers and
safetensors that transformers pins; about 16 MB in all, under the 64 MiB a run carries).
``--download-wheels .whl`` runs ``pip download`` for exactly the installed versions (no
dependencies, binary wheels for CPython 3.12 on manylinux x86-64) and checks the folder's
size. Both ``.whl/`` and ``gpu-inputs/`` are ignored by git: whatever copies the working
tree to the GPU machine must be told to take them. Here, from the repository root::

    python bench/gpu_check.py --export gpu-inputs --bbq-dir <bbq> --items 5000
    python bench/gpu_check.py --download-wheels .whl

There, from the repository root with ``gpu-inputs/`` and ``.whl/`` beside it::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site:src python bench/gpu_check.py --inputs gpu-inputs \
        --out "$OUT/gpu_check.json"

``--cpu-smoke`` runs every section on a 2-layer model in float32 on the CPU, from the test
fixtures when ``--inputs`` does not exist (a check of the script itself, about a minute;
``tests/test_gpu_check.py`` runs it).
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

SECTIONS: tuple[str, ...] = ("logprobs", "train", "fsdp", "ours", "trl-tuned", "eval")
"""In run order: the correctness checks before the timings."""
LIBRARIES: tuple[str, ...] = (
    "torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub",
    "tokenizers", "safetensors", "deepspeed", "bitsandbytes", "vllm",
)  # fmt: skip
"""Printed first: what the results were measured with."""
WHEELS: tuple[str, ...] = (
    "transformers", "accelerate", "peft", "datasets", "trl", "huggingface_hub", "tokenizers",
    "safetensors",
)  # fmt: skip
"""Carried to the GPU machine as wheels, pinned to the versions installed here."""
WHEELS_MAX_BYTES = 64 * 2**20
"""What one run carries to the GPU machine at most."""
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
    for name in LIBRARIES:
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
        first = next((h for h in trainer.state.log_history if "logps/chosen" in h), None)
        if first is not None:
            out["step1"] = {k: float(first[k]) for k in STEP1_KEYS if k in first}
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


STEP1_KEYS: tuple[str, ...] = ("loss", "logps/chosen", "logps/rejected", "rewards/margins")
"""What step 1 logs, compared between our trainer and TRL's (``logprobs``)."""


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def logprob_section(inputs: Path, *, config: str, device: str, batch: int) -> dict[str, Any]:
    """Step 1 of our trainer and of TRL's on the same weights and batch: the logged
    log-probabilities of the chosen and rejected answers must agree (float32: 1e-3 nats;
    bf16: 1 % of the value, at least 0.05 nats)."""
    out: dict[str, Any] = {}
    for arm in ("ours", "trl-tuned"):
        res = dpo_section(arm, inputs, config=config, device=device, steps=1, warmup=0, batch=batch)
        _free_gpu()
        out[arm] = res.get("step1", {})
        out.setdefault("device_name", res.get("device_name"))
        out["dtype"] = res.get("dtype")
    worst = 0.0
    for key in ("logps/chosen", "logps/rejected"):
        a, b = out["ours"].get(key), out["trl-tuned"].get(key)
        if a is None or b is None:
            out["error"] = f"step 1 logged no {key} (ours {a}, TRL {b})"
            return out
        tol = 1e-3 if "float32" in str(out["dtype"]) else max(0.05, 0.01 * abs(b))
        diff = abs(a - b)
        worst = max(worst, diff / tol)
        out[f"diff {key}"] = diff
        if diff > tol:
            out["error"] = f"step 1 {key}: ours {a:.4f}, TRL {b:.4f} (tolerance {tol:.3g})"
    out["logps_agree"] = "error" not in out
    out["worst_share_of_tolerance"] = worst
    return out


def _small_model(folder: Path, inputs: Path) -> Path:
    """A TINY model of the Qwen2 family (random float32 weights) and the inputs' tokenizer,
    saved where the model loader reads them."""
    import torch
    from transformers import AutoTokenizer

    import eval_gpu

    model = eval_gpu.build_model(torch, "tiny", torch.device("cpu"), torch.float32)
    model.save_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(inputs / "tokenizer"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(str(folder))
    return folder


def _pairs_folder(folder: Path, inputs: Path, n: int = 32) -> Path:
    """A pairs folder (``train.parquet``, ``split.json``) of the first ``n`` exported pairs."""
    import pandas as pd

    folder.mkdir(parents=True)
    pd.read_parquet(inputs / PAIRS_FILE).head(n).to_parquet(folder / "train.parquet")
    (folder / "split.json").write_text(json.dumps({"heldout_templates": {}}), encoding="utf-8")
    return folder


class _Interrupted(Exception):
    """Raised by the progress callback to stop a training as a crash would."""


def train_section(inputs: Path, *, device: str) -> dict[str, Any]:
    """``train_adapter``: three steps with the preset's settings, interrupted after step 2,
    resumed, and compared with an uninterrupted run."""
    from safetensors.torch import load_file

    from spillover.align import AlignConfig, train_adapter
    from spillover.align.sharding import missing_adapter_files

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _small_model(root / "model", inputs)
        pairs = _pairs_folder(root / "pairs", inputs)

        def cfg(name: str) -> Any:
            return AlignConfig.from_preset(
                str(model), root / name, preset=PRESET, max_steps=3, batch_size=2,
                save_steps=1, eval_strategy="no", device=device,
            )  # fmt: skip

        def stop_after_two(step: int, total: int, logs: Any) -> None:
            if step >= 2 and not logs:
                raise _Interrupted

        resumed = cfg("resumed")
        out["gradient_checkpointing"] = resumed.gradient_checkpointing
        try:
            train_adapter(pairs, resumed, progress=stop_after_two)
            out["error"] = "the interrupted training was not interrupted"
            return out
        except _Interrupted:
            pass
        left = sorted(p.name for p in (root / "resumed.checkpoints").glob("checkpoint-*"))
        out["checkpoints_left"] = ",".join(left)
        ref = train_adapter(pairs, resumed)
        out["resumed_step"] = ref.resumed_step
        out["steps"] = ref.steps
        out["train_loss"] = ref.train_loss
        whole = train_adapter(pairs, cfg("whole"))
        missing = missing_adapter_files(ref.path) + missing_adapter_files(whole.path)
        a = load_file(str(ref.path / "adapter_model.safetensors"))
        b = load_file(str(whole.path / "adapter_model.safetensors"))
        out["resume_vs_whole_max_diff"] = max(
            float((a[k].float() - b[k].float()).abs().max()) for k in a
        )
        recorded = json.loads((ref.path / "align_config.json").read_text(encoding="utf-8"))
        out["recorded_checkpointing"] = recorded["trl_args"].get("gradient_checkpointing")
    problems = []
    if out["resumed_step"] != 1 or out["steps"] != 3:
        problems.append(f"resumed at {out['resumed_step']}, ended at {out['steps']} (want 1, 3)")
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if not out["gradient_checkpointing"] or not out["recorded_checkpointing"]:
        problems.append("the preset's gradient checkpointing was not used")
    if problems:
        out["error"] = "; ".join(problems)
    return out


def fsdp_section(inputs: Path, *, device: str, timeout: float = 240.0) -> dict[str, Any]:
    """Two one-process launches of ``spillover align`` with the shipped FSDP config: a new
    adapter, then one continuing from it (``--adapter``)."""
    from spillover.align.sharding import missing_adapter_files

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = _small_model(root / "model", inputs)
        pairs = _pairs_folder(root / "pairs", inputs)
        launch = [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"),
            "--num_processes", "1",
        ]  # fmt: skip
        if device == "cpu":  # accelerate runs an FSDP config with --cpu as plain DDP
            launch += ["--cpu", "--mixed_precision", "no"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
        first = root / "first"
        for name, extra in (("new", []), ("adapter", ["--adapter", str(first)])):
            dest = first if name == "new" else root / "second"
            cmd = [
                *launch, "-m", "spillover", "align", "--model", str(model), "--pairs",
                str(pairs), "--preset", PRESET, "--max-steps", "2", "--batch-size", "2",
                "--eval-strategy", "no", "--save-strategy", "no", *extra, "--out", str(dest),
            ]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
            out[f"{name}_s"] = time.perf_counter() - t0
            out[f"{name}_rc"] = proc.returncode
            complete = proc.returncode == 0 and not missing_adapter_files(dest)
            out[f"{name}_adapter_saved"] = complete
            if not complete:
                tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
                out["error"] = (
                    f"{name}: exit {proc.returncode}: {(tail or ['no output'])[-1][:300]}"
                )
                print(proc.stderr[-4000:], flush=True)
                return out
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
    inputs: Path,
    *,
    config: str,
    device: str,
    items: int,
    check_items: int,
    batch_tokens: int | None = None,
    max_row_tokens: int | None = None,
) -> dict[str, Any]:
    """``bench/eval_gpu.py``'s check and scoring throughput, at ``spillover eval``'s row
    sizes unless given: ``EvalConfig``'s ``batch_tokens`` and the scorer's default row width
    (``max_row_tokens`` None)."""
    import eval_gpu
    from spillover.evaluate import EvalConfig

    tokens = batch_tokens if batch_tokens is not None else EvalConfig().batch_tokens
    out = eval_gpu.measure(
        inputs,
        items=items,
        config=config,
        device=device,
        check_items=check_items,
        batch_tokens=tokens,
        max_row_tokens=max_row_tokens,
    )
    out["batch_tokens"] = tokens
    out["max_row_tokens"] = max_row_tokens if max_row_tokens is not None else "scorer default"
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
                batch_tokens=a.batch_tokens,
                max_row_tokens=a.max_row_tokens,
            )
        elif a.worker == "logprobs":
            res = logprob_section(a.inputs, config=a.config, device=a.device, batch=a.batch_size)
        elif a.worker == "train":
            res = train_section(a.inputs, device=a.device)
        elif a.worker == "fsdp":
            res = fsdp_section(a.inputs, device=a.device)
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
        *(["--batch-tokens", str(a.batch_tokens)] if a.batch_tokens else []),
        *(["--max-row-tokens", str(a.max_row_tokens)] if a.max_row_tokens else []),
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
    "logprobs": (
        ("logps_agree", "step-1 logps ours = TRL's (tolerance)", "{}"),
        ("diff logps/chosen", "|ours - TRL| logps/chosen", "{:.3g}"),
        ("diff logps/rejected", "|ours - TRL| logps/rejected", "{:.3g}"),
        ("worst_share_of_tolerance", "worst difference / tolerance", "{:.2f}"),
        ("wall_s", "section wall s", "{:.1f}"),
    ),
    "train": (
        ("resumed_step", "resumed from step", "{}"),
        ("steps", "steps after resuming", "{}"),
        ("recorded_checkpointing", "gradient checkpointing (preset)", "{}"),
        ("resume_vs_whole_max_diff", "max |resumed - uninterrupted| adapter", "{:.3g}"),
        ("train_loss", "last loss", "{:.4f}"),
        ("wall_s", "section wall s", "{:.1f}"),
    ),
    "fsdp": (
        ("new_adapter_saved", "FSDP launch: adapter saved", "{}"),
        ("new_s", "FSDP launch s", "{:.1f}"),
        ("adapter_adapter_saved", "FSDP launch --adapter: adapter saved", "{}"),
        ("adapter_s", "FSDP launch --adapter s", "{:.1f}"),
        ("wall_s", "section wall s", "{:.1f}"),
    ),
    "eval": (
        ("batch_tokens", "batch_tokens (spillover eval's)", "{}"),
        ("max_row_tokens", "max_row_tokens", "{}"),
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
        for key, label, fmt in ROWS.get(name, ROWS["dpo"]):
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


def pinned_wheels() -> list[str]:
    """``name==version`` of every :data:`WHEELS` library installed here."""
    from importlib import metadata

    return [f"{n}=={metadata.version(n)}" for n in WHEELS]


def download_wheels(folder: Path) -> None:
    """``pip download`` the pinned wheels into ``folder`` (no dependencies; CPython 3.12,
    manylinux x86-64 for the two abi3 ones) and check that they fit what a run carries."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--python-version", "3.12", "--implementation", "cp",
        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
        "--platform", "manylinux2014_x86_64", "-d", str(folder), *pinned_wheels(),
    ]  # fmt: skip
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    size = sum(p.stat().st_size for p in folder.glob("*.whl"))
    print(f"{folder}: {size / 2**20:.1f} MiB of wheels")
    if size > WHEELS_MAX_BYTES:
        raise SystemExit(f"{folder}: {size / 2**20:.1f} MiB, more than a run carries (64 MiB)")


def smoke_inputs(folder: Path) -> Path:
    """Inputs from the test fixtures (the mini BBQ, a small trained tokenizer) for
    ``--cpu-smoke`` where no exported inputs exist."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pandas as pd

    from spillover.align import PrefsConfig, build_pairs
    from spillover.data import load_bbq
    from tiny_models import make_tokenizer

    data = load_bbq(ROOT / "tests" / "fixtures" / "bbq_mini", allow_unverified=True, fetch=False)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w", encoding="utf-8") as fh:
        for it in data.items[:16]:
            rec = {"context": it.context, "question": it.question, "answers": list(it.answers)}
            fh.write(json.dumps(rec) + "\n")
    make_tokenizer().save_pretrained(folder / "tokenizer")
    pairs = build_pairs(data.items, PrefsConfig(targets=("gender",), seed=0))
    write_pairs(folder, pd.DataFrame([p.to_row() for p in pairs.train]))
    return folder


SMOKE: dict[str, Any] = {
    "config": "tiny", "device": "cpu", "steps": 2, "warmup": 1, "batch_size": 2, "items": 16,
    "check_items": 4,
}  # fmt: skip
"""What ``--cpu-smoke`` sets."""


def print_versions() -> dict[str, str | None]:
    """The libraries' versions (and the GPU), printed before anything runs."""
    versions = _versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v), flush=True)
    missing = [k for k, v in versions.items() if v is None]
    if missing:
        print(f"not installed: {', '.join(missing)}", flush=True)
    return versions


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
    ap.add_argument("--batch-tokens", type=int, default=None, help="eval; default: the CLI's")
    ap.add_argument("--max-row-tokens", type=int, default=None, help="eval; default: the CLI's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run")
    ap.add_argument(
        "--reserve", type=float, default=45.0, help="seconds kept for each later section"
    )
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="every section on a 2-layer model on the CPU"
    )
    ap.add_argument(
        "--download-wheels", type=Path, default=None, help="pip download the pinned wheels"
    )
    ap.add_argument("--worker", choices=SECTIONS, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cpu_smoke:
        for key, value in SMOKE.items():
            setattr(a, key, value)
    if a.worker:
        worker(a)
        return
    if a.download_wheels is not None:
        download_wheels(a.download_wheels)
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

    versions = print_versions()
    start = time.perf_counter()
    smoke_tmp = None
    if a.cpu_smoke and not a.inputs.exists():
        smoke_tmp = tempfile.TemporaryDirectory()
        a.inputs = smoke_inputs(Path(smoke_tmp.name) / "inputs")
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
        "versions": versions,
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
    if smoke_tmp is not None:
        smoke_tmp.cleanup()
    failed = [n for n in chosen if sections[n].get("error")]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
