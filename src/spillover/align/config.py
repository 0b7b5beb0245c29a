"""The alignment config: one object for the Python API, the run config and ``spillover align``.

:class:`AlignConfig` is turned into the method's TRL config (``trl.DPOConfig``, KTO, CPO or
ORPO) and ``peft.LoraConfig`` in :mod:`spillover.align.trainer` and nowhere else. The
methods and what each needs are in :mod:`spillover.align.methods`. Validating a config
imports no TRL; the TRL settings passed through (``trl_args``) are checked against the
installed TRL by :func:`spillover.align.resolve_trl_args`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._checks import check_choice, check_device, check_int, check_number, check_seed
from ..errors import ConfigError
from .methods import METHOD_TABLE, check_method, method_of
from .trl_args import check_trl_keys

REPORT_TO: tuple[str, ...] = ("none", "tensorboard", "wandb")
"""Experiment trackers ``report_to`` accepts."""
INTERVALS: tuple[str, ...] = ("steps", "epoch", "no")
"""What ``eval_strategy`` and ``save_strategy`` accept (transformers' names)."""
LR_SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant", "constant_with_warmup")
"""Learning-rate schedules offered (transformers' ``SchedulerType`` names)."""


@dataclass(frozen=True, slots=True)
class AlignConfig:
    """Everything one alignment run needs; validated on creation.

    The field defaults are the generic defaults, used for a model without a preset;
    :meth:`from_preset` starts from the model's preset (:data:`spillover.align.PRESETS`)
    instead. Fields a preset sets are marked [preset] in ``spillover align --help``.
    """

    model: str
    """Model alias, hub id or local folder."""
    output_dir: str
    """Folder the adapter is written to (created atomically)."""
    method: str = "dpo"
    """Preference method: a DPO loss type (dpo, ipo, robust, hinge, apo_zero, ...), kto, cpo,
    simpo or orpo."""
    preset: str | None = None
    """Preset the defaults came from; default: the preset named after the model."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (update scale ``alpha / r``)."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    target_modules: tuple[str, ...] = ()
    """Modules adapted by LoRA, comma-separated; empty: PEFT's default for the architecture."""
    learning_rate: float = 5e-5
    """AdamW learning rate."""
    epochs: float | None = None
    """Passes over the pairs; used when ``max_steps`` is not set (default 1)."""
    max_steps: int | None = None
    """Optimizer steps (instead of ``epochs``)."""
    batch_size: int = 4
    """Pairs per step and device."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    beta: float = 0.1
    """Loss temperature (DPO's beta, IPO's tau, KTO's beta, CPO/ORPO's beta)."""
    label_smoothing: float | None = None
    """robust: label flip probability (default 0.1); exo_pair: epsilon (default 1e-3)."""
    rpo_alpha: float | None = None
    """DPO methods: weight of an NLL term on the chosen answer added to the preference loss
    (RPO, Pang et al. 2024), which keeps the chosen answers likely; TRL's ``sft`` loss
    beside the method's loss, weights ``[1, rpo_alpha]``. None or 0: off."""
    warmup_ratio: float = 0.0
    """Share of the steps over which the learning rate warms up linearly from 0."""
    lr_scheduler_type: str = "linear"
    """Learning-rate schedule after warm-up: linear, cosine, constant or
    constant_with_warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    seed: int = 0
    """Seed of LoRA initialisation, data order and dropout."""
    max_length: int | None = None
    """Token limit of prompt + completion; default: the longest pair (no truncation)."""
    load_in_4bit: bool = False
    """QLoRA: load the base in 4-bit NF4 with bitsandbytes (CUDA only)."""
    precompute_ref: bool = True
    """Compute reference log-probs once before training (TRL's ``precompute_ref_log_probs``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (saves memory, costs time)."""
    bf16: bool | None = None
    """bfloat16 mixed precision (autocast); default: on where bf16 is fast (CUDA GPUs with
    bf16, CPUs with AVX512-BF16 or AMX), off elsewhere (CPUs emulate it, many times slower)."""
    pack_pairs: bool = True
    """DPO methods: compute the prompt shared by chosen and rejected once (exact)."""
    dtype: str = "auto"
    """Parameter dtype of the base model: auto (float32 on CPU, bfloat16 on CUDA), float32,
    bfloat16."""
    merge: bool = False
    """Also write the adapter merged into the base weights to ``output_dir/merged``."""
    report_to: str = "none"
    """Experiment tracker: ``none``, ``tensorboard`` or ``wandb``."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:N``; default: CUDA when available."""
    adapter: str | None = None
    """Saved adapter to continue training from (loaded trainable)."""
    logging_steps: int = 1
    """Log loss and reward metrics every N steps."""
    eval_strategy: str = "steps"
    """Evaluate on the held-out pairs (``heldout.parquet``) during training: ``steps``
    (every ``eval_steps``), ``epoch`` or ``no``."""
    eval_steps: int | None = None
    """Steps between evaluations on the held-out pairs; default: a quarter of the training
    (four evaluations); 0: none."""
    eval_pairs: int | None = None
    """Held-out pairs evaluated (a seeded sample); default: half the pairs trained on between
    two evaluations, 8 to 256, so evaluating costs about a fifth of training; 0: none."""
    save_strategy: str = "steps"
    """Checkpoints for resuming an interrupted training: ``steps`` (every ``save_steps``),
    ``epoch`` or ``no``."""
    save_steps: int | None = None
    """Steps between checkpoints; default: a tenth of the training."""
    save_total_limit: int = 1
    """Checkpoints kept (the newest)."""
    trl_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Other settings of the method's TRL config (``DPOConfig`` / ``TrainingArguments``
    keys), e.g. ``{optim: adafactor}``; checked against TRL's own fields."""
    num_threads: int | None = None
    """CPU threads for torch; default: every core."""
    overwrite: bool = False
    """Replace an existing ``output_dir`` (only an adapter folder spillover made)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", check_method(self.method))
        if isinstance(self.target_modules, str):
            mods = tuple(m.strip() for m in self.target_modules.split(",") if m.strip())
            object.__setattr__(self, "target_modules", mods)
        else:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not self.model or not str(self.model).strip():
            raise ConfigError(
                "`model` is empty; give an alias (e.g. 'smollm2-135m'), a hub id or a folder"
            )
        if not self.output_dir:
            raise ConfigError("`output_dir` is empty; give the folder to write the adapter to")
        check_seed("seed", self.seed)
        check_device(self.device)
        self._check_flags()
        self._check_lora()
        self._check_schedule()
        self._check_loss()
        self._check_engine()
        self._check_checkpoints()

    def _check_checkpoints(self) -> None:
        for name in ("eval_strategy", "save_strategy"):
            if getattr(self, name) is False:  # YAML reads a bare `no` as false
                object.__setattr__(self, name, "no")
        check_choice("eval_strategy", self.eval_strategy, INTERVALS)
        check_choice("save_strategy", self.save_strategy, INTERVALS)
        if self.eval_steps is not None:
            check_int("eval_steps", self.eval_steps, minimum=0, example="e.g. 50, or 0 for none")
        if self.save_steps is not None:
            check_int("save_steps", self.save_steps, minimum=1, example="e.g. 50")
        if self.eval_pairs is not None:
            check_int("eval_pairs", self.eval_pairs, minimum=0, example="e.g. 128, or 0 for none")
        check_int("save_total_limit", self.save_total_limit, minimum=1, example="e.g. 1")
        object.__setattr__(self, "trl_args", check_trl_keys(self.trl_args))

    def _check_flags(self) -> None:
        for name in (
            "load_in_4bit",
            "precompute_ref",
            "gradient_checkpointing",
            "pack_pairs",
            "merge",
            "overwrite",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"`{name}`={getattr(self, name)!r}; expected true or false")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            raise ConfigError(f"`bf16`={self.bf16!r}; expected true, false or null (auto)")
        if not all(isinstance(m, str) and m for m in self.target_modules):
            raise ConfigError(
                f"`target_modules`={list(self.target_modules)!r}; expected module names "
                "(e.g. q_proj,v_proj)"
            )

    def _check_lora(self) -> None:
        check_int("lora_r", self.lora_r, minimum=1, example="e.g. 16")
        alpha: Any = self.lora_alpha
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not (alpha > 0 and math.isfinite(alpha))
        ):
            raise ConfigError(
                f"`lora_alpha`={self.lora_alpha}; expected a positive number (e.g. 2 * lora_r)"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(
                f"`lora_dropout`={self.lora_dropout}; expected a value in [0, 1) (e.g. 0.05)"
            )
        if "lm_head" in self.target_modules:
            raise ConfigError(
                "`target_modules` includes 'lm_head'; TRL computes log-probs from lm_head.weight "
                "directly, so an adapter there would never train: remove it"
            )

    def _check_schedule(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(
                f"`learning_rate`={self.learning_rate}; expected a positive number (e.g. 5e-5)"
            )
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError(
                f"`epochs`={self.epochs} and `max_steps`={self.max_steps} are both set; "
                "give one of them (max_steps overrides epochs in TRL, which hides mistakes)"
            )
        if self.epochs is not None and not (
            isinstance(self.epochs, (int, float)) and 0 < self.epochs <= 1e6
        ):
            raise ConfigError(
                f"`epochs`={self.epochs}; expected a positive number of passes (at most 1e6)"
            )
        if self.max_steps is not None:
            check_int("max_steps", self.max_steps, minimum=1, example="e.g. 200")
        check_number("warmup_ratio", self.warmup_ratio, low=0.0, high=0.99)
        check_choice("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS)
        check_number("weight_decay", self.weight_decay, low=0.0)
        check_number("max_grad_norm", self.max_grad_norm, low=0.0, open_low=True)
        check_int("batch_size", self.batch_size, minimum=1, example="e.g. 8")
        check_int("grad_accum", self.grad_accum, minimum=1, example="e.g. 1")
        check_int("logging_steps", self.logging_steps, minimum=1, example="e.g. 1")
        if self.num_threads is not None:
            check_int(
                "num_threads", self.num_threads, minimum=1, example="e.g. the number of cores"
            )
        if self.max_length is not None and (
            isinstance(self.max_length, bool)
            or not isinstance(self.max_length, int)
            or self.max_length < 8
        ):
            raise ConfigError(
                f"`max_length`={self.max_length}; expected at least 8 tokens, or None to derive "
                "it from the pairs"
            )

    def _check_loss(self) -> None:
        if self.method == "kto" and self.batch_size < 2:
            raise ConfigError(
                f"`batch_size`={self.batch_size} with method 'kto'; KTO estimates its KL term from "
                "mismatched pairs within a batch and needs batch_size >= 2"
            )
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"`beta`={self.beta}; expected a positive number (e.g. 0.1)")
        if self.label_smoothing is not None:
            if not method_of(self.method).takes_label_smoothing:
                takers = [m.name for m in METHOD_TABLE.values() if m.takes_label_smoothing]
                raise ConfigError(
                    f"`label_smoothing`={self.label_smoothing} has no effect with method "
                    f"{self.method!r}; use it with {', '.join(takers)}, or drop it"
                )
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(
                    f"`label_smoothing`={self.label_smoothing}; expected a value in [0, 0.5) "
                    "(e.g. 0.1)"
                )
        if self.rpo_alpha is not None:
            check_number("rpo_alpha", self.rpo_alpha, low=0.0)
            if self.rpo_alpha > 0 and not method_of(self.method).is_dpo:
                raise ConfigError(
                    f"`rpo_alpha`={self.rpo_alpha} with method {self.method!r}; the NLL term "
                    "applies to the DPO losses (cpo and orpo have their own)"
                )
        if self.method == "exo_pair" and self.label_smoothing == 0.0:
            raise ConfigError(
                "`label_smoothing`=0 with method 'exo_pair'; EXO needs > 0 (e.g. 1e-3)"
            )
        if self.precompute_ref and method_of(self.method).reference_free:
            raise ConfigError(
                f"`precompute_ref`=True with method {self.method!r}, which uses no reference "
                "model; drop --precompute-ref"
            )
        if self.pack_pairs and not method_of(self.method).is_dpo:
            raise ConfigError(
                f"`pack_pairs`=True with method {self.method!r}; packing applies to the DPO loss "
                "types only: drop --pack-pairs"
            )

    def _check_engine(self) -> None:
        if self.load_in_4bit and self.merge:
            raise ConfigError(
                "`merge`=True with `load_in_4bit`=True would merge into rounded 4-bit weights; "
                "train without --merge, then merge the adapter into a full-precision base"
            )
        if self.load_in_4bit and self.device is not None and self.device.startswith("cpu"):
            raise ConfigError(
                f"`load_in_4bit`=True with `device`={self.device!r}; 4-bit QLoRA needs a CUDA GPU "
                "(drop --load-in-4bit to train in full precision on CPU)"
            )
        if self.report_to not in REPORT_TO:
            raise ConfigError(
                f"`report_to`={self.report_to!r}; expected one of {', '.join(REPORT_TO)}"
            )

    @classmethod
    def from_preset(
        cls,
        model: str,
        output_dir: str | os.PathLike[str],
        *,
        preset: str | None = None,
        **overrides: Any,
    ) -> AlignConfig:
        """Build a config from a preset, then apply ``overrides`` (None values are ignored).

        Args:
            model: Model alias, hub id or folder.
            output_dir: Where the adapter goes.
            preset: Preset name; default: the preset named after ``model``, else the
                field defaults.
            **overrides: Any :class:`AlignConfig` field.

        Raises:
            ConfigError: unknown preset or field, or an invalid combination.
        """
        from .presets import get_preset, preset_for_model

        name = preset if preset is not None else None
        chosen = get_preset(preset) if preset is not None else preset_for_model(model)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown align option(s): {', '.join(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        values: dict[str, Any] = dict(chosen.values) if chosen is not None else {}
        if "max_steps" in given or "epochs" in given:
            values.pop("max_steps", None)
            values.pop("epochs", None)
        method = method_of(str(given.get("method", "dpo")))
        if method.reference_free and "precompute_ref" not in given:
            values["precompute_ref"] = False
        if not method.is_dpo and "pack_pairs" not in given:
            values["pack_pairs"] = False
        values.update(given)
        values["model"] = model
        values["output_dir"] = str(output_dir)
        values["preset"] = None if chosen is None else (name or model)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (what ``align_config.json`` records)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["target_modules"] = list(self.target_modules)
        out["trl_args"] = dict(self.trl_args)
        return out
