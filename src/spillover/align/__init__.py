"""Preference pairs and preference alignment with TRL trainers and a PEFT LoRA adapter.

Modules: ``prefs`` (pairs from BBQ items and the held-out split), ``config``
(:class:`AlignConfig`), ``presets`` (per-model defaults), ``trainer`` (the TRL and PEFT
configs and the trainer), ``trl_args`` (other TRL settings passed through), ``packing``
(pair packing), ``train`` (:func:`train_adapter`, checkpoints and resuming)
and ``diagnostics`` (reward accuracy of an adapter). Import from this package, not from
those modules. This is the only package that builds TRL trainers or PEFT training
configs; importing it loads neither torch nor TRL.
"""

from __future__ import annotations

from .config import (
    DPO_LOSSES,
    INTERVALS,
    METHODS,
    OTHER_METHODS,
    REFERENCE_FREE,
    REPORT_TO,
    AlignConfig,
)
from .diagnostics import pair_logps, reward_accuracy
from .packing import PackedPairs, install_pair_packing, pack_pairs, pair_packing
from .prefs import (
    HELDOUT_FILE,
    PAIR_COLUMNS,
    PAIRS_KIND,
    PAIRS_META_KEY,
    SPLIT_FILE,
    STRATEGIES,
    TRAIN_FILE,
    Pair,
    PairSet,
    PrefsConfig,
    build_pairs,
    heldout_split,
    heldout_templates,
    on_heldout,
    read_pairs,
    read_split,
    split_scenarios,
    split_targets,
    target_split,
    write_pairs,
)
from .presets import (
    LLAMA_LIKE_MODULES,
    PRESET_FIELDS,
    PRESETS,
    Preset,
    get_preset,
    preset_for_model,
)
from .train import (
    CHECKPOINTS_KIND,
    LOGS_DIR,
    AdapterRef,
    checkpoint_dir,
    last_checkpoint,
    load_for_training,
    load_heldout_frame,
    load_pair_frame,
    train_adapter,
    training_digest,
)
from .trainer import (
    TrainProgress,
    build_trainer,
    check_environment,
    eval_rows,
    longest_pair_tokens,
    lora_config,
    strip_duplicate_special_tokens,
    to_trl_dataset,
    trainer_classes,
    trl_config,
    used_rows,
)
from .trl_args import SET_BY_SPILLOVER, check_trl_args, parse_trl_arg

__all__ = [
    "CHECKPOINTS_KIND",
    "DPO_LOSSES",
    "HELDOUT_FILE",
    "INTERVALS",
    "LLAMA_LIKE_MODULES",
    "LOGS_DIR",
    "METHODS",
    "OTHER_METHODS",
    "PAIRS_KIND",
    "PAIRS_META_KEY",
    "PAIR_COLUMNS",
    "PRESETS",
    "PRESET_FIELDS",
    "REFERENCE_FREE",
    "REPORT_TO",
    "SET_BY_SPILLOVER",
    "SPLIT_FILE",
    "STRATEGIES",
    "TRAIN_FILE",
    "AdapterRef",
    "AlignConfig",
    "PackedPairs",
    "Pair",
    "PairSet",
    "PrefsConfig",
    "Preset",
    "TrainProgress",
    "build_pairs",
    "build_trainer",
    "check_environment",
    "check_trl_args",
    "checkpoint_dir",
    "eval_rows",
    "get_preset",
    "heldout_split",
    "heldout_templates",
    "install_pair_packing",
    "last_checkpoint",
    "load_for_training",
    "load_heldout_frame",
    "load_pair_frame",
    "longest_pair_tokens",
    "lora_config",
    "on_heldout",
    "pack_pairs",
    "pair_logps",
    "pair_packing",
    "parse_trl_arg",
    "preset_for_model",
    "read_pairs",
    "read_split",
    "reward_accuracy",
    "split_scenarios",
    "split_targets",
    "strip_duplicate_special_tokens",
    "target_split",
    "to_trl_dataset",
    "train_adapter",
    "trainer_classes",
    "training_digest",
    "trl_config",
    "used_rows",
    "write_pairs",
]
