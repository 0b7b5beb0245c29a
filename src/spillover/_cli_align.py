"""``spillover prefs`` and ``spillover align``: typer command functions.

The main CLI registers them with ``app.command("prefs")(prefs_command)`` and
``app.command("align")(align_command)``. This is the only module of these two
stages that prints; the library reports through logging and callbacks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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
    console,
    err_console,
    handle_errors,
    warn,
)
from .errors import ConfigError

# --------------------------------------------------------------------------- prefs


@handle_errors
def prefs_command(
    target: Annotated[
        list[str],
        typer.Option(
            "--target",
            help="Target attribute (BBQ category or alias, e.g. gender); repeat for several.",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the pairs to.", show_default=False)
    ],
    strategy: Annotated[
        str,
        typer.Option(
            help="stereotype (reject the biased answer) or all-wrong (every wrong answer)."
        ),
    ] = "stereotype",
    contexts: Annotated[
        str, typer.Option(help="Context conditions, comma-separated: ambig, disambig.")
    ] = "ambig,disambig",
    heldout_frac: Annotated[
        float, typer.Option(help="Fraction of each category's templates held out of training.")
    ] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the held-out template draw.")] = 0,
    prompt_format: Annotated[
        str, typer.Option(help="Prompt format: lm-eval, letters or letters-chat.")
    ] = "lm-eval",
    model: Annotated[
        str | None,
        typer.Option(help="Model whose tokenizer renders chat formats (letters-chat only)."),
    ] = None,
    bbq_dir: BBQDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.")
    ] = False,
) -> None:
    """Build preference pairs for target attributes, holding out whole templates."""
    from .data import load_bbq
    from .prefs import PrefsConfig, build_pairs, write_pairs
    from .prompts import check_format

    check_format(prompt_format)
    cfg = PrefsConfig(
        targets=tuple(target),
        strategy=strategy,  # type: ignore[arg-type]
        contexts=(contexts,),
        heldout_frac=heldout_frac,
        seed=seed,
        prompt_format=prompt_format,
    )
    out_path = Path(out).expanduser()
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())) and not overwrite:
        raise ConfigError(f"{out_path}: already exists; choose another --out or pass --overwrite")
    tokenizer = None
    if prompt_format.endswith("-chat"):
        if model is None:
            raise ConfigError(
                f"prompt format {prompt_format!r} renders prompts with a model's chat template; "
                "pass --model (e.g. --model smollm2-135m)"
            )
        from .models import load_tokenizer, resolve_model
        from .prompts import has_chat_template

        tokenizer = load_tokenizer(resolve_model(model))
        if not has_chat_template(tokenizer):
            raise ConfigError(
                f"prompt format {prompt_format!r} needs a model with a chat template; {model!r} "
                "has none (use --prompt-format lm-eval or letters)"
            )
    data = load_bbq(bbq_dir, categories=cfg.targets, allow_unverified=allow_unverified)
    for w in data.warnings:
        warn(w)
    pairs = build_pairs(data.items, cfg, tokenizer=tokenizer, provenance=data.provenance())
    write_pairs(pairs, out_path, overwrite=overwrite)
    table = Table(title=f"Preference pairs -> {out_path}", show_edge=False)
    for col in ("category", "train templates", "held-out templates", "held out"):
        table.add_column(col)
    for cat in cfg.targets:
        held = pairs.heldout_templates.get(cat, ())
        table.add_row(
            cat,
            str(pairs.counts["train_templates"].get(cat, 0)),
            str(len(held)),
            ", ".join(map(str, held)),
        )
    console.print(table)
    console.print(
        f"{pairs.counts['train_pairs']} training pairs, {pairs.counts['heldout_pairs']} held-out "
        f"pairs from {pairs.counts['items']} items ({pairs.counts['skipped_no_target']} skipped: "
        "no known biased answer)",
        highlight=False,
    )


# --------------------------------------------------------------------------- align


@contextmanager
def _training_progress(
    total_hint: int | None,
) -> Iterator[Callable[[int, int, Mapping[str, float]], None]]:
    progress = Progress(
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metrics]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    task = progress.add_task("train", total=total_hint, metrics="")
    started = False

    def update(step: int, total: int, logs: Mapping[str, float]) -> None:
        nonlocal started
        if not started:  # shown once training runs, not while checks may still fail
            progress.start()
            started = True
        fields: dict[str, Any] = {"completed": step, "total": total or None}
        if "loss" in logs:
            parts = [f"loss {logs['loss']:.4f}"]
            if "rewards/accuracies" in logs:
                parts.append(f"acc {logs['rewards/accuracies']:.2f}")
            if "rewards/margins" in logs:
                parts.append(f"margin {logs['rewards/margins']:.3f}")
            fields["metrics"] = "  ".join(parts)
        progress.update(task, **fields)

    try:
        yield update
    finally:
        if started:
            progress.stop()


@handle_errors
def align_command(
    model: Annotated[str, typer.Option(help="Model alias, hub id or folder.", show_default=False)],
    pairs: Annotated[
        Path,
        typer.Option(help="Pairs folder written by `spillover prefs`.", show_default=False),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Folder to write the adapter to.", show_default=False)
    ],
    method: Annotated[
        str, typer.Option(help="Preference method (dpo, ipo, robust, hinge, apo_zero, kto, ...).")
    ] = "dpo",
    preset: Annotated[
        str | None,
        typer.Option(help="Preset of defaults; default: the preset named after --model."),
    ] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank [preset].")] = None,
    lora_alpha: Annotated[int | None, typer.Option(help="LoRA alpha [preset].")] = None,
    lora_dropout: Annotated[float | None, typer.Option(help="LoRA dropout [preset].")] = None,
    target_modules: Annotated[
        str | None, typer.Option(help="Comma-separated LoRA target modules [preset].")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate [preset].")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the pairs.")] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (instead of --epochs).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Pairs per step [preset].")] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Gradient accumulation steps [preset].")
    ] = None,
    beta: Annotated[float | None, typer.Option(help="Loss temperature beta [preset].")] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(help="robust: label flip probability; exo_pair: epsilon.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    max_length: Annotated[
        int | None,
        typer.Option(help="Token limit of prompt+completion; default: the longest pair."),
    ] = None,
    load_in_4bit: Annotated[
        bool, typer.Option("--load-in-4bit", help="QLoRA: 4-bit base via bitsandbytes (CUDA).")
    ] = False,
    precompute_ref: Annotated[
        bool | None,
        typer.Option(
            "--precompute-ref/--no-precompute-ref",
            help="Reference log-probs once before training [preset].",
            show_default=False,
        ),
    ] = None,
    pack_pairs: Annotated[
        bool | None,
        typer.Option(
            "--pack-pairs/--no-pack-pairs",
            help="Compute each pair's shared prompt once (DPO methods) [preset].",
            show_default=False,
        ),
    ] = None,
    bf16: Annotated[
        bool | None,
        typer.Option("--bf16/--no-bf16", help="bfloat16 autocast [preset].", show_default=False),
    ] = None,
    gradient_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--gradient-checkpointing/--no-gradient-checkpointing",
            help="Recompute activations in backward [preset].",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Base weights dtype: auto, float32, bfloat16 [preset].")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="Continue training this saved adapter.")
    ] = None,
    merge: Annotated[
        bool, typer.Option("--merge", help="Also write merged weights to OUT/merged.")
    ] = False,
    report_to: Annotated[str, typer.Option(help="Tracker: none, tensorboard or wandb.")] = "none",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda or cuda:N; default: CUDA when available.")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.")
    ] = False,
) -> None:
    """Train a LoRA adapter on preference pairs with a TRL trainer."""
    from .align import AlignConfig, train_adapter

    cfg = AlignConfig.from_preset(
        model,
        out,
        preset=preset,
        method=method,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        learning_rate=lr,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        beta=beta,
        label_smoothing=label_smoothing,
        seed=seed,
        max_length=max_length,
        load_in_4bit=load_in_4bit or None,
        precompute_ref=precompute_ref,
        pack_pairs=pack_pairs,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        dtype=dtype,
        adapter=str(adapter) if adapter is not None else None,
        merge=merge or None,
        report_to=report_to,
        device=device,
        overwrite=overwrite or None,
    )
    # under `accelerate launch` / torchrun only the main process (RANK 0) reports
    if os.environ.get("RANK", "0") != "0":
        train_adapter(pairs, cfg)
        return
    with _training_progress(cfg.max_steps) as progress:
        ref = train_adapter(pairs, cfg, progress=progress)
    loss = f"{ref.train_loss:.4f}" if ref.train_loss is not None else "n/a"
    console.print(
        f"adapter -> {ref.path} ({ref.method}, {ref.steps} steps, {ref.seconds:.0f} s, "
        f"final loss {loss})",
        highlight=False,
    )
    if ref.merged is not None:
        console.print(f"merged model -> {ref.merged}", highlight=False)


__all__ = ["align_command", "prefs_command"]
