"""Training an adapter: load the model, train with the TRL trainer, write the adapter folder."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, check_output_dir, json_safe, replace_dir, scratch_dir
from ..errors import DataError, ModelError
from ..rundir import library_versions
from .config import AlignConfig
from .trainer import TrainProgress, build_trainer, check_environment, lora_config

logger = logging.getLogger(__name__)

ADAPTER_KIND = "adapter"
"""Owner-marker kind of an adapter folder (see :func:`~spillover._io.check_output_dir`)."""


@dataclass(frozen=True)
class AdapterRef:
    """A trained adapter on disk."""

    path: Path
    """Adapter folder (``adapter_config.json``, weights, tokenizer, logs, config)."""
    model: str
    """Base model it applies to (as given)."""
    method: str
    """Preference method used."""
    steps: int
    """Optimizer steps taken."""
    train_loss: float | None
    """Last logged training loss."""
    log_history: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)
    """Logged values per step (also in ``log_history.json``)."""
    merged: Path | None = None
    """Folder of the merged model when ``merge`` was set."""
    seconds: float = 0.0
    """Wall time of training (without loading and saving)."""
    cpu_seconds: float = 0.0
    """CPU time (user + system, all threads) of training; steadier than wall time on a busy machine."""


def load_pair_frame(pairs: Any) -> tuple[Any, dict[str, Any]]:
    """Training pairs as a DataFrame, plus the split info they came with.

    Args:
        pairs: A pairs folder (from ``spillover prefs``), a :class:`~spillover.prefs.PairSet`,
            or a DataFrame with ``prompt``, ``chosen``, ``rejected``.

    Raises:
        DataError: missing folder or columns, or no pairs.
    """
    import pandas as pd

    from .prefs import PairSet, read_pairs, read_split

    split: dict[str, Any] = {}
    if isinstance(pairs, PairSet):
        df = pd.DataFrame([p.to_row() for p in pairs.train])
        split = pairs.split_info()
        where = "the pair set"
    elif isinstance(pairs, pd.DataFrame):
        df = pairs
        where = "the pair table"
    else:
        root = Path(pairs).expanduser()
        df = read_pairs(root, "train")
        split = read_split(root)
        split["pairs_dir"] = str(root)
        where = str(root / "train.parquet")
    for col in ("prompt", "chosen", "rejected"):
        if col not in df.columns:
            raise DataError(f"{where}: missing column {col!r}")
    if len(df) == 0:
        raise DataError(f"{where}: no training pairs; make pairs with `spillover prefs` first")
    return df.reset_index(drop=True), split


def load_for_training(cfg: AlignConfig, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the base model (optionally 4-bit) and tokenizer; apply a saved adapter if asked.

    Returns:
        ``(model, tokenizer, provenance)``; the model is a trainable PEFT model
        when ``cfg.adapter`` is set, else the plain base model.
    """
    from ..models import load_model

    if cfg.load_in_4bit:
        model, tok, prov = _load_4bit(cfg, device)
    else:
        loaded = load_model(cfg.model, device=device, dtype=cfg.dtype)
        model, tok, prov = loaded.model, loaded.tokenizer, loaded.provenance()
    if cfg.adapter is not None:
        from peft import PeftModel

        path = Path(cfg.adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
        # is_trainable=True: a frozen adapter would train nothing (loss stuck at ln 2)
        model = PeftModel.from_pretrained(model, str(path), is_trainable=True)
        prov["adapter"] = str(path.resolve())
    return model, tok, prov


def _load_4bit(cfg: AlignConfig, device: str) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..models import load_tokenizer, refused_load, resolve_model, weights_location

    spec = resolve_model(cfg.model)
    bnb = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            weights_location(spec),
            quantization_config=bnb,
            dtype=torch.bfloat16,
            device_map={"": device},
        )
    except OSError as exc:
        raise ModelError(f"could not load model {cfg.model!r}: {exc}") from None
    except Exception as exc:
        refused = refused_load(spec, exc)
        if refused is None:
            raise
        raise refused from None
    model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        model, use_gradient_checkpointing=cfg.gradient_checkpointing
    )
    tok = load_tokenizer(spec)
    prov = {
        "model": spec.name,
        "model_id": spec.model_id,
        "revision": spec.revision,
        "kind": spec.kind,
        "dtype": "nf4/bfloat16",
        "device": device,
        "adapter": None,
    }
    return model, tok, prov


def train_adapter(
    pairs: Any, cfg: AlignConfig, *, progress: TrainProgress | None = None
) -> AdapterRef:
    """Train a LoRA adapter on preference pairs and write it to ``cfg.output_dir``.

    The folder is built beside ``cfg.output_dir`` and renamed into place at the
    end, so a failed run leaves nothing behind. It holds the adapter
    (``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer,
    ``log_history.json`` (loss, reward accuracy and margins per logged step),
    ``align_config.json`` (the resolved config and the TRL/PEFT settings),
    ``provenance.json`` (model, BBQ, pairs and library versions) and, with
    ``merge``, the merged model in ``merged/``.

    Args:
        pairs: Pairs folder, :class:`~spillover.align.PairSet` or DataFrame.
        cfg: Run settings.
        progress: ``progress(step, total, logs)`` after every step.

    Raises:
        ConfigError, DataError, MissingDependencyError, ModelError.
    """
    import torch

    target = Path(cfg.output_dir).expanduser()
    check_output_dir(target, ADAPTER_KIND, overwrite=cfg.overwrite)
    df, split = load_pair_frame(pairs)
    device = check_environment(cfg)
    from accelerate import PartialState

    # one process, or one of several under `accelerate launch` / torchrun
    state = PartialState(cpu=device == "cpu")
    distributed = state.num_processes > 1
    main = state.is_main_process
    if device == "cpu":
        cores = (os.cpu_count() or 1) // (state.num_processes if distributed else 1)
        torch.set_num_threads(cfg.num_threads or max(cores, 1))
    from transformers import set_seed

    set_seed(cfg.seed)
    model, tok, model_prov = load_for_training(cfg, device)
    target.parent.mkdir(parents=True, exist_ok=True)
    if distributed:
        # every process must name the same scratch folder: the data TRL caches there
        # (reference log-probs) and the gathered adapter are written by the main process
        tmp = target.parent / f".{target.name}.partial"
        with state.main_process_first():
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
    else:
        # also removes the scratch folders of an interrupted training (SIGKILL skips `finally`)
        tmp = scratch_dir(target)
    try:
        trainer = build_trainer(
            model,
            tok,
            df,
            cfg,
            tmp / "_trainer",
            device=device,
            progress=progress,
            shared_data_dir=tmp / "_data" if distributed else None,
        )
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train()
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        history = [dict(h) for h in trainer.state.log_history]
        # collective under several processes (gathers ZeRO-3 / FSDP shards); only the main
        # process writes
        trainer.save_model(str(tmp))
        if not main:
            state.wait_for_everyone()  # the main process finishes the folder
            return _adapter_ref(target, cfg, trainer, history, None, seconds, cpu_seconds)
        info = {"model": model_prov, "split": split, "seconds": seconds}
        _finish_folder(tmp, cfg, trainer, tok, history, info)
        merged_dir: Path | None = None
        if cfg.merge:
            merged_dir = target / "merged"
            _merge(trainer.model, tok, tmp / "merged")
        tmp.chmod(0o755)
        replace_dir(tmp, target, ADAPTER_KIND)
        if distributed:
            state.wait_for_everyone()
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _adapter_ref(target, cfg, trainer, history, merged_dir, seconds, cpu_seconds)


def _finish_folder(
    tmp: Path,
    cfg: AlignConfig,
    trainer: Any,
    tok: Any,
    history: list[dict[str, Any]],
    info: Mapping[str, Any],
) -> None:
    """Tidy the saved adapter folder and write its tokenizer, logs, config and provenance."""
    (tmp / "training_args.bin").unlink(missing_ok=True)
    shutil.rmtree(tmp / "ref", ignore_errors=True)  # a resumed run's frozen reference
    shutil.rmtree(tmp / "_data", ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(tmp / "_trainer", ignore_errors=True)
    atomic_write_json(tmp / "log_history.json", json_safe(history, other=str))
    atomic_write_json(
        tmp / "align_config.json",
        {
            "config": cfg.to_dict(),
            "lora": json_safe(lora_config(cfg).to_dict(), other=str),
            "trainer": type(trainer).__mro__[1].__name__,
            "trl_args": json_safe(_trl_args_summary(trainer.args), other=str),
            "max_length": trainer.args.max_length,
        },
    )
    split = info["split"]
    provenance = {
        "model": info["model"],
        "bbq": split.get("provenance", {}).get("bbq"),
        "pairs": {
            "dir": split.get("pairs_dir"),
            "config": split.get("config"),
            "counts": split.get("counts"),
            "heldout_templates": split.get("heldout_templates"),
        },
        "warnings": split.get("warnings", []),
        "versions": library_versions(),
        "train_seconds": info["seconds"],
        "steps": trainer.state.global_step,
    }
    atomic_write_json(tmp / "provenance.json", json_safe(provenance, other=str))


def _adapter_ref(
    target: Path,
    cfg: AlignConfig,
    trainer: Any,
    history: list[dict[str, Any]],
    merged_dir: Path | None,
    seconds: float,
    cpu_seconds: float,
) -> AdapterRef:
    losses = [h["loss"] for h in history if "loss" in h]
    return AdapterRef(
        path=target,
        model=cfg.model,
        method=cfg.method,
        steps=int(trainer.state.global_step),
        train_loss=float(losses[-1]) if losses else None,
        log_history=tuple(history),
        merged=merged_dir,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )


def _merge(model: Any, tokenizer: Any, out: Path) -> None:
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")
        model.set_adapter("default")
    merged = model.merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _trl_args_summary(args: Any) -> dict[str, Any]:
    keys = (
        "loss_type",
        "beta",
        "label_smoothing",
        "learning_rate",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "num_train_epochs",
        "max_length",
        "precompute_ref_log_probs",
        "gradient_checkpointing",
        "bf16",
        "seed",
        "disable_dropout",
        "lr_scheduler_type",
        "warmup_steps",
        "cpo_alpha",
    )
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}
