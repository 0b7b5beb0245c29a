"""The ``spillover eval`` command: score BBQ items with a model, write predictions.

Registered by the main CLI as ``app.command("eval")(eval_command)``. Only
:class:`~spillover.errors.SpilloverError` is caught (one red line on stderr,
exit code 1); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from ._cli_common import (
    AllowUnverifiedOption,
    BBQDirOption,
    CacheDirOption,
    console,
    err_console,
    handle_errors,
    warn,
)
from .errors import ConfigError, ModelError

_out = console
_err = err_console


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    return parts or None


@handle_errors
def eval_command(
    model: Annotated[
        str, typer.Option("--model", help="Model alias (e.g. smollm2-135m), hub id or folder.")
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Predictions Parquet file to write.", dir_okay=False)
    ],
    adapter: Annotated[
        Path | None,
        typer.Option("--adapter", help="PEFT LoRA adapter folder to apply (not merged)."),
    ] = None,
    bbq_dir: BBQDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    cache_dir: CacheDirOption = None,
    categories: Annotated[
        str | None,
        typer.Option("--categories", help="Comma-separated categories (aliases allowed)."),
    ] = None,
    contexts: Annotated[
        str | None, typer.Option("--contexts", help="Comma-separated: ambig, disambig.")
    ] = None,
    per_stratum: Annotated[
        int | None,
        typer.Option(
            "--per-stratum", help="Seeded sample of N items per category x context.", min=1
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --per-stratum sample.")] = 0,
    items: Annotated[
        Path | None,
        typer.Option("--items", help="CSV/JSONL list of category,example_id to score."),
    ] = None,
    all_items: Annotated[
        bool, typer.Option("--all", help="Score every item (after --categories/--contexts).")
    ] = False,
    prompt_format: Annotated[
        str, typer.Option("--prompt-format", help="lm-eval, letters or letters-chat.")
    ] = "lm-eval",
    permutations: Annotated[
        str, typer.Option("--permutations", help="Answer orders: none, cyclic (3) or all (6).")
    ] = "none",
    length_norm: Annotated[
        str,
        typer.Option(
            "--length-norm",
            help="Pick the prediction by: none (summed log-prob), token (mean per token), "
            "char (per character, lm-eval acc_norm) or byte (per UTF-8 byte).",
        ),
    ] = "none",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="auto (bf16-verified for float32 weights where bf16 is fast, else model), "
            "model (the weights' dtype), or bf16-verified (bf16 autocast; close calls rescored "
            "in full precision, so predictions match full precision).",
        ),
    ] = "auto",
    verify_margin: Annotated[
        float,
        typer.Option(
            "--verify-margin",
            help="bf16-verified: rescore in full precision every item whose top-two margin "
            "is below this (nats for --length-norm none).",
            min=0.0,
        ),
    ] = 0.3,
    batch_tokens: Annotated[
        int, typer.Option("--batch-tokens", help="Token budget of one forward pass.", min=64)
    ] = 4096,
    chunk_items: Annotated[
        int,
        typer.Option("--chunk-items", help="Items per resumable shard.", min=1),
    ] = 256,
    device: Annotated[
        str | None, typer.Option("--device", help="cpu, cuda, cuda:N (default: auto).")
    ] = None,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16."),
    ] = "auto",
    limit: Annotated[
        int | None,
        typer.Option("--limit", help="Score only the first N selected items.", min=1),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="hf (transformers, packed scoring) or vllm (CUDA; pip install 'spillover[vllm]').",
        ),
    ] = "hf",
    tensor_parallel_size: Annotated[
        int,
        typer.Option("--tensor-parallel-size", help="GPUs per model (vllm backend).", min=1),
    ] = 1,
) -> None:
    """Score BBQ items with a causal LM and write per-item predictions (Parquet).

    Finished chunks are kept in <out>.shards/ while the run goes: rerunning the
    same command after an interruption resumes where it stopped.
    """
    _run(
        model=model,
        out=out,
        adapter=adapter,
        bbq_dir=bbq_dir,
        allow_unverified=allow_unverified,
        cache_dir=cache_dir,
        categories=categories,
        contexts=contexts,
        per_stratum=per_stratum,
        seed=seed,
        items=items,
        all_items=all_items,
        prompt_format=prompt_format,
        permutations=permutations,
        length_norm=length_norm,
        precision=precision,
        verify_margin=verify_margin,
        batch_tokens=batch_tokens,
        chunk_items=chunk_items,
        device=device,
        dtype=dtype,
        limit=limit,
        backend=backend,
        tensor_parallel_size=tensor_parallel_size,
    )


def _run(
    *,
    model: str,
    out: Path,
    adapter: Path | None,
    bbq_dir: Path | None,
    allow_unverified: bool,
    cache_dir: Path | None,
    categories: str | None,
    contexts: str | None,
    per_stratum: int | None,
    seed: int,
    items: Path | None,
    all_items: bool,
    prompt_format: str,
    permutations: str,
    length_norm: str,
    precision: str,
    batch_tokens: int,
    verify_margin: float = 0.3,
    chunk_items: int,
    device: str | None,
    dtype: str,
    limit: int | None,
    backend: str = "hf",
    tensor_parallel_size: int = 1,
) -> None:
    from .data import load_bbq, read_item_list, select_items
    from .evaluate import (
        BACKENDS,
        EvalConfig,
        evaluate_model,
        load_for_eval,
        read_metadata,
        summarize_predictions,
    )
    from .models import resolve_model
    from .prompts import render

    chosen = [
        name
        for name, on in (
            ("--per-stratum", per_stratum is not None),
            ("--items", items is not None),
            ("--all", all_items),
        )
        if on
    ]
    if len(chosen) != 1:
        what = "none was given" if not chosen else f"got {' and '.join(chosen)}"
        raise ConfigError(f"choose exactly one of --per-stratum, --items or --all ({what})")
    if backend not in BACKENDS:
        raise ConfigError(f"--backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend == "vllm" and precision == "bf16-verified":
        raise ConfigError(
            "--precision bf16-verified needs --backend hf; vLLM computes in the weights' dtype"
        )
    if backend == "vllm" and device is not None and not device.startswith(("cuda", "auto")):
        raise ConfigError(f"--backend vllm runs on CUDA GPUs, not --device {device}")
    if backend != "vllm" and tensor_parallel_size != 1:
        raise ConfigError("--tensor-parallel-size needs --backend vllm")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ModelError(f"{adapter}: not a PEFT adapter folder (no adapter_config.json)")
    cfg = EvalConfig(
        prompt_format=prompt_format,
        permutations=permutations,
        batch_tokens=batch_tokens,
        length_norm=length_norm,
        precision=precision,
        verify_margin=verify_margin,
        chunk_items=chunk_items,
        seed=seed,
    ).validate()
    keys = read_item_list(items) if items is not None else None
    resolve_model(model)  # a missing folder fails before BBQ is read

    cats = _split(categories)
    if cats is None and keys is not None:  # read only the listed items' categories
        cats = sorted({c for c, _ in keys})
    data = load_bbq(
        bbq_dir, cache_dir=cache_dir, categories=cats, allow_unverified=allow_unverified
    )
    for w in data.warnings:
        warn(w)
    selected = select_items(
        data.items,
        contexts=_split(contexts),
        keys=keys,
        per_stratum=per_stratum,
        seed=seed,
    )
    from .evaluate import sort_items

    selected = sort_items(selected)
    if limit is not None:
        selected = selected[:limit]
    if not selected:
        raise ConfigError("the selection is empty; check --categories, --contexts and --items")

    import torch
    from accelerate import PartialState

    # one process unless started by `accelerate launch` / torchrun; on machines
    # without CUDA the processes talk over gloo (accelerate's MULTI_CPU)
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    if device is None and state.num_processes > 1:
        device = "cpu" if on_cpu else str(state.device)
    t0 = time.perf_counter()
    if backend == "vllm" and state.num_processes > 1:
        raise ConfigError(
            "--backend vllm runs as one process (spread a model over GPUs with "
            "--tensor-parallel-size), not under accelerate launch or torchrun"
        )
    loaded, scorer = load_for_eval(
        model,
        backend=backend,
        adapter=adapter,
        device=device,
        dtype=dtype,
        cache_dir=cache_dir,
        boundary=cfg.boundary,
        tensor_parallel_size=tensor_parallel_size,
    )
    render(selected[0], cfg.prompt_format, tokenizer=loaded.tokenizer)  # chat template check
    t_load = time.perf_counter() - t0
    provenance: dict[str, Any] = {
        "bbq": data.provenance(),
        "selection": {
            "categories": list(data.categories),
            "contexts": _split(contexts),
            "per_stratum": per_stratum,
            "seed": seed,
            "items_file": str(items) if items is not None else None,
            "all": all_items,
            "limit": limit,
        },
    }

    progress = Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_err,
        transient=True,
    )
    task = progress.add_task("scoring", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    t1 = time.perf_counter()
    if state.num_processes > 1:
        from .evaluate import evaluate_distributed, read_predictions

        with progress if state.is_main_process else contextlib.nullcontext():
            evaluate_distributed(
                loaded, selected, cfg, out=out, progress=on_progress, provenance=provenance
            )
        if not state.is_main_process:
            return
        _out.print(
            f"merged the predictions of {state.num_processes} processes into {out} "
            f"({len(read_predictions(out))} rows, {time.perf_counter() - t1:.1f}s)"
        )
        return
    with progress:
        preds = evaluate_model(
            loaded,
            selected,
            cfg,
            out=out,
            progress=on_progress,
            provenance=provenance,
            scorer=scorer,
        )
    t_score = time.perf_counter() - t1

    table = Table(title=f"{len(selected)} items, {loaded.spec.name}, {cfg.prompt_format}")
    cols = ("permutation", "n", "accuracy", "accuracy_ambig", "accuracy_disambig")
    extra = ("unknown_rate", "position_0", "position_1", "position_2")
    for col in (*cols, *extra):
        table.add_column(col, justify="right")
    for row in summarize_predictions(preds):
        table.add_row(*(_fmt(row[c]) for c in (*cols, *extra)))
    _out.print(table)
    stats = read_metadata(out).get("scorer_stats", {})
    if stats.get("boundary_merges") or stats.get("split_requests"):
        _err.print(
            f"[yellow]note:[/] {stats.get('boundary_merges', 0)} answer(s) had a token merging "
            f"across the prompt boundary; {stats.get('split_requests', 0)} item(s) were scored "
            "per answer because their answers did not share the prompt tokens",
            highlight=False,
            soft_wrap=True,
        )
    _out.print(
        f"wrote {len(preds)} predictions to {out} "
        f"(model load {t_load:.1f}s, scoring {t_score:.1f}s, "
        f"{len(preds) / max(t_score, 1e-9):.1f} rows/s)",
        highlight=False,
        soft_wrap=True,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


__all__ = ["eval_command"]
