"""Model presets: documented LoRA and preference-training defaults per model.

A preset fills every :class:`spillover.align.AlignConfig` field the user did not
set. The values are documented in ``docs/align.md`` (keep both in step). The
CPU speed settings of ``smollm2-135m`` (reference log-probs precomputed once,
no gradient checkpointing, float32 without autocast) are measured in
``docs/benchmarks.md``; they are ordinary defaults, not benchmark tricks.

This module imports nothing heavy; the YAML configuration reads the same table.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

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


@dataclass(frozen=True, slots=True)
class Preset:
    """Defaults for one model; every field maps to the AlignConfig field of the same name."""

    model: str
    """Model alias or hub id the preset is for."""
    lora_r: int
    """LoRA rank."""
    lora_alpha: int
    """LoRA scaling numerator (the update is scaled by ``alpha / r``)."""
    lora_dropout: float
    """LoRA dropout (note: TRL's ``disable_dropout=True`` zeroes it during DPO training)."""
    target_modules: tuple[str, ...]
    """Modules that get a LoRA adapter."""
    learning_rate: float
    """AdamW learning rate."""
    beta: float
    """Preference loss temperature (DPO's beta; IPO's tau)."""
    batch_size: int
    """Pairs per device step."""
    grad_accum: int
    """Gradient accumulation steps (effective batch = batch_size * grad_accum)."""
    max_length: int | None
    """Token limit of prompt + completion; None derives it from the pairs (no truncation)."""
    precompute_ref: bool
    """Compute reference log-probs once before training instead of every step."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass (saves memory, costs ~30% time)."""
    bf16: bool
    """bfloat16 mixed precision (autocast)."""
    pack_pairs: bool
    """DPO: compute each pair's shared prompt once instead of twice (exact)."""
    dtype: str
    """Parameter dtype the base model is loaded in (``auto``: float32 on CPU, bfloat16 on CUDA)."""
    epochs: float | None
    """Passes over the training pairs when ``max_steps`` is not given."""
    max_steps: int | None
    """Optimizer steps; overrides ``epochs`` when set."""
    note: str = ""
    """Why these values."""

    def to_dict(self) -> dict[str, Any]:
        """Plain view (lists instead of tuples)."""
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out


_PRESETS = {
    "smollm2-135m": Preset(
        model="smollm2-135m",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LLAMA_LIKE_MODULES,
        learning_rate=5e-4,
        beta=0.1,
        batch_size=8,
        grad_accum=1,
        max_length=None,
        precompute_ref=True,
        gradient_checkpointing=False,
        bf16=True,
        pack_pairs=True,
        dtype="float32",
        epochs=None,
        max_steps=200,
        note="CPU-friendly: 135M parameters train in float32 without checkpointing; "
        "a high LoRA learning rate so a short run moves the model.",
    ),
    "mistral-7b": Preset(
        model="mistralai/Mistral-7B-Instruct-v0.3",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LLAMA_LIKE_MODULES,
        learning_rate=2e-5,
        beta=0.1,
        batch_size=4,
        grad_accum=4,
        max_length=None,
        precompute_ref=True,
        gradient_checkpointing=True,
        bf16=True,
        pack_pairs=True,
        dtype="auto",
        epochs=1.0,
        max_steps=None,
        note="One 24-80 GB GPU in bfloat16; add --load-in-4bit (QLoRA) below ~24 GB.",
    ),
    "llama-3.1-8b": Preset(
        model="meta-llama/Llama-3.1-8B-Instruct",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LLAMA_LIKE_MODULES,
        learning_rate=2e-5,
        beta=0.1,
        batch_size=4,
        grad_accum=4,
        max_length=None,
        precompute_ref=True,
        gradient_checkpointing=True,
        bf16=True,
        pack_pairs=True,
        dtype="auto",
        epochs=1.0,
        max_steps=None,
        note="Gated on the hub (accept the licence, then `huggingface-cli login`).",
    ),
    "qwen-2.5-7b": Preset(
        model="Qwen/Qwen2.5-7B-Instruct",
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules=LLAMA_LIKE_MODULES,
        learning_rate=2e-5,
        beta=0.1,
        batch_size=4,
        grad_accum=4,
        max_length=None,
        precompute_ref=True,
        gradient_checkpointing=True,
        bf16=True,
        pack_pairs=True,
        dtype="auto",
        epochs=1.0,
        max_steps=None,
        note="Qwen2.5 has no BOS token; nothing is prepended to prompts.",
    ),
}

PRESETS: Mapping[str, Preset] = MappingProxyType(_PRESETS)
"""Presets by name (the model aliases of :data:`spillover.models.MODEL_ALIASES`)."""

GENERIC = Preset(
    model="",
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.05,
    target_modules=(),
    learning_rate=5e-5,
    beta=0.1,
    batch_size=4,
    grad_accum=1,
    max_length=None,
    precompute_ref=True,
    gradient_checkpointing=False,
    bf16=False,
    pack_pairs=True,
    dtype="auto",
    epochs=1.0,
    max_steps=None,
    note="Any other model: PEFT's default target modules for its architecture.",
)
"""Defaults for a model without a preset (empty ``target_modules``: PEFT picks them)."""


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


def preset_for_model(model: str) -> Preset:
    """The preset named like ``model`` (alias or hub id), else :data:`GENERIC`."""
    if model in PRESETS:
        return PRESETS[model]
    for preset in PRESETS.values():
        if preset.model == model:
            return preset
    return GENERIC


__all__ = ["GENERIC", "LLAMA_LIKE_MODULES", "PRESETS", "Preset", "get_preset", "preset_for_model"]
