"""Training an adapter: load the model, train with the TRL trainer, write the adapter folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import (
    OWNER_MARKER,
    atomic_write_json,
    check_output_dir,
    check_shared_dir,
    json_safe,
    mark_owned,
    replace_dir,
    scratch_dir,
)
from ..errors import ConfigError, DataError, ModelError
from ..rundir import canonical_hash, library_versions
from .config import AlignConfig
from .sharding import (
    four_bit_device_map,
    full_state_dict_for_saving,
    launch_from_env,
    missing_adapter_files,
    uniform_adapter_dtype,
)
from .trainer import (
    TrainProgress,
    build_trainer,
    check_environment,
    lora_config,
    sharded_training_args,
)
from .trl_args import resolve_trl_args

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
    resumed_step: int | None = None
    """Step of the checkpoint an interrupted training resumed from; None: from the start."""


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

    launch = launch_from_env()
    if cfg.load_in_4bit:
        model, tok, prov = _load_4bit(cfg, device)
    else:
        # sharded: the engine places the weights (see load_model's `place`); the caller has
        # made the training arguments first (sharded_training_args), so that transformers
        # loads under ZeRO-3's zero.Init or FSDP's first-process-only loading
        loaded = load_model(cfg.model, device=device, dtype=cfg.dtype, place=not launch.sharded)
        model, tok, prov = loaded.model, loaded.tokenizer, loaded.provenance()
    if cfg.adapter is not None:
        from peft import PeftModel

        path = Path(cfg.adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
        # is_trainable=True: a frozen adapter would train nothing (loss stuck at ln 2).
        # Under ZeRO-3, LoRA weights must keep the base's dtype: PEFT's default autocast to
        # float32 gives mixed dtypes that fail at the first optimizer step (TRL's docs).
        # Under FSDP the trainable adapter stays float32 (see uniform_adapter_dtype)
        model = PeftModel.from_pretrained(
            model,
            str(path),
            is_trainable=True,
            autocast_adapter_dtype=not launch.zero3,
        )
        prov["adapter"] = str(path.resolve())
    return model, tok, prov


def _load_4bit(cfg: AlignConfig, device: str) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from accelerate import PartialState
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from ..models import load_tokenizer, refused_load, resolve_model, weights_location

    spec = resolve_model(cfg.model)
    state = PartialState()
    device_map = four_bit_device_map(
        device,
        num_processes=state.num_processes,
        local_process_index=state.local_process_index,
    )
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
            device_map=device_map,
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


LOGS_DIR = "logs"
"""Subfolder of the adapter (and, while training, of its checkpoint folder) holding the
tracker logs (TensorBoard event files; ``wandb/`` for W&B)."""
CHECKPOINTS_KIND = "checkpoints"
"""Owner-marker kind of a checkpoint folder."""
RESUME_FILE = "resume.json"
"""File of a checkpoint folder recording the digest of the training it belongs to."""


def checkpoint_dir(target: Path) -> Path:
    """The checkpoint folder of an adapter folder: ``<name>.checkpoints`` beside it."""
    return target.parent / f"{target.name}.checkpoints"


def training_digest(cfg: AlignConfig, pairs: Any) -> str:
    """Digest of what decides a training's steps: the config (but where the adapter goes,
    the trackers, threads and merging) and the training pairs."""
    import pandas as pd

    values = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ("output_dir", "overwrite", "num_threads", "merge", "report_to")
    }
    cols = pairs[["prompt", "chosen", "rejected"]].astype(str)
    rows = hashlib.sha256(pd.util.hash_pandas_object(cols, index=False).to_numpy().tobytes())
    return canonical_hash({"config": values, "pairs": rows.hexdigest()})


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` (one with ``trainer_state.json``) in ``folder``."""
    found = [
        p
        for p in folder.glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(found, key=_checkpoint_step) if found else None


def _checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[-1])


def open_checkpoints(folder: Path, digest: str) -> Path | None:
    """Make ``folder`` the checkpoint folder of the training ``digest``; return the
    checkpoint to resume from, if it holds one of that same training.

    Checkpoints of another training (a changed config or other pairs) are discarded with a
    warning, and the training starts from step 0.

    Raises:
        ConfigError: ``folder`` exists and is not a checkpoint folder spillover made.
    """
    if folder.exists() or folder.is_symlink():
        try:
            owner = json.loads((folder / OWNER_MARKER).read_text(encoding="utf-8")).get("kind")
            recorded = json.loads((folder / RESUME_FILE).read_text(encoding="utf-8"))["digest"]
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            owner, recorded = None, None
        if owner != CHECKPOINTS_KIND or not folder.is_dir():
            raise ConfigError(
                f"{folder}: exists but is not a checkpoint folder spillover made (no "
                f"{OWNER_MARKER} of kind {CHECKPOINTS_KIND!r}); the checkpoints of this --out go "
                "there: move or remove it, or choose another --out"
            )
        last = last_checkpoint(folder)
        if recorded == digest:
            if last is not None:
                logger.warning("resuming the interrupted training from %s", last)
            return last
        if last is not None:
            logger.warning(
                "%s: checkpoints of a training with another config or other pairs; they are "
                "discarded and this training starts from step 0",
                folder,
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    mark_owned(folder, CHECKPOINTS_KIND)
    atomic_write_json(folder / RESUME_FILE, {"digest": digest})
    return None


@contextlib.contextmanager
def _tracker_dirs(cfg: AlignConfig, logs: Path) -> Iterator[None]:
    """W&B writes under ``logs`` (``WANDB_DIR``, unless set), and its run is finished after."""
    if cfg.report_to != "wandb":
        yield
        return
    logs.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("WANDB_DIR")
    if previous is None:
        os.environ["WANDB_DIR"] = str(logs)
    try:
        yield
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
        if previous is None:
            os.environ.pop("WANDB_DIR", None)


def _move_logs(src: Path, dst: Path) -> None:
    if src.is_dir() and any(src.iterdir()):
        shutil.move(str(src), str(dst))


def load_heldout_frame(pairs: Any) -> Any | None:
    """The held-out pairs that go with ``pairs``, or None: ``heldout.parquet`` of a pairs
    folder, the held-out part of a :class:`~spillover.prefs.PairSet`; a DataFrame has none."""
    import pandas as pd

    from .prefs import HELDOUT_FILE, PairSet, read_pairs

    if isinstance(pairs, PairSet):
        df = pd.DataFrame([p.to_row() for p in pairs.heldout])
    elif isinstance(pairs, pd.DataFrame):
        return None
    else:
        root = Path(pairs).expanduser()
        if not (root / HELDOUT_FILE).is_file():
            return None
        df = read_pairs(root, "heldout")
    if len(df) == 0 or not {"prompt", "chosen", "rejected"} <= set(df.columns):
        return None
    return df.reset_index(drop=True)


def _cpu_threads(processes: int) -> int:
    """Threads of one training process on a CPU: its share of the cores, or, in a single
    process given a share (``OMP_NUM_THREADS``: ``spillover run --jobs N``, a Ray task, a
    Slurm job), that share (torchrun's default of 1 per process is not taken)."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if processes <= 1 and threads.isdigit() and int(threads) > 0:
        return int(threads)
    return max((os.cpu_count() or 1) // max(processes, 1), 1)


def train_adapter(
    pairs: Any, cfg: AlignConfig, *, progress: TrainProgress | None = None
) -> AdapterRef:
    """Train a LoRA adapter on preference pairs and write it to ``cfg.output_dir``.

    The folder is built beside ``cfg.output_dir`` and renamed into place at the
    end, so a failed run leaves nothing behind. It holds the adapter
    (``adapter_config.json``, ``adapter_model.safetensors``), the tokenizer,
    ``log_history.json`` (loss, reward accuracy and margins per logged step, and the
    held-out evaluations), ``align_config.json`` (the resolved config and the TRL/PEFT
    settings), ``provenance.json`` (model, BBQ, pairs and library versions), the
    tracker logs in ``logs/`` and, with ``merge``, the merged model in ``merged/``.

    Checkpoints go to ``<output_dir>.checkpoints/`` (beside the output; removed once
    the adapter is in place). A training interrupted there resumes from its last
    checkpoint when run again with the same config and pairs.

    Args:
        pairs: Pairs folder, :class:`~spillover.align.PairSet` or DataFrame.
        cfg: Run settings.
        progress: ``progress(step, total, logs)`` after every step.

    Raises:
        ConfigError, DataError, MissingDependencyError, ModelError.
    """
    from ..models import release_cuda_memory

    try:
        return _train_adapter(pairs, cfg, progress)
    finally:
        # the trainer, model and optimizer are unreferenced once _train_adapter returns;
        # give their GPU memory back, for a vLLM engine started next in the same process
        release_cuda_memory()


def _train_adapter(pairs: Any, cfg: AlignConfig, progress: TrainProgress | None) -> AdapterRef:
    cfg = resolve_trl_args(cfg)  # recorded as TRL reads them
    target = Path(cfg.output_dir).expanduser()
    check_output_dir(target, ADAPTER_KIND, overwrite=cfg.overwrite)
    df, split = load_pair_frame(pairs)
    heldout = load_heldout_frame(pairs)
    device = check_environment(cfg)
    state, ckpt, resume = _join_launch(cfg, target, df, device)
    distributed = state.num_processes > 1
    main = state.is_main_process
    tmp: Path | None = None
    try:
        # held until the trainer has its own: it keeps the ZeRO-3 config live while loading
        early_args = sharded_training_args(cfg, ckpt, device)
        model, tok, model_prov = load_for_training(cfg, device)
        tmp = _scratch(target, state)
        trainer = build_trainer(
            model,
            tok,
            df,
            cfg,
            ckpt,
            device=device,
            progress=progress,
            shared_data_dir=tmp / "_data" if distributed else None,
            eval_pairs=heldout,
            logs_dir=ckpt / LOGS_DIR,
        )
        del early_args
        uniform_adapter_dtype(trainer.model, launch_from_env())
        run = _run_training(trainer, cfg, ckpt, resume)
        history = [dict(h) for h in trainer.state.log_history]
        # collective under several processes (gathers ZeRO-3 / FSDP shards); only the main
        # process writes. Under FSDP it writes nothing unless the state dict is a full one.
        full_state_dict_for_saving(trainer, launch_from_env())
        trainer.save_model(str(tmp))
        missing = missing_adapter_files(tmp) if main else []
        if missing:
            raise ModelError(
                f"the trained adapter was not saved ({', '.join(missing)} missing after "
                "save_model); nothing was written to the output folder"
            )
        if not main:
            state.wait_for_everyone()  # the main process finishes the folder
            return _adapter_ref(target, cfg, trainer, history, None, run)
        info = {"model": model_prov, "split": split, "seconds": run["seconds"], **run}
        _finish_folder(tmp, cfg, trainer, tok, history, info)
        merged_dir: Path | None = None
        if cfg.merge:
            merged_dir = target / "merged"
            _merge(trainer.model, tok, tmp / "merged")
        _move_logs(ckpt / LOGS_DIR, tmp / LOGS_DIR)
        tmp.chmod(0o755)
        replace_dir(tmp, target, ADAPTER_KIND)
        shutil.rmtree(ckpt, ignore_errors=True)
        if distributed:
            state.wait_for_everyone()
    finally:
        if main and tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if main and ckpt.is_dir() and not list(ckpt.glob("checkpoint-*")):
            shutil.rmtree(ckpt, ignore_errors=True)  # nothing to resume from
    return _adapter_ref(target, cfg, trainer, history, merged_dir, run)


def _join_launch(
    cfg: AlignConfig, target: Path, df: Any, device: str
) -> tuple[Any, Path, Path | None]:
    """This process's place in the launch (accelerate's ``PartialState``), the checkpoint
    folder and the checkpoint to resume from (decided by the first process, in a folder
    every process must see); torch's threads and the seed set."""
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    # one process, or one of several under `accelerate launch` / torchrun
    state = PartialState(cpu=device == "cpu")
    main = state.is_main_process
    ckpt = checkpoint_dir(target)
    # the first process decides the resume and writes what the others read: one folder
    check_shared_dir(
        target.parent, state, what="the adapter folder, its checkpoints and scratch data"
    )
    with state.main_process_first():
        resume = open_checkpoints(ckpt, training_digest(cfg, df)) if main else None
    if not main:
        resume = last_checkpoint(ckpt)
    if device == "cpu":
        torch.set_num_threads(cfg.num_threads or _cpu_threads(state.num_processes))
    set_seed(cfg.seed)
    return state, ckpt, resume


def _scratch(target: Path, state: Any) -> Path:
    """The folder the adapter is assembled in, beside ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if state.num_processes == 1:
        # also removes the scratch folders of an interrupted training (SIGKILL skips `finally`)
        return scratch_dir(target)
    # every process must name the same scratch folder: the data TRL caches there
    # (reference log-probs) and the gathered adapter are written by the main process
    tmp = target.parent / f".{target.name}.partial"
    with state.main_process_first():
        if state.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    return tmp


def _run_training(
    trainer: Any, cfg: AlignConfig, ckpt: Path, resume: Path | None
) -> dict[str, Any]:
    """``trainer.train()``, from ``resume`` when given; the trackers write under ``ckpt``."""
    resumed = _checkpoint_step(resume) if resume is not None else None
    with _tracker_dirs(cfg, ckpt / LOGS_DIR):
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "resumed_step": resumed}


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
    shutil.rmtree(tmp / "_data_eval", ignore_errors=True)
    tok.save_pretrained(str(tmp))
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
        "resumed_from_step": info.get("resumed_step"),
    }
    atomic_write_json(tmp / "provenance.json", json_safe(provenance, other=str))


def _adapter_ref(
    target: Path,
    cfg: AlignConfig,
    trainer: Any,
    history: list[dict[str, Any]],
    merged_dir: Path | None,
    run: Mapping[str, Any],
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
        seconds=run["seconds"],
        cpu_seconds=run["cpu_seconds"],
        resumed_step=run["resumed_step"],
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
        "warmup_ratio",
        "cpo_alpha",
    )
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}
