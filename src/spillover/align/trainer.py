"""The TRL side of alignment: trainer classes, TRL and PEFT configs, datasets, the trainer.

This is the only module that builds TRL trainers and their configs and PEFT training
configs. Tokenization follows TRL's ``DPOTrainer``: the prompt and prompt+completion are
tokenized with the tokenizer's own special tokens, the completion is what follows their
common prefix, and one EOS is appended to every completion. Two traps are removed after
TRL's processing: a second BOS (chat templates that write the BOS text themselves, with
tokenizers that also add one) and a second EOS (tokenizers that append EOS themselves).

Reference model: the base model with the adapter disabled (TRL's behaviour for
a PEFT model with ``ref_model=None``); no second copy of the model is loaded.
When training continues from a saved adapter, TRL keeps a frozen copy of the loaded
LoRA weights (adapter ``ref``) as the reference, so the resumed run is anchored at
the adapter it starts from.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingDependencyError
from .config import AlignConfig
from .methods import method_of, quiet_experimental, trl_classes
from .packing import pair_packing
from .sharding import launch_bf16, launch_from_env
from .trl_args import resolve_trl_args

logger = logging.getLogger(__name__)

TrainProgress = Callable[[int, int, Mapping[str, float]], None]
"""``progress(step, total_steps, logs)``: called after every optimizer step; ``logs``
holds the latest logged values (``loss``, ``rewards/accuracies``, ...) or is empty."""


def check_environment(cfg: AlignConfig) -> str:
    """Check what the config needs from this machine; return the device to use.

    Raises:
        ConfigError: CUDA asked for but absent; 4-bit without CUDA.
        MissingDependencyError: bitsandbytes, tensorboard or wandb missing, or the
            method's trainer absent from the installed TRL.
    """
    from ..models import resolve_device
    from .sharding import check_launch, launch_from_env

    check_launch(launch_from_env(), merge=cfg.merge, load_in_4bit=cfg.load_in_4bit, bf16=cfg.bf16)
    if cfg.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "`load_in_4bit`=True but CUDA is not available here; 4-bit QLoRA runs on CUDA GPUs "
                "only (drop --load-in-4bit to train in full precision)"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependencyError(
                "`load_in_4bit`=True needs bitsandbytes: pip install 'bitsandbytes>=0.43'"
            )
    device = resolve_device(cfg.device)
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        pkg = "tensorboard" if cfg.report_to == "tensorboard" else "wandb"
        raise MissingDependencyError(
            f"`report_to`={cfg.report_to!r} needs {pkg}: pip install {pkg}"
        )
    resolve_trl_args(cfg)  # a TRL setting the installed TRL refuses fails here
    return device


def trainer_classes(method: str) -> tuple[Any, Any]:
    """The (config class, trainer class) of a method in the installed TRL; the trainer
    subclassed so that processed examples carry no duplicated BOS/EOS (DPO, KTO).

    Raises:
        MissingDependencyError: the installed TRL lacks that trainer.
    """
    config_cls, trainer_cls = trl_classes(method)
    if method_of(method).family in ("dpo", "kto"):
        trainer_cls = _patched_trainer(trainer_cls)
    return config_cls, trainer_cls


@contextlib.contextmanager
def _no_dataset_progress_bars() -> Any:
    """Silence ``datasets`` and TRL progress bars (the library does not print)."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    # TRL's reference precompute shows a tqdm bar unless TQDM_DISABLE is set
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


_PATCHED: dict[Any, Any] = {}


def _patched_trainer(base: Any) -> Any:
    """Subclass a TRL trainer so that processed examples carry no duplicated BOS/EOS."""
    if base in _PATCHED:
        return _PATCHED[base]

    class _Trainer(base):  # type: ignore[misc]
        def __init__(self, *args: Any, pack_pairs: bool = False, **kwargs: Any) -> None:
            self.pack_pairs = pack_pairs
            super().__init__(*args, **kwargs)

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            dataset = super()._prepare_dataset(dataset, *args, **kwargs)
            tok = self._tokenizer
            return dataset.map(
                strip_duplicate_special_tokens,
                fn_kwargs={"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id},
            )

        def _packing(self) -> Any:
            if not self.pack_pairs:
                return contextlib.nullcontext()
            return pair_packing(self.model)

        def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
            with self._packing():
                return super().compute_loss(*args, **kwargs)

        def compute_ref_log_probs(self, *args: Any, **kwargs: Any) -> Any:
            with self._packing():
                return super().compute_ref_log_probs(*args, **kwargs)

    _Trainer.__name__ = f"Spillover{base.__name__}"
    _Trainer.__qualname__ = _Trainer.__name__
    _PATCHED[base] = _Trainer
    return _Trainer


def strip_duplicate_special_tokens(
    example: Mapping[str, Any], bos_id: int | None, eos_id: int | None
) -> dict[str, Any]:
    """Drop a doubled BOS at the start of ``prompt_ids`` and a doubled EOS at completion ends.

    A doubled BOS arises when a chat template writes the BOS text and the
    tokenizer adds its own; a doubled EOS when the tokenizer appends EOS and
    TRL appends one too. One of each is kept.
    """
    out: dict[str, Any] = {}
    prompt = list(example["prompt_ids"])
    while bos_id is not None and len(prompt) >= 2 and prompt[0] == bos_id and prompt[1] == bos_id:
        prompt = prompt[1:]
    out["prompt_ids"] = prompt
    for key in ("chosen_ids", "rejected_ids", "completion_ids"):
        if key in example:
            ids = list(example[key])
            while eos_id is not None and len(ids) >= 2 and ids[-1] == eos_id and ids[-2] == eos_id:
                ids = ids[:-1]
            out[key] = ids
    return out


def to_trl_dataset(df: Any, method: str) -> Any:
    """The ``datasets.Dataset`` a method's trainer expects.

    DPO, CPO and ORPO take ``prompt``/``chosen``/``rejected``. KTO takes
    unpaired ``prompt``/``completion``/``label`` rows: each pair gives its
    chosen completion (``label=True``) and its rejected one (``label=False``);
    a chosen completion shared by several pairs of one prompt appears once.
    """
    from datasets import Dataset

    if method != "kto":
        return Dataset.from_dict(
            {c: [str(v) for v in df[c]] for c in ("prompt", "chosen", "rejected")}
        )
    rows: dict[str, list[Any]] = {"prompt": [], "completion": [], "label": []}
    seen: set[tuple[str, str, bool]] = set()
    for prompt, chosen, rejected in zip(df["prompt"], df["chosen"], df["rejected"], strict=True):
        for completion, label in ((chosen, True), (rejected, False)):
            key = (str(prompt), str(completion), label)
            if key in seen:
                continue
            seen.add(key)
            rows["prompt"].append(str(prompt))
            rows["completion"].append(str(completion))
            rows["label"].append(label)
    return Dataset.from_dict(rows)


def longest_pair_tokens(rows: Any, tokenizer: Any) -> int:
    """Tokens of the longest prompt + completion (+ BOS/EOS): a ``max_length`` that truncates nothing.

    ``rows`` has ``prompt`` and either ``chosen``/``rejected`` or ``completion`` columns
    (a DataFrame or a ``datasets.Dataset``).
    """
    names = list(rows.column_names if hasattr(rows, "column_names") else rows.columns)
    cols = [c for c in ("chosen", "rejected", "completion") if c in names]
    completions = [list(rows[c]) for c in cols]
    longest = 0
    for i, prompt in enumerate(list(rows["prompt"])):
        for values in completions:
            text = str(prompt) + str(values[i])
            longest = max(longest, len(tokenizer(text)["input_ids"]))
    return longest + 2


def lora_config(cfg: AlignConfig) -> Any:
    """The ``peft.LoraConfig`` of a run."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _checkpointing_key() -> str:
    """``activation_checkpointing`` where transformers renamed ``gradient_checkpointing``."""
    import dataclasses as dc

    from transformers import TrainingArguments

    names = {f.name for f in dc.fields(TrainingArguments)}
    return (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )


def _training_arg_names() -> frozenset[str]:
    """The fields of the installed ``transformers.TrainingArguments``."""
    import dataclasses as dc

    from transformers import TrainingArguments

    return frozenset(f.name for f in dc.fields(TrainingArguments))


def warmup_args(ratio: float, fields: frozenset[str]) -> dict[str, float]:
    """The warm-up as the installed transformers reads a share of the steps.

    transformers 4.x has ``warmup_ratio`` (a share) and an integer ``warmup_steps``, which
    takes ``0.1`` for a step count (no warm-up at all); transformers 5 dropped
    ``warmup_ratio`` and reads a ``warmup_steps`` below 1 as the share. ``fields``: the
    ``TrainingArguments`` field names.
    """
    if "warmup_ratio" in fields:
        return {"warmup_ratio": ratio}
    return {"warmup_steps": ratio}


def resolve_bf16(bf16: bool | None, device: str) -> bool:
    """``bf16`` as asked, or (None) bfloat16 autocast where bf16 is fast on ``device``."""
    if bf16 is not None:
        return bf16
    from ..models import fast_bf16

    return fast_bf16(device)


def trl_config(
    cfg: AlignConfig,
    output_dir: str | os.PathLike[str],
    *,
    device: str,
    max_length: int | None,
    evaluate: bool = False,
) -> Any:
    """The TRL training config (``DPOConfig``, ``KTOConfig``, ``CPOConfig`` or ``ORPOConfig``).

    ``evaluate``: an evaluation set is given (else ``eval_strategy`` is ``no``). The
    ``trl_args`` of ``cfg`` are applied last.

    Raises:
        ConfigError: TRL refuses the combination of settings.
    """
    cfg = resolve_trl_args(cfg)
    config_cls, _ = trainer_classes(cfg.method)
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.learning_rate,
        "beta": cfg.beta,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "max_length": max_length,
        _checkpointing_key(): cfg.gradient_checkpointing,
        # an `accelerate launch` config's mixed_precision decides when --bf16 is not given
        "bf16": resolve_bf16(launch_bf16(cfg.bf16, launch_from_env()), device),
        "fp16": False,
        "use_cpu": device == "cpu",
        "report_to": [] if cfg.report_to == "none" else [cfg.report_to],
        **warmup_args(cfg.warmup_ratio, _training_arg_names()),
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": device != "cpu",
        "disable_tqdm": True,
        **_schedule_args(cfg, evaluate),
        **_method_args(cfg),
    }
    kwargs.update(cfg.trl_args)
    with quiet_experimental():
        try:
            return config_cls(**kwargs)
        except ValueError as exc:
            text = " ".join(str(exc).split())
            raise ConfigError(
                f"TRL's {config_cls.__name__} refuses these settings: {text} (check `trl_args` "
                "and the options it names)"
            ) from None


def sharded_training_args(cfg: AlignConfig, output_dir: Path, device: str) -> Any | None:
    """Under ZeRO-3 or FSDP, the run's TRL config made before the model is loaded; else None.

    transformers decides how ``from_pretrained`` loads from state the training arguments
    create: under DeepSpeed they make its DeepSpeed config live (accelerate's plugin, a weak
    reference read by ``is_deepspeed_zero3_enabled()``), and ZeRO-3 then partitions every
    weight as it is read (``deepspeed.zero.Init``, ``zero3_init_flag``) instead of each
    process holding a whole copy in host memory. FSDP's first-process-only loading
    (``fsdp_cpu_ram_efficient_loading``) needs only the launch's environment and the
    process group. Keep the returned object alive until the trainer is built (the weak
    reference dies with it). ``max_length`` is not known yet and does not matter here.
    """
    if not launch_from_env().sharded:
        return None
    return trl_config(cfg, output_dir, device=device, max_length=None)


def _schedule_args(cfg: AlignConfig, evaluate: bool) -> dict[str, Any]:
    """Steps or epochs, evaluation and checkpoint intervals (a float below 1 is
    transformers' share of the total steps)."""
    out: dict[str, Any] = (
        {"max_steps": cfg.max_steps}
        if cfg.max_steps is not None
        else {"num_train_epochs": cfg.epochs if cfg.epochs is not None else 1.0}
    )
    if not evaluate or cfg.eval_strategy == "no" or cfg.eval_steps == 0:
        out["eval_strategy"] = "no"
    else:
        out["eval_strategy"] = cfg.eval_strategy
        out["eval_steps"] = cfg.eval_steps if cfg.eval_steps is not None else _share(cfg, 4)
    out["save_strategy"] = cfg.save_strategy
    if cfg.save_strategy != "no":
        out["save_steps"] = cfg.save_steps if cfg.save_steps is not None else _share(cfg, 10)
        out["save_total_limit"] = cfg.save_total_limit
    return out


def _share(cfg: AlignConfig, parts: int) -> int | float:
    """A ``parts``-th of the training in steps: ``ceil(max_steps / parts)``, or (epochs: total
    steps unknown here) transformers' fraction ``1 / parts`` of the total."""
    if cfg.max_steps is not None:
        return math.ceil(cfg.max_steps / parts)
    return 1.0 / parts


def _method_args(cfg: AlignConfig) -> dict[str, Any]:
    """The loss settings of the method."""
    method = method_of(cfg.method)
    kwargs: dict[str, Any] = {}
    if method.family == "dpo":
        kwargs["loss_type"] = [method.loss_type]
        if cfg.rpo_alpha:  # RPO: the preference loss plus rpo_alpha x NLL of the chosen answer
            kwargs["loss_type"].append("sft")
            kwargs["loss_weights"] = [1.0, cfg.rpo_alpha]
        kwargs["precompute_ref_log_probs"] = cfg.precompute_ref
        smoothing = cfg.label_smoothing
        if smoothing is None:
            smoothing = method.default_label_smoothing or 0.0
        kwargs["label_smoothing"] = smoothing
    elif method.family == "kto":
        kwargs["precompute_ref_log_probs"] = cfg.precompute_ref
    elif method.family == "cpo":
        kwargs["loss_type"] = method.loss_type
        if method.name == "simpo":
            kwargs["cpo_alpha"] = 0.0
        if cfg.label_smoothing is not None:
            kwargs["label_smoothing"] = cfg.label_smoothing
    return kwargs


class _TrainProgressAdapter:
    """Factory of a ``transformers.TrainerCallback`` forwarding steps and logs to a function."""

    @staticmethod
    def make(progress: TrainProgress) -> Any:
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def __init__(self) -> None:
                self.latest: dict[str, float] = {}

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any
            ) -> None:
                if logs:
                    self.latest = {
                        k: float(v) for k, v in logs.items() if isinstance(v, (int, float))
                    }
                    progress(state.global_step, state.max_steps, self.latest)

            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                progress(state.global_step, state.max_steps, {})

        return _CB()


def build_trainer(
    model: Any,
    tokenizer: Any,
    pairs: Any,
    cfg: AlignConfig,
    output_dir: str | os.PathLike[str],
    *,
    device: str = "cpu",
    progress: TrainProgress | None = None,
    shared_data_dir: Path | None = None,
    eval_pairs: Any | None = None,
    logs_dir: Path | None = None,
) -> Any:
    """Construct the TRL trainer of a run (data processed; reference log-probs precomputed if set).

    Args:
        model: Base model, or a PEFT model when continuing from an adapter.
        tokenizer: Its tokenizer.
        pairs: DataFrame with ``prompt``, ``chosen``, ``rejected``.
        cfg: The run's settings.
        output_dir: The trainer's folder (checkpoints).
        device: Device the model is on.
        progress: Step callback.
        shared_data_dir: With several processes, a folder all of them see: the pairs are
            saved there so that the datasets cache files TRL writes on the main process
            (tokenised rows, precomputed reference log-probs) are found by the others (an
            in-memory dataset caches under a per-process temporary folder instead).
        eval_pairs: Held-out pairs (DataFrame) evaluated every ``cfg.eval_steps``; a seeded
            sample of ``cfg.eval_pairs`` of them. None or empty: no evaluation.
        logs_dir: Folder of the TensorBoard event files (``TENSORBOARD_LOGGING_DIR``, when
            set, wins); default: transformers' ``output_dir/runs/...``.
    """
    from accelerate import PartialState
    from peft import PeftModel

    _, trainer_cls = trainer_classes(cfg.method)
    state = PartialState()
    dataset = used_rows(to_trl_dataset(pairs, cfg.method), cfg, state.num_processes)
    dataset = _shared(dataset, shared_data_dir, state)
    evalset = eval_rows(eval_pairs, cfg, _default_eval_pairs(cfg, len(dataset), state))
    if evalset is not None and shared_data_dir is not None:
        evalset = _shared(evalset, shared_data_dir.with_name(shared_data_dir.name + "_eval"), state)
    longest = max(longest_pair_tokens(d, tokenizer) for d in (dataset, evalset) if d is not None)
    max_length = cfg.max_length if cfg.max_length is not None else longest
    if max_length < longest:
        logger.warning("max_length=%d truncates the longest pairs (%d tokens)", max_length, longest)
    args = trl_config(
        cfg, output_dir, device=device, max_length=max_length, evaluate=evalset is not None
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": dataset,
        "processing_class": tokenizer,
    }
    if evalset is not None and args.eval_strategy != "no":
        kwargs["eval_dataset"] = evalset
    if not isinstance(model, PeftModel):
        kwargs["peft_config"] = lora_config(cfg)
    if method_of(cfg.method).family in ("dpo", "kto"):
        kwargs["ref_model"] = None
    if progress is not None:
        kwargs["callbacks"] = [_TrainProgressAdapter.make(progress)]
    if method_of(cfg.method).is_dpo:
        kwargs["pack_pairs"] = cfg.pack_pairs
    with quiet_experimental(), _no_dataset_progress_bars():
        trainer = trainer_cls(**kwargs)
    # the library never prints: drop the Trainer's console printer / tqdm bar
    from transformers import trainer_callback

    trainer.remove_callback(trainer_callback.PrinterCallback)
    trainer.remove_callback(trainer_callback.ProgressCallback)
    if logs_dir is not None:
        for cb in trainer.callback_handler.callbacks:
            if type(cb).__name__ == "TensorBoardCallback" and cb.logging_dir is None:
                cb.logging_dir = str(logs_dir)
    return trainer


def _shared(dataset: Any, folder: Path | None, state: Any) -> Any:
    """``dataset`` saved to ``folder`` by the main process and read back by every process."""
    if folder is None:
        return dataset
    from datasets import Dataset

    with state.main_process_first():
        if state.is_main_process:
            dataset.save_to_disk(str(folder))
    return Dataset.load_from_disk(str(folder))


def eval_rows(pairs: Any | None, cfg: AlignConfig, default: int = 256) -> Any | None:
    """The evaluation dataset: a seeded sample of ``cfg.eval_pairs`` (or ``default``)
    held-out pairs, or None (no pairs, ``eval_pairs`` 0, ``eval_steps`` 0 or
    ``eval_strategy`` ``no``)."""
    n = cfg.eval_pairs if cfg.eval_pairs is not None else default
    if pairs is None or len(pairs) == 0 or n == 0:
        return None
    if cfg.eval_strategy == "no" or cfg.eval_steps == 0:
        return None
    if n < len(pairs):
        pairs = pairs.sample(n=n, random_state=cfg.seed).reset_index(drop=True)
    return to_trl_dataset(pairs, cfg.method)


def _default_eval_pairs(cfg: AlignConfig, rows: int, state: Any) -> int:
    """Half the training rows seen between two evaluations, clamped to 8..256."""
    per_step = cfg.batch_size * cfg.grad_accum * state.num_processes
    if cfg.max_steps is not None:
        total = cfg.max_steps
    else:
        total = max(1, math.ceil(rows / per_step * (cfg.epochs or 1.0)))
    if cfg.eval_strategy == "epoch":
        interval = max(1, math.ceil(rows / per_step))
    else:
        interval = cfg.eval_steps or math.ceil(total / 4)
    return min(256, max(8, int(interval * per_step) // 2))


def used_rows(dataset: Any, cfg: AlignConfig, processes: int = 1) -> Any:
    """Keep only the rows a ``max_steps`` run will see: a seeded sample of
    ``steps * batch * accum * processes``.

    With ``max_steps`` shorter than an epoch, TRL would still tokenize (and,
    with ``precompute_ref``, run the reference model over) every row. The
    sample is drawn with ``cfg.seed``; the trainer then shuffles it again.
    """
    if cfg.max_steps is None:
        return dataset
    n = cfg.max_steps * cfg.batch_size * cfg.grad_accum * processes
    if n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=cfg.seed).select(range(n)).flatten_indices()
