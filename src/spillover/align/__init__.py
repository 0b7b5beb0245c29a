"""Preference pairs and preference alignment with TRL trainers and a PEFT LoRA adapter.

Modules: ``prefs`` (:class:`PrefsConfig`, pairs from BBQ items, the held-out split,
:func:`make_pairs`), ``methods`` (the one method table), ``config`` (:class:`AlignConfig`),
``presets`` (per-model defaults), ``trl_args`` (other TRL settings passed through),
``trainer`` (the TRL and PEFT configs and the trainer), ``packing`` (pair packing),
``sharding`` (multi-process launches), ``train`` (:func:`train_adapter`, checkpoints and
resuming) and ``diagnostics`` (reward accuracy of an adapter). Other packages import from
this face, not from those modules. This is the only package that builds TRL trainers or
PEFT training configs; importing it loads neither torch nor TRL.
"""

from __future__ import annotations

from .config import REPORT_TO, AlignConfig
from .methods import METHODS
from .prefs import (
    PrefsConfig,
    build_pairs,
    heldout_for,
    make_pairs,
    probe_target_split,
    target_split,
)
from .presets import PRESET_FIELDS
from .train import train_adapter
from .trainer import check_environment
from .trl_args import parse_trl_arg, resolve_trl_args

__all__ = [
    "METHODS",
    "PRESET_FIELDS",
    "REPORT_TO",
    "AlignConfig",
    "PrefsConfig",
    "build_pairs",
    "check_environment",
    "heldout_for",
    "make_pairs",
    "parse_trl_arg",
    "probe_target_split",
    "resolve_trl_args",
    "target_split",
    "train_adapter",
]
