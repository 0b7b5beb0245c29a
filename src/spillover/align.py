"""Preference alignment with TRL trainers and a PEFT LoRA adapter.

This is the only module that imports ``trl`` and builds ``peft`` training
configs: :class:`AlignConfig` is turned into ``trl.DPOConfig`` (or the KTO,
CPO or ORPO config) and ``peft.LoraConfig`` here and nowhere else.

Methods (``--method``):

* DPO loss types of ``trl.DPOTrainer``: ``dpo`` (= ``sigmoid``), ``ipo``,
  ``robust``, ``hinge``, ``apo_zero``, ``apo_down``, ``exo_pair``, ``nca_pair``,
  ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``discopop``,
  ``sigmoid_norm``.
* ``kto``: ``trl.KTOTrainer`` on unpaired data (each pair becomes a desirable
  and an undesirable completion).
* ``cpo``, ``simpo`` (CPO with ``loss_type="simpo"``, ``cpo_alpha=0``) and
  ``orpo``: reference-free trainers of ``trl.experimental``.

Reference model: the base model with the adapter disabled (TRL's behaviour for
a PEFT model with ``ref_model=None``); no second copy of the model is loaded.
When training continues from a saved adapter (``adapter=``), TRL keeps a frozen
copy of the loaded LoRA weights (adapter ``ref``) as the reference, so the
resumed run is anchored at the adapter it starts from.

Tokenization follows TRL's ``DPOTrainer``: the prompt and prompt+completion are
tokenized with the tokenizer's own special tokens, the completion is what
follows their common prefix, and one EOS is appended to every completion. Two
traps are removed after TRL's processing: a second BOS (chat templates that
write the BOS text themselves, with tokenizers that also add one) and a second
EOS (tokenizers that append EOS themselves).

Heavy libraries are imported inside functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_write_json
from .errors import ConfigError, DataError, MissingDependencyError, ModelError
from .presets import GENERIC, Preset, get_preset, preset_for_model

logger = logging.getLogger(__name__)

DPO_LOSSES: Mapping[str, str] = {
    "dpo": "sigmoid",
    "sigmoid": "sigmoid",
    "ipo": "ipo",
    "robust": "robust",
    "hinge": "hinge",
    "apo_zero": "apo_zero",
    "apo_down": "apo_down",
    "exo_pair": "exo_pair",
    "nca_pair": "nca_pair",
    "bco_pair": "bco_pair",
    "sppo_hard": "sppo_hard",
    "aot": "aot",
    "aot_unpaired": "aot_unpaired",
    "discopop": "discopop",
    "sigmoid_norm": "sigmoid_norm",
}
"""``--method`` name -> ``DPOConfig.loss_type`` of ``trl.DPOTrainer``."""

OTHER_METHODS: Mapping[str, tuple[str, str, str, str]] = {
    "kto": ("trl", "KTOConfig", "KTOTrainer", "trl>=0.9 (trl.KTOTrainer)"),
    "cpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer", "trl>=0.8 (trl.CPOTrainer)"),
    "simpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer", "trl>=0.9 (CPO, loss_type=simpo)"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer", "trl>=0.8 (trl.ORPOTrainer)"),
}
"""Other trainers: method -> (module, config class, trainer class, where to get it)."""

_FALLBACK_MODULES = {"trl.experimental.cpo": "trl", "trl.experimental.orpo": "trl"}
"""Older TRL releases export CPO/ORPO from the top level."""

METHODS: tuple[str, ...] = (*DPO_LOSSES, *OTHER_METHODS)
"""Every accepted ``--method``."""

REFERENCE_FREE: frozenset[str] = frozenset({"cpo", "simpo", "orpo"})
"""Methods without a reference model (``precompute_ref`` does not apply)."""

REPORT_TO: tuple[str, ...] = ("none", "tensorboard", "wandb")

ProgressCallback = Callable[[int, int, Mapping[str, float]], None]
"""``progress(step, total_steps, logs)``: called after every optimizer step; ``logs``
holds the latest logged values (``loss``, ``rewards/accuracies``, ...) or is empty."""


def _check_method(method: str) -> str:
    if method in METHODS:
        return method
    norm = method.strip().lower().replace("-", "_")
    if norm in METHODS:
        return norm
    near = difflib.get_close_matches(norm, METHODS, n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"unknown `method`={method!r}{hint}; expected one of {', '.join(METHODS)}")


@dataclass(frozen=True, slots=True)
class AlignConfig:
    """Everything one alignment run needs; validated on creation.

    Build one from a model preset with :meth:`from_preset`; plain construction
    uses the generic defaults of :data:`spillover.presets.GENERIC`.
    """

    model: str
    """Model alias, hub id or local folder."""
    output_dir: str
    """Folder the adapter is written to (created atomically)."""
    method: str = "dpo"
    """Preference method, one of :data:`METHODS`."""
    preset: str | None = None
    """Preset the defaults came from (recorded only)."""
    lora_r: int = GENERIC.lora_r
    """LoRA rank."""
    lora_alpha: int = GENERIC.lora_alpha
    """LoRA alpha (update scale ``alpha / r``)."""
    lora_dropout: float = GENERIC.lora_dropout
    """LoRA dropout."""
    target_modules: tuple[str, ...] = GENERIC.target_modules
    """Modules adapted by LoRA; empty: PEFT's default for the architecture."""
    learning_rate: float = GENERIC.learning_rate
    """AdamW learning rate."""
    epochs: float | None = None
    """Passes over the pairs; used when ``max_steps`` is None (default 1)."""
    max_steps: int | None = None
    """Optimizer steps (exclusive with ``epochs``)."""
    batch_size: int = GENERIC.batch_size
    """Pairs per step and device."""
    grad_accum: int = GENERIC.grad_accum
    """Gradient accumulation steps."""
    beta: float = GENERIC.beta
    """Loss temperature (DPO's beta, IPO's tau, KTO's beta, CPO/ORPO's beta)."""
    label_smoothing: float | None = None
    """Label flip probability of ``robust`` (default 0.1) or EXO's epsilon (default 1e-3)."""
    seed: int = 0
    """Seed of LoRA initialisation, data order and dropout."""
    max_length: int | None = GENERIC.max_length
    """Token limit of prompt + completion; None: the longest pair (no truncation)."""
    load_in_4bit: bool = False
    """QLoRA: load the base in 4-bit NF4 with bitsandbytes (CUDA only)."""
    precompute_ref: bool = GENERIC.precompute_ref
    """Compute reference log-probs once before training (TRL's ``precompute_ref_log_probs``)."""
    gradient_checkpointing: bool = GENERIC.gradient_checkpointing
    """Recompute activations in the backward pass."""
    bf16: bool = GENERIC.bf16
    """bfloat16 mixed precision (autocast)."""
    pack_pairs: bool = GENERIC.pack_pairs
    """DPO methods: compute the prompt shared by chosen and rejected once (exact; see :func:`pack_pairs`)."""
    dtype: str = GENERIC.dtype
    """Parameter dtype of the base model."""
    merge: bool = False
    """Also write the adapter merged into the base weights to ``output_dir/merged``."""
    report_to: str = "none"
    """Experiment tracker: ``none``, ``tensorboard`` or ``wandb``."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:N``; None picks CUDA when available."""
    adapter: str | None = None
    """Saved adapter to continue training from (loaded trainable)."""
    logging_steps: int = 1
    """Log loss and reward metrics every N steps."""
    num_threads: int | None = None
    """CPU threads for torch; None uses every core."""
    overwrite: bool = False
    """Replace an existing ``output_dir``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _check_method(self.method))
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
        _positive_int("lora_r", self.lora_r, "e.g. 16")
        if self.lora_alpha <= 0:
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
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(
                f"`learning_rate`={self.learning_rate}; expected a positive number (e.g. 5e-5)"
            )
        if self.epochs is not None and self.max_steps is not None:
            raise ConfigError(
                f"`epochs`={self.epochs} and `max_steps`={self.max_steps} are both set; "
                "give one of them (max_steps overrides epochs in TRL, which hides mistakes)"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"`epochs`={self.epochs}; expected a positive number of passes")
        if self.max_steps is not None:
            _positive_int("max_steps", self.max_steps, "e.g. 200")
        _positive_int("batch_size", self.batch_size, "e.g. 8")
        _positive_int("grad_accum", self.grad_accum, "e.g. 1")
        _positive_int("logging_steps", self.logging_steps, "e.g. 1")
        if self.method == "kto" and self.batch_size < 2:
            raise ConfigError(
                f"`batch_size`={self.batch_size} with method 'kto'; KTO estimates its KL term from "
                "mismatched pairs within a batch and needs batch_size >= 2"
            )
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"`beta`={self.beta}; expected a positive number (e.g. 0.1)")
        if self.label_smoothing is not None:
            if self.method not in ("robust", "exo_pair", "dpo", "sigmoid", "cpo"):
                raise ConfigError(
                    f"`label_smoothing`={self.label_smoothing} has no effect with method "
                    f"{self.method!r}; use it with robust, exo_pair, dpo or cpo, or drop it"
                )
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(
                    f"`label_smoothing`={self.label_smoothing}; expected a value in [0, 0.5) (e.g. 0.1)"
                )
        if self.method == "exo_pair" and self.label_smoothing == 0.0:
            raise ConfigError(
                "`label_smoothing`=0 with method 'exo_pair'; EXO needs > 0 (e.g. 1e-3)"
            )
        if self.max_length is not None and self.max_length < 8:
            raise ConfigError(
                f"`max_length`={self.max_length}; expected at least 8 tokens, or None to derive it from the pairs"
            )
        if self.precompute_ref and self.method in REFERENCE_FREE:
            raise ConfigError(
                f"`precompute_ref`=True with method {self.method!r}, which uses no reference model; "
                "drop --precompute-ref"
            )
        if self.pack_pairs and self.method not in DPO_LOSSES:
            raise ConfigError(
                f"`pack_pairs`=True with method {self.method!r}; packing applies to the DPO loss "
                "types only: drop --pack-pairs"
            )
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
        if self.num_threads is not None:
            _positive_int("num_threads", self.num_threads, "e.g. the number of cores")

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
            preset: Preset name; default: the preset named after ``model``, else generic.
            **overrides: Any :class:`AlignConfig` field.

        Raises:
            ConfigError: unknown preset or field, or an invalid combination.
        """
        chosen: Preset = get_preset(preset) if preset is not None else preset_for_model(model)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown align option(s): {', '.join(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        base = chosen.to_dict()
        values: dict[str, Any] = {k: base[k] for k in base if k in names and k != "model"}
        values["target_modules"] = tuple(values["target_modules"])
        if "max_steps" in given or "epochs" in given:
            values.pop("max_steps", None)
            values.pop("epochs", None)
        method = _check_method(str(given.get("method", "dpo")))
        if method in REFERENCE_FREE and "precompute_ref" not in given:
            values["precompute_ref"] = False
        if method not in DPO_LOSSES and "pack_pairs" not in given:
            values["pack_pairs"] = False
        values.update(given)
        values["model"] = model
        values["output_dir"] = str(output_dir)
        values["preset"] = None if chosen is GENERIC else (preset or model)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view (what ``align_config.json`` records)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["target_modules"] = list(self.target_modules)
        return out


def _positive_int(name: str, value: int, example: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"`{name}`={value!r}; expected a positive integer ({example})")


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


# --------------------------------------------------------------------------- checks


def check_environment(cfg: AlignConfig) -> str:
    """Check what the config needs from this machine; return the device to use.

    Raises:
        ConfigError: CUDA asked for but absent; 4-bit without CUDA.
        MissingDependencyError: bitsandbytes, tensorboard or wandb missing, or the
            method's trainer absent from the installed TRL.
    """
    from .models import resolve_device

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
    trainer_classes(cfg.method)
    return device


def trainer_classes(method: str) -> tuple[Any, Any]:
    """The (config class, trainer class) of a method in the installed TRL.

    Raises:
        MissingDependencyError: the installed TRL lacks that trainer.
    """
    import trl

    method = _check_method(method)
    if method in DPO_LOSSES:
        return trl.DPOConfig, _patched_trainer(trl.DPOTrainer)  # type: ignore[attr-defined]
    module, cfg_name, trainer_name, where = OTHER_METHODS[method]
    for mod_name in (module, _FALLBACK_MODULES.get(module)):
        if mod_name is None:
            continue
        try:
            with _quiet_experimental():
                mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        cfg_cls, trainer_cls = getattr(mod, cfg_name, None), getattr(mod, trainer_name, None)
        if cfg_cls is not None and trainer_cls is not None:
            if method == "kto":
                trainer_cls = _patched_trainer(trainer_cls)
            return cfg_cls, trainer_cls
    raise MissingDependencyError(
        f"method {method!r} needs TRL's {trainer_name}, which the installed trl "
        f"{trl.__version__} does not provide; it is in {where}: pip install -U trl"
    )


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


@contextlib.contextmanager
def _quiet_experimental() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental.*")
        yield


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


# --------------------------------------------------------------------------- pair packing

_PACKING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "spillover_pair_packing", default=False
)


@dataclass(frozen=True)
class PackedPairs:
    """A ``[chosen; rejected]`` batch packed into one row per pair."""

    input_ids: Any
    """``(B, L')`` token ids: chosen tokens, then the rejected tokens after the shared prefix."""
    position_ids: Any
    """``(B, L')`` positions in the original sequences."""
    attention_mask: Any
    """``(B, 1, L', L')`` mask: rejected tokens see the shared prefix and themselves, not the chosen ones."""
    gather: Any
    """``(2B * L,)`` index into the flattened packed hidden states giving the unpacked layout."""
    valid: Any
    """``(2B, L)`` the unpacked positions that hold a real token."""


def pack_pairs(
    input_ids: Any, attention_mask: Any, *, bool_mask: bool, dtype: Any = None
) -> PackedPairs:
    """Pack a DPO batch (rows ``i`` and ``B + i`` are the chosen and rejected sequence of pair ``i``).

    Both sequences of a pair share their prompt (and often the first completion
    tokens). The packed row holds the chosen sequence followed by the rejected
    tokens after the longest common prefix; a tree-shaped attention mask and
    the original position ids make every token's hidden state identical to the
    unpacked computation, while the shared prefix is computed once. Sequences
    must be right-padded (TRL's collator pads right).
    """
    import torch

    n2, width = input_ids.shape
    n = n2 // 2
    lengths = attention_mask.sum(dim=1).tolist()
    ids_cpu = input_ids.tolist()
    rows: list[list[int]] = []
    pos_rows: list[list[int]] = []
    spans: list[tuple[int, int, int]] = []
    for i in range(n):
        a, b = int(lengths[i]), int(lengths[n + i])
        ca, cb = ids_cpu[i][:a], ids_cpu[n + i][:b]
        c = 0
        limit = min(a, b) - 1  # keep at least one own token per sequence
        while c < limit and ca[c] == cb[c]:
            c += 1
        rows.append(ca + cb[c:])
        pos_rows.append(list(range(a)) + list(range(c, b)))
        spans.append((a, b, c))
    packed_len = max(len(r) for r in rows)
    device = input_ids.device
    pad = int(input_ids[0, -1]) if width else 0
    ids = torch.full((n, packed_len), pad, dtype=input_ids.dtype)
    pos = torch.zeros((n, packed_len), dtype=torch.long)
    allowed = torch.zeros((n, packed_len, packed_len), dtype=torch.bool)
    gather = torch.zeros((n2, width), dtype=torch.long)
    valid = torch.zeros((n2, width), dtype=torch.bool)
    causal = torch.ones((packed_len, packed_len), dtype=torch.bool).tril()
    for i, (a, b, c) in enumerate(spans):
        m = len(rows[i])
        ids[i, :m] = torch.tensor(rows[i], dtype=input_ids.dtype)
        pos[i, :m] = torch.tensor(pos_rows[i])
        blk = allowed[i]
        blk[:a, :a] = causal[:a, :a]
        r = m - a  # rejected suffix length
        if r:
            blk[a:m, :c] = True
            blk[a:m, a:m] = causal[:r, :r]
        for j in range(m, packed_len):  # padding rows attend to themselves (no empty softmax)
            blk[j, j] = True
        base = i * packed_len
        gather[i, :a] = torch.arange(base, base + a)
        gather[n + i, :c] = torch.arange(base, base + c)
        gather[n + i, c:b] = torch.arange(base + a, base + m)
        valid[i, :a] = True
        valid[n + i, :b] = True
    mask4d = allowed.unsqueeze(1)
    if not bool_mask:
        fill = torch.finfo(dtype or torch.float32).min
        mask4d = torch.zeros(mask4d.shape, dtype=dtype or torch.float32).masked_fill(~mask4d, fill)
    return PackedPairs(
        ids.to(device),
        pos.to(device),
        mask4d.to(device),
        gather.reshape(-1).to(device),
        valid.to(device),
    )


@contextlib.contextmanager
def pair_packing(model: Any) -> Any:
    """Within this context, forward passes of ``model`` on ``[chosen; rejected]`` batches are packed.

    The decoder backbone of ``model`` gets a wrapper (installed once) that packs
    the batch with :func:`pack_pairs`, runs the original backbone, and returns
    hidden states in the unpacked layout, so the LM head, log-probs and losses
    of the trainer are unchanged. Outside the context the wrapper passes through.
    """
    install_pair_packing(model)
    token = _PACKING.set(True)
    try:
        yield
    finally:
        _PACKING.reset(token)


def _backbone(model: Any) -> Any:
    inner = model
    for _ in range(4):  # accelerate / PEFT wrappers
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module"):
            inner = inner.module
        else:
            break
    prefix = getattr(inner, "base_model_prefix", "model")
    return inner, getattr(inner, prefix, None)


def install_pair_packing(model: Any) -> bool:
    """Wrap the backbone of ``model`` for :func:`pair_packing`; False when the architecture is unsupported.

    Supported: decoder-only models using ``sdpa`` or ``eager`` attention whose
    backbone accepts ``position_ids`` and a 4D attention mask (Llama, Mistral,
    Qwen2, SmolLM2 and most transformers decoders).
    """
    inner, backbone = _backbone(model)
    if backbone is None or backbone is inner:
        return False
    if getattr(backbone, "_spillover_packing", False):
        return True
    impl = getattr(inner.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        logger.warning("pair packing is off: attention %r does not take a 4D mask", impl)
        return False
    original = backbone.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if (
            not _PACKING.get()
            or args
            or input_ids is None
            or mask is None
            or mask.ndim != 2
            or input_ids.shape[0] % 2
            or kwargs.get("past_key_values") is not None
            or kwargs.get("inputs_embeds") is not None
            or kwargs.get("position_ids") is not None
        ):
            return original(*args, **kwargs)
        packed = pack_pairs(
            input_ids, mask, bool_mask=impl == "sdpa", dtype=next(backbone.parameters()).dtype
        )
        call = dict(kwargs)
        call.update(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        )
        out = original(**call)
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        unpacked = flat.index_select(0, packed.gather).view(*input_ids.shape, hidden.shape[-1])
        out.last_hidden_state = unpacked * packed.valid.unsqueeze(-1).to(unpacked.dtype)
        return out

    backbone.forward = forward
    backbone._spillover_packing = True
    _install_compact_head(inner, backbone)
    return True


def _install_compact_head(inner: Any, backbone: Any) -> None:
    """Score only completion positions in TRL's fused LM head while packing is active.

    TRL's fused head projects only labelled positions on Triton devices but every
    position elsewhere (CPU included). Within :func:`pair_packing`, this wrapper
    runs the backbone, then TRL's own ``ChunkedLogProbFunction`` on the labelled
    positions alone and scatters the results back, which is the computation TRL
    does on GPUs. Models with logit scaling or soft-capping keep TRL's path.
    """
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:  # pragma: no cover - other TRL layouts: keep TRL's head
        return
    text_config = inner.config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier"):
        if getattr(text_config, attr, None) not in (None, 1.0):
            return
    if getattr(text_config, "lm_head_multiplier", None) is not None:
        return
    if getattr(text_config, "logits_scaling", None) is not None:
        return
    fused = inner.forward
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")

    def forward(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if (
            not _PACKING.get()
            or args
            or not kwargs.get("fused_lm_head")
            or labels is None
            or kwargs.get("shift_labels") is not None
            or kwargs.get("output_router_logits")
            or getattr(text_config, "output_router_logits", False)
        ):
            return fused(*args, **kwargs)
        call = {
            k: v
            for k, v in kwargs.items()
            if k not in ("fused_lm_head", "labels", "num_items_in_batch")
        }
        call["use_cache"] = False
        hidden = backbone(**call).last_hidden_state[:, :-1]
        shifted = labels[:, 1:]
        lm_head = inner.get_output_embeddings()
        hidden = hidden.to(lm_head.weight.device)
        shifted = shifted.to(lm_head.weight.device)
        mask = shifted != -100
        per_token = ChunkedLogProbFunction.apply(  # type: ignore[no-untyped-call]
            hidden[mask],
            lm_head.weight,
            lm_head.bias,
            shifted[mask],
            1.0,
            32768,
            None,
            1.0,
            outputs,
        )
        log_probs, entropy, _, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
            for x in per_token
        )
        n_items = kwargs.get("num_items_in_batch")
        denom = mask.sum().clamp(min=1) if n_items is None else n_items
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denom,  # type: ignore[union-attr]
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=None,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
            aux_loss=None,
        )

    inner.forward = forward


# --------------------------------------------------------------------------- data


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


# --------------------------------------------------------------------------- model


def load_for_training(cfg: AlignConfig, device: str) -> tuple[Any, Any, dict[str, Any]]:
    """Load the base model (optionally 4-bit) and tokenizer; apply a saved adapter if asked.

    Returns:
        ``(model, tokenizer, provenance)``; the model is a trainable PEFT model
        when ``cfg.adapter`` is set, else the plain base model.
    """
    from .models import load_model

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

    from .models import _weights_location, load_tokenizer, resolve_model

    spec = resolve_model(cfg.model)
    bnb = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            _weights_location(spec, None),
            quantization_config=bnb,
            dtype=torch.bfloat16,
            device_map={"": device},
        )
    except OSError as exc:
        raise ModelError(f"could not load model {cfg.model!r}: {exc}") from None
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


def trl_config(
    cfg: AlignConfig, output_dir: str | os.PathLike[str], *, device: str, max_length: int | None
) -> Any:
    """The TRL training config (``DPOConfig``, ``KTOConfig``, ``CPOConfig`` or ``ORPOConfig``)."""
    config_cls, _ = trainer_classes(cfg.method)
    steps: dict[str, Any] = (
        {"max_steps": cfg.max_steps}
        if cfg.max_steps is not None
        else {"num_train_epochs": cfg.epochs if cfg.epochs is not None else 1.0}
    )
    kwargs: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.learning_rate,
        "beta": cfg.beta,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "max_length": max_length,
        _checkpointing_key(): cfg.gradient_checkpointing,
        "bf16": cfg.bf16,
        "fp16": False,
        "use_cpu": device == "cpu",
        "report_to": [] if cfg.report_to == "none" else [cfg.report_to],
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "save_strategy": "no",
        "eval_strategy": "no",
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": device != "cpu",
        "disable_tqdm": True,
        **steps,
    }
    if cfg.method in DPO_LOSSES:
        kwargs["loss_type"] = [DPO_LOSSES[cfg.method]]
        kwargs["precompute_ref_log_probs"] = cfg.precompute_ref
        smoothing = cfg.label_smoothing
        if smoothing is None:
            smoothing = {"robust": 0.1, "exo_pair": 1e-3}.get(cfg.method, 0.0)
        kwargs["label_smoothing"] = smoothing
    elif cfg.method == "kto":
        kwargs["precompute_ref_log_probs"] = cfg.precompute_ref
    elif cfg.method in ("cpo", "simpo"):
        kwargs["loss_type"] = "simpo" if cfg.method == "simpo" else "sigmoid"
        if cfg.method == "simpo":
            kwargs["cpo_alpha"] = 0.0
        if cfg.label_smoothing is not None:
            kwargs["label_smoothing"] = cfg.label_smoothing
    with _quiet_experimental():
        return config_cls(**kwargs)


class _ProgressCallbackAdapter:
    """Factory of a ``transformers.TrainerCallback`` forwarding steps and logs to a function."""

    @staticmethod
    def make(progress: ProgressCallback) -> Any:
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
    progress: ProgressCallback | None = None,
    shared_data_dir: Path | None = None,
) -> Any:
    """Construct the TRL trainer of a run (data processed; reference log-probs precomputed if set).

    Args:
        model: Base model, or a PEFT model when continuing from an adapter.
        tokenizer: Its tokenizer.
        pairs: DataFrame with ``prompt``, ``chosen``, ``rejected``.
        cfg: The run's settings.
        output_dir: Scratch folder for the trainer (nothing is saved there by default).
        device: Device the model is on.
        progress: Step callback.
        shared_data_dir: With several processes, a folder all of them see: the pairs are
            saved there so that the datasets cache files TRL writes on the main process
            (tokenised rows, precomputed reference log-probs) are found by the others (an
            in-memory dataset caches under a per-process temporary folder instead).
    """
    from accelerate import PartialState
    from peft import PeftModel

    _, trainer_cls = trainer_classes(cfg.method)
    state = PartialState()
    dataset = used_rows(to_trl_dataset(pairs, cfg.method), cfg, state.num_processes)
    if shared_data_dir is not None:
        from datasets import Dataset

        with state.main_process_first():
            if state.is_main_process:
                dataset.save_to_disk(str(shared_data_dir))
        dataset = Dataset.load_from_disk(str(shared_data_dir))
    longest = longest_pair_tokens(dataset, tokenizer)
    max_length = cfg.max_length if cfg.max_length is not None else longest
    if max_length < longest:
        logger.warning("max_length=%d truncates the longest pairs (%d tokens)", max_length, longest)
    args = trl_config(cfg, output_dir, device=device, max_length=max_length)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {
        "model": model,
        "args": args,
        "train_dataset": dataset,
        "processing_class": tokenizer,
    }
    if not isinstance(model, PeftModel):
        kwargs["peft_config"] = lora_config(cfg)
    if cfg.method in DPO_LOSSES or cfg.method == "kto":
        kwargs["ref_model"] = None
    if progress is not None:
        kwargs["callbacks"] = [_ProgressCallbackAdapter.make(progress)]
    if cfg.method in DPO_LOSSES:
        kwargs["pack_pairs"] = cfg.pack_pairs
    with _quiet_experimental(), _no_dataset_progress_bars():
        trainer = trainer_cls(**kwargs)
    # the library never prints: drop the Trainer's console printer / tqdm bar
    from transformers import trainer_callback

    trainer.remove_callback(trainer_callback.PrinterCallback)
    trainer.remove_callback(trainer_callback.ProgressCallback)
    return trainer


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


# --------------------------------------------------------------------------- training


def train_adapter(
    pairs: Any, cfg: AlignConfig, *, progress: ProgressCallback | None = None
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
        pairs: Pairs folder, :class:`~spillover.prefs.PairSet` or DataFrame.
        cfg: Run settings.
        progress: ``progress(step, total, logs)`` after every step.

    Raises:
        ConfigError, DataError, MissingDependencyError, ModelError.
    """
    import torch

    target = Path(cfg.output_dir).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not cfg.overwrite:
        raise ConfigError(f"{target}: already exists; choose another --out or pass --overwrite")
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
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
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
        trained = trainer.model
        # collective under several processes (gathers ZeRO-3 / FSDP shards); only the main
        # process writes
        trainer.save_model(str(tmp))
        if not main:
            state.wait_for_everyone()  # the main process finishes the folder
            return _adapter_ref(target, cfg, trainer, history, None, seconds, cpu_seconds)
        (tmp / "training_args.bin").unlink(missing_ok=True)
        shutil.rmtree(tmp / "ref", ignore_errors=True)  # a resumed run's frozen reference
        shutil.rmtree(tmp / "_data", ignore_errors=True)
        tok.save_pretrained(str(tmp))
        shutil.rmtree(tmp / "_trainer", ignore_errors=True)
        atomic_write_json(tmp / "log_history.json", _jsonable(history))
        atomic_write_json(
            tmp / "align_config.json",
            {
                "config": cfg.to_dict(),
                "lora": _jsonable(lora_config(cfg).to_dict()),
                "trainer": type(trainer).__mro__[1].__name__,
                "trl_args": _jsonable(_trl_args_summary(trainer.args)),
                "max_length": trainer.args.max_length,
            },
        )
        atomic_write_json(
            tmp / "provenance.json",
            _jsonable(
                {
                    "model": model_prov,
                    "bbq": split.get("provenance", {}).get("bbq"),
                    "pairs": {
                        "dir": split.get("pairs_dir"),
                        "config": split.get("config"),
                        "counts": split.get("counts"),
                        "heldout_templates": split.get("heldout_templates"),
                    },
                    "warnings": split.get("warnings", []),
                    "versions": _versions(),
                    "train_seconds": seconds,
                    "steps": trainer.state.global_step,
                }
            ),
        )
        merged_dir: Path | None = None
        if cfg.merge:
            merged_dir = target / "merged"
            _merge(trained, tok, tmp / "merged")
        tmp.chmod(0o755)
        from .prefs import _replace_dir

        _replace_dir(tmp, target)
        if distributed:
            state.wait_for_everyone()
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _adapter_ref(target, cfg, trainer, history, merged_dir, seconds, cpu_seconds)


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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for pkg in ("spillover", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


# --------------------------------------------------------------------------- scoring


def pair_logps(
    model: Any, tokenizer: Any, pairs: Any, *, batch_size: int = 16
) -> tuple[list[float], list[float]]:
    """Summed log-probs of each pair's chosen and rejected completion, tokenized as TRL does.

    Completions carry one EOS, like in training. Runs under ``torch.no_grad``
    in the model's current adapter state.

    Returns:
        ``(chosen_logps, rejected_logps)``, one value per pair.
    """
    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[list[int], int]] = []
    for prompt, chosen, rejected in zip(
        pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True
    ):
        p_ids = tokenizer(str(prompt))["input_ids"]
        for completion in (chosen, rejected):
            text = str(completion)
            if eos and not text.endswith(eos):
                text += eos
            full = tokenizer(str(prompt) + text)["input_ids"]
            n = 0
            while n < min(len(p_ids), len(full)) and p_ids[n] == full[n]:
                n += 1
            ex = strip_duplicate_special_tokens(
                {"prompt_ids": full[:n], "chosen_ids": full[n:]},
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
            )
            seqs.append((ex["prompt_ids"] + ex["chosen_ids"], len(ex["prompt_ids"])))
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                width = max(len(s) for s, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                comp = torch.zeros((len(chunk), width), dtype=torch.bool)
                for j, (s, start) in enumerate(chunk):
                    ids[j, : len(s)] = torch.tensor(s)
                    mask[j, : len(s)] = 1
                    comp[j, start : len(s)] = True
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
                summed = (tok_lp * comp[:, 1:].to(device)).sum(-1)
                out.extend(float(v) for v in summed.cpu())
    finally:
        if was_training:
            model.train()
    return out[0::2], out[1::2]


def reward_accuracy(
    model: Any, tokenizer: Any, pairs: Any, *, beta: float = 0.1, batch_size: int = 16
) -> dict[str, float]:
    """DPO implicit-reward accuracy of a PEFT model on pairs (adapter vs adapter disabled).

    The implicit reward of a completion is ``beta * (logp_policy - logp_reference)``
    with the reference being the same model with its adapter disabled; a pair
    counts as correct when the chosen reward exceeds the rejected one. Also
    returns the policy's own preference accuracy (``logp_chosen > logp_rejected``),
    which is meaningful before training too.

    Returns:
        ``reward_accuracy``, ``reward_margin`` (mean), ``policy_accuracy``,
        ``reference_accuracy`` and ``n``.
    """
    pc, pr = pair_logps(model, tokenizer, pairs, batch_size=batch_size)
    with model.disable_adapter():
        rc, rr = pair_logps(model, tokenizer, pairs, batch_size=batch_size)
    margins = [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr, strict=True)]
    n = len(margins)
    return {
        "reward_accuracy": sum(m > 0 for m in margins) / n if n else float("nan"),
        "reward_margin": sum(margins) / n if n else float("nan"),
        "policy_accuracy": sum(a > b for a, b in zip(pc, pr, strict=True)) / n
        if n
        else float("nan"),
        "reference_accuracy": sum(a > b for a, b in zip(rc, rr, strict=True)) / n
        if n
        else float("nan"),
        "n": float(n),
    }


def read_log_history(adapter_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The ``log_history.json`` of a trained adapter folder."""
    path = Path(adapter_dir) / "log_history.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; not an adapter folder written by `spillover align`")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of log entries")
    return data


__all__ = [
    "DPO_LOSSES",
    "METHODS",
    "OTHER_METHODS",
    "REFERENCE_FREE",
    "AdapterRef",
    "AlignConfig",
    "ProgressCallback",
    "build_trainer",
    "check_environment",
    "load_for_training",
    "load_pair_frame",
    "longest_pair_tokens",
    "lora_config",
    "pair_logps",
    "read_log_history",
    "reward_accuracy",
    "strip_duplicate_special_tokens",
    "to_trl_dataset",
    "train_adapter",
    "trainer_classes",
    "trl_config",
    "used_rows",
]
