"""Model presets: documented LoRA and preference-training defaults per model.

A preset is a set of :class:`~spillover.align.AlignConfig` field values applied by
:meth:`AlignConfig.from_preset` before the user's own values; a model without a preset
gets the config's field defaults. The values are documented in ``docs/align.md`` (keep
both in step). The CPU speed settings of ``smollm2-135m`` (reference log-probs
precomputed once, no gradient checkpointing, float32 without autocast) are measured in
``docs/benchmarks.md``; they are ordinary defaults, not benchmark tricks.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..errors import ConfigError
from ..models import model_info

LLAMA_LIKE_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Attention and MLP projections of Llama-style decoders (Llama, Mistral, Qwen2, SmolLM2)."""


@dataclass(frozen=True)
class Preset:
    """Defaults for one model (named by its alias in :data:`spillover.models.MODEL_TABLE`)."""

    note: str
    """Why these values."""
    values: Mapping[str, Any] = field(default_factory=dict)
    """:class:`~spillover.align.AlignConfig` field values the preset sets."""


# Published DPO-LoRA practice for 7B models: the alignment-handbook's Zephyr-7B-beta DPO
# QLoRA recipe (Tunstall et al. 2023, recipes/zephyr-7b-beta/dpo/config_qlora.yaml: LoRA
# r 16, alpha 16, dropout 0.05 on every projection, lr 5e-6, cosine schedule, 10 % warm-up,
# one epoch) with DPO's own beta 0.1 (Rafailov et al. 2023; the recipe's 0.01 was chosen
# for UltraFeedback's long responses, BBQ answers are a few tokens).
_GPU_7B: Mapping[str, Any] = MappingProxyType(
    {
        "lora_r": 16,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "target_modules": LLAMA_LIKE_MODULES,
        "learning_rate": 5e-6,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "beta": 0.1,
        "batch_size": 4,
        "grad_accum": 4,
        "precompute_ref": True,
        "gradient_checkpointing": True,
        # no "bf16": a preset's value would count as the user's choice, and a plain
        # `accelerate launch` (mixed_precision 'no') would then be refused; left unset, bf16
        # autocast is on wherever bf16 is fast (every bf16 GPU) unless the launch config says no
        "pack_pairs": True,
        "dtype": "auto",
        "epochs": 1.0,
    }
)
"""The paper-sized (7-8B) models: one GPU in bfloat16 (``dtype`` auto), LoRA on every
projection; bf16 autocast is the automatic default (on for GPUs with bf16)."""

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "smollm2-135m": Preset(
            note="CPU-friendly: 135M parameters train in float32 without checkpointing; "
            "learning rate, steps and batch chosen by bench/preset_sweep.py on held-out "
            "scenarios (docs/align.md).",
            values={
                "lora_r": 16,
                "lora_alpha": 32,
                "lora_dropout": 0.05,
                "target_modules": LLAMA_LIKE_MODULES,
                "learning_rate": 5e-4,
                "beta": 0.1,
                "batch_size": 4,
                "grad_accum": 1,
                "precompute_ref": True,
                "gradient_checkpointing": False,
                "pack_pairs": True,
                "dtype": "float32",
                "max_steps": 80,
            },
        ),
        "mistral-7b": Preset(
            note="One 24-80 GB GPU in bfloat16; add --load-in-4bit (QLoRA) below ~24 GB.",
            values=_GPU_7B,
        ),
        "llama-3.1-8b": Preset(
            note="Gated on the hub (accept the licence, then `huggingface-cli login`).",
            values=_GPU_7B,
        ),
        "qwen-2.5-7b": Preset(
            note="Qwen2.5 has no BOS token; nothing is prepended to prompts.",
            values=_GPU_7B,
        ),
    }
)
"""Presets by name (the model aliases of :data:`spillover.models.MODEL_TABLE`; a test
checks that every alias has one)."""

PRESET_FIELDS: frozenset[str] = frozenset(k for p in PRESETS.values() for k in p.values)
"""AlignConfig fields some preset sets (marked [preset] in ``spillover align --help``)."""


def get_preset(name: str) -> Preset:
    """Look a preset up by name.

    Raises:
        ConfigError: unknown name, with a near match.
    """
    if name in PRESETS:
        return PRESETS[name]
    near = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise ConfigError(f"unknown preset {name!r}{hint}; expected one of {', '.join(PRESETS)}")


def preset_for_model(model: str) -> Preset | None:
    """The preset of ``model`` (its alias or hub id), else None (the field defaults)."""
    info = model_info(model)
    return PRESETS.get(info.alias) if info is not None else None
