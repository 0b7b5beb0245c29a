"""The evaluation config: what is scored, how, and on which engine; recorded in every output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .._checks import check_choice, check_seed
from ..errors import ConfigError, MissingDependencyError
from ..prompts import PERMUTATION_MODES, PROMPT_FORMATS
from .scoring import BOUNDARIES

LENGTH_NORMS: tuple[str, ...] = ("none", "token", "char", "byte")
"""Score normalisations for picking the prediction (stored scores are always sums)."""
PRECISIONS: tuple[str, ...] = ("auto", "model", "bf16-verified")
"""Numeric precision of the scoring pass (see :attr:`EvalConfig.precision`)."""
BATCH_TOKENS_MAX = 1 << 20
"""Largest token budget of one forward pass (far above what one GPU holds with a 7B model)."""
BACKENDS: tuple[str, ...] = ("hf", "vllm")
"""Scoring engines: transformers (``hf``) or vLLM (``vllm``, ``pip install 'spillover[vllm]'``)."""


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """What to score and how; validated on creation, recorded in every output.

    The Python API, the ``eval`` section of a run config and ``spillover eval`` all
    build this one object; its defaults are the only defaults.
    """

    prompt_format: str = "lm-eval"
    """Prompt format: ``lm-eval``, ``letters`` or ``letters-chat`` (see ``docs/predictions.md``)."""
    permutations: str = "none"
    """Answer orders to score: ``none`` (original), ``cyclic`` (3) or ``all`` (6)."""
    batch_tokens: int = 4096
    """Token budget of one forward pass (rows x padded length)."""
    length_norm: str = "none"
    """Normalisation used to pick the prediction: ``none`` (summed log-prob, lm-eval
    ``acc``), ``token`` (mean per token), ``char`` (per character of the answer
    text, lm-eval ``acc_norm``) or ``byte`` (per UTF-8 byte, lm-eval ``acc_bytes``)."""
    boundary: str = "lm-eval"
    """Tokenisation boundary: ``lm-eval`` (lm-evaluation-harness's split) or ``whole``."""
    chunk_items: int = 256
    """Items per shard: the unit of resumption and of batching."""
    seed: int = 0
    """Seed of the item sample (recorded; scoring itself is deterministic)."""
    precision: str = "auto"
    """``model`` computes in the weights' dtype; ``bf16-verified`` runs the decoder under
    bfloat16 autocast (AMX on CPUs, tensor cores on GPUs) and rescores in the weights' dtype
    every request whose top-two margin is below ``verify_margin``, so predictions match the
    full-precision ones; ``auto`` is ``bf16-verified`` for float32 weights on hardware with
    fast bf16, else ``model``."""
    verify_margin: float = 0.3
    """Margin (in the decision score, nats for ``length_norm=none``) under which a bf16 result
    is rescored in full precision. Measured on 3,300 BBQ items with SmolLM2-135M
    (``bench/precision_agreement.py``): 11.6 % rescored, no decision differing from float32,
    and every kept pair's bf16 error at most two thirds of its margin (0.67 eager, 0.54 with
    the compiled CPU pass)."""
    backend: str = "hf"
    """Scoring engine: ``hf`` (transformers, packed scoring) or ``vllm`` (CUDA GPUs; pip install
    'spillover[vllm]')."""
    tensor_parallel_size: int = 1
    """GPUs one model is spread over (``vllm`` backend only)."""
    max_model_len: int | None = None
    """Longest sequence, in tokens, the vLLM engine is built for (``vllm`` backend only); its KV
    cache is sized for it. Unset: 4096, or the model's ``max_position_embeddings`` if smaller
    (a BBQ request is a few hundred tokens)."""
    gpu_memory_utilization: float | None = None
    """Share of each GPU's memory the vLLM engine takes for weights, activations and KV cache
    (``vllm`` backend only); vLLM refuses to start when less is free. Unset: 0.9. Lower it
    when other work shares the GPU; raise it when the KV cache is too small."""
    max_num_batched_tokens: int | None = None
    """Tokens the vLLM engine computes in one step (``vllm`` backend only): its activation
    peak grows with it, so lower it when scoring runs out of GPU memory. Unset: vLLM's
    default."""

    def __post_init__(self) -> None:
        check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        check_choice("permutations", self.permutations, PERMUTATION_MODES)
        check_choice("length_norm", self.length_norm, LENGTH_NORMS)
        check_choice("boundary", self.boundary, BOUNDARIES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("backend", self.backend, BACKENDS)
        if not _is_int(self.batch_tokens) or not 64 <= self.batch_tokens <= BATCH_TOKENS_MAX:
            raise ConfigError(
                f"`batch_tokens`={self.batch_tokens!r}; expected an integer in "
                f"64..{BATCH_TOKENS_MAX} (e.g. 4096)"
            )
        if not self.verify_margin >= 0:
            raise ConfigError(f"`verify_margin`={self.verify_margin}; expected >= 0")
        if not _is_int(self.chunk_items) or self.chunk_items < 1:
            raise ConfigError(f"`chunk_items`={self.chunk_items}; expected a positive integer")
        check_seed("seed", self.seed)
        if self.backend == "vllm" and self.precision == "bf16-verified":
            raise ConfigError(
                "`precision`='bf16-verified' needs `backend`: hf (vLLM computes in the "
                "weights' dtype)"
            )
        if self.tensor_parallel_size < 1 or (
            self.backend != "vllm" and self.tensor_parallel_size != 1
        ):
            raise ConfigError(
                f"`tensor_parallel_size`={self.tensor_parallel_size}; expected 1, or >= 1 with "
                "`backend`: vllm"
            )
        if self.max_model_len is not None and (
            not _is_int(self.max_model_len) or self.max_model_len < 1 or self.backend != "vllm"
        ):
            raise ConfigError(
                f"`max_model_len`={self.max_model_len!r}; expected unset, or a positive integer "
                "with `backend`: vllm"
            )

        gmu = self.gpu_memory_utilization
        if gmu is not None and (
            isinstance(gmu, bool)
            or not isinstance(gmu, (int, float))
            or not 0 < gmu <= 1
            or self.backend != "vllm"
        ):
            raise ConfigError(
                f"`gpu_memory_utilization`={gmu!r}; expected unset, or a share in (0, 1] "
                "(e.g. 0.6) with `backend`: vllm"
            )
        tokens = self.max_num_batched_tokens
        if tokens is not None and (not _is_int(tokens) or tokens < 1 or self.backend != "vllm"):
            raise ConfigError(
                f"`max_num_batched_tokens`={tokens!r}; expected unset, or a positive integer "
                "(e.g. 8192) with `backend`: vllm"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict view of what decides the scores (recorded in outputs, and the key of
        resumable shards and run stages). The engine's memory settings
        (:data:`ENGINE_RESOURCES`) are left out: changing them after running out of memory
        must neither rerun finished stages nor refuse the shards already scored."""
        out = dataclasses.asdict(self)
        for name in ENGINE_RESOURCES:
            out.pop(name)
        return out


ENGINE_RESOURCES: tuple[str, ...] = ("gpu_memory_utilization", "max_num_batched_tokens")
""":class:`EvalConfig` fields that size the vLLM engine's memory without changing a score."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_backend(cfg: EvalConfig) -> None:
    """Check that this machine has the scoring backend ``cfg`` names (without loading it).

    Raises:
        MissingDependencyError: ``backend`` is ``vllm`` and vLLM is not installed.
    """
    import importlib.util

    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from .vllm import INSTALL_HINT

        raise MissingDependencyError(f"`backend`: vllm: {INSTALL_HINT}")
