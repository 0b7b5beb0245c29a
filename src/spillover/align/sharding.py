"""How training was launched (one process, DDP, FSDP, DeepSpeed) and what that allows.

``accelerate launch`` describes the launch to its processes through environment
variables (``accelerate.utils.launch``: ``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_CPU``,
``FSDP_STATE_DICT_TYPE``, ``FSDP_CPU_RAM_EFFICIENT_LOADING``, ``ACCELERATE_USE_DEEPSPEED``,
``ACCELERATE_DEEPSPEED_ZERO_STAGE``, ``ACCELERATE_MIXED_PRECISION``). They are read here,
before any model is loaded, so that combinations the training path cannot honour fail in
one line before any work:

- ``merge`` under sharding (FSDP, ZeRO-3): merging needs the whole weights on one process;
  the adapter is saved gathered, so merge it afterwards on one device.
- 4-bit QLoRA under sharding: the 4-bit load pins the model to one device
  (``device_map``) and stores weights as uint8, which FSDP and ZeRO-3 cannot shard (bitsandbytes
  documents a float ``bnb_4bit_quant_storage`` and no ``device_map`` for that); refused.
- ``bf16`` set explicitly against the launch config's ``mixed_precision``: the launcher's
  setting reaches the Accelerator through the environment and would silently win
  (DeepSpeed takes it as its own precision).

Sharded loading: under ZeRO-3 or FSDP the model loader does not move the weights to the
device (the engine places them), and the training arguments are made before the model is
loaded (``trainer.sharded_training_args``), so that ZeRO-3 partitions the weights as they
are read (``zero3_init_flag``) instead of every process holding a whole copy, and FSDP's
``fsdp_cpu_ram_efficient_loading`` reads them on the first process only (the others hold
``meta`` tensors until FSDP broadcasts them with ``sync_module_states``; transformers
4.56-4.57, read in their sources; 5.x reads them on every process and FSDP still broadcasts
the first's).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

ADAPTER_FILES: tuple[str, ...] = ("adapter_config.json", "adapter_model.safetensors")
"""What a saved LoRA adapter folder must hold."""


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True, slots=True)
class Launch:
    """The launch this process belongs to, as ``accelerate launch`` described it."""

    kind: str = "single"
    """``single`` (one process or plain data parallelism), ``fsdp`` or ``deepspeed``."""
    zero_stage: int | None = None
    """DeepSpeed ZeRO stage (``deepspeed`` only)."""
    fsdp_state_dict_type: str | None = None
    """FSDP state-dict type of the launch config (``fsdp`` only)."""
    fsdp_cpu_ram_efficient_loading: bool = False
    """Whether FSDP loads the weights on the first process only."""
    mixed_precision: str | None = None
    """The launch config's ``mixed_precision`` (``no``, ``bf16``, ``fp16``), if set."""

    @property
    def sharded(self) -> bool:
        """Whether parameters are sharded across processes (FSDP, or ZeRO stage 3)."""
        return self.kind == "fsdp" or (self.kind == "deepspeed" and self.zero_stage == 3)

    @property
    def zero3(self) -> bool:
        """Whether this is DeepSpeed ZeRO stage 3."""
        return self.kind == "deepspeed" and self.zero_stage == 3

    def describe(self) -> str:
        """A short name for messages: ``FSDP``, ``DeepSpeed ZeRO-3``, ..."""
        if self.kind == "fsdp":
            return "FSDP"
        if self.kind == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}" if self.zero_stage else "DeepSpeed"
        return "one process"


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch:
    """Read the launch from ``accelerate launch``'s environment variables."""
    env = os.environ if env is None else env
    mp = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip()
        return Launch(
            kind="deepspeed", zero_stage=int(stage) if stage.isdigit() else None, mixed_precision=mp
        )
    if _flag(env, "ACCELERATE_USE_FSDP") and not _flag(env, "ACCELERATE_USE_CPU"):
        # An FSDP config launched with --cpu is trained as plain data parallelism: accelerate's
        # AcceleratorState turns FSDP on only for GPU-type (MULTI_GPU, MULTI_XPU, ...) launches,
        # never MULTI_CPU (read in accelerate 1.16), so nothing is sharded and merging works.
        return Launch(
            kind="fsdp",
            fsdp_state_dict_type=env.get("FSDP_STATE_DICT_TYPE") or None,
            fsdp_cpu_ram_efficient_loading=_flag(env, "FSDP_CPU_RAM_EFFICIENT_LOADING"),
            mixed_precision=mp,
        )
    return Launch(mixed_precision=mp)


def check_launch(launch: Launch, *, merge: bool, load_in_4bit: bool, bf16: bool | None) -> None:
    """Refuse settings this launch cannot honour (see the module docstring).

    Raises:
        ConfigError: one line saying what to change.
    """
    name = launch.describe()
    if merge and launch.sharded:
        raise ConfigError(
            f"`merge`=True under {name}: merging needs the whole weights on one process; "
            "train without --merge (the adapter is saved gathered), then merge it on one "
            "device, e.g. PeftModel.from_pretrained(base, adapter).merge_and_unload()"
        )
    if load_in_4bit and launch.sharded:
        raise ConfigError(
            f"`load_in_4bit`=True under {name}: 4-bit QLoRA here loads the model onto one "
            "device, which FSDP / ZeRO-3 cannot shard; train 4-bit with one process per GPU "
            "(configs/accelerate/multi_gpu.yaml) or drop --load-in-4bit under sharding"
        )
    mp = launch.mixed_precision
    if bf16 is False and mp == "bf16":
        raise ConfigError(
            f"`bf16`=False but the launch config's mixed_precision is bf16 ({name}), which "
            "would win; set mixed_precision: 'no' in the accelerate config, or drop --no-bf16"
        )
    if bf16 is True and mp in ("no", "fp16"):
        raise ConfigError(
            f"`bf16`=True but the launch config's mixed_precision is {mp!r} ({name}); set "
            "mixed_precision: bf16 in the accelerate config, or drop --bf16"
        )


def launch_bf16(bf16: bool | None, launch: Launch) -> bool | None:
    """``bf16`` as asked, or (None) what the launch config's ``mixed_precision`` says."""
    if bf16 is not None:
        return bf16
    if launch.mixed_precision == "bf16":
        return True
    if launch.mixed_precision in ("no", "fp16"):
        return False
    return None


def four_bit_device_map(
    device: str, *, num_processes: int, local_process_index: int
) -> dict[str, int | str]:
    """The ``device_map`` of a 4-bit (QLoRA) load: the whole model on this process's GPU.

    Under data parallelism every process must load onto its own GPU, named by its local
    index: transformers maps only the bare string ``device_map="cuda"`` to the local rank,
    so ``{"": "cuda"}`` puts every process's copy on GPU 0, and accelerate then refuses to
    train a 4-bit model placed "on a different device" than the process's. One process
    keeps the device it was given (``cuda``, ``cuda:N``).
    """
    if num_processes > 1 and device.startswith("cuda"):
        return {"": local_process_index}
    return {"": device}


def full_state_dict_for_saving(trainer: object, launch: Launch) -> None:
    """Under FSDP, switch the trainer to ``FULL_STATE_DICT`` before ``save_model``.

    transformers' ``Trainer.save_model`` writes nothing under FSDP unless the state-dict
    type is ``FULL_STATE_DICT`` (it gathers the full state dict then); accelerate's plugin
    switches it (``set_state_dict_type``), as its own examples do before saving.
    """
    if launch.kind != "fsdp":
        return
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    plugin = getattr(state, "fsdp_plugin", None)
    if plugin is None:
        return
    if "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")


def uniform_adapter_dtype(model: Any, launch: Launch) -> int:
    """Sharded, cast the LoRA weights the engine would mix with the base's dtype; return
    how many were cast.

    TRL adds a frozen copy of a loaded adapter as the reference (adapter ``ref``) with
    PEFT's default ``autocast_adapter_dtype``, which upcasts LoRA weights on a bf16 base to
    float32. Under FSDP1 the frozen copy is wrapped with the bf16 base layer in one
    FlatParameter, which refuses mixed dtypes ("Must flatten tensors with uniform dtype"),
    so frozen LoRA weights take the base dtype there; trainable ones stay float32 (PEFT's
    FSDP wrap policy gives them units of their own, and bf16 weights would lose the small
    updates of a 5e-6 learning rate: FSDP keeps no float32 copy). ZeRO-3 gathers every
    parameter in the first one's dtype, so there all LoRA weights take the base dtype
    (DeepSpeed's optimizer keeps float32 master weights); weights DeepSpeed already
    partitioned (``ds_id``) are left alone. Unsharded launches are left as they are.
    """
    if not launch.sharded:
        return 0
    base = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
    if len(base) != 1:
        return 0
    (dtype,) = base
    cast = 0
    for name, param in model.named_parameters():
        if "lora_" not in name or param.dtype == dtype or hasattr(param, "ds_id"):
            continue
        if launch.kind == "fsdp" and param.requires_grad:
            continue
        param.data = param.data.to(dtype)
        cast += 1
    return cast


def missing_adapter_files(folder: os.PathLike[str] | str) -> list[str]:
    """The adapter files (:data:`ADAPTER_FILES`) absent from ``folder``."""
    return [name for name in ADAPTER_FILES if not os.path.isfile(os.path.join(folder, name))]
