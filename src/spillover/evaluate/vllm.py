"""vLLM backend for choice scoring (optional: ``pip install 'spillover[vllm]'``, CUDA only).

For models too large for the transformers backend's throughput: vLLM's paged attention,
continuous batching and tensor parallelism. Each option is one vLLM request of
``prompt tokens + continuation tokens`` with ``max_tokens=1`` and ``prompt_logprobs``; its
score is the sum of the prompt log-probabilities at the continuation positions, which is
lm-evaluation-harness's vLLM recipe. Tokenisation is :class:`ChoiceEncoder`'s, shared with
the transformers backend, so both backends score exactly the same token sequences.

vLLM's prefix cache does not share the prompt between an item's options: a request that
asks for ``prompt_logprobs`` never reads the cache (the cached positions would have no
log-probabilities), so every option recomputes its whole sequence. What is not recomputed
are identical sequences: answer orders (``permutations``) in the ``lm-eval`` format repeat
each item's three sequences, and each distinct sequence is sent once per call.

vLLM is imported only when this backend is used.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MissingDependencyError, ModelError
from .scoring import (
    ChoiceEncoder,
    ChoiceRequest,
    ChoiceScores,
    NeedsRescoring,
    ScoreProgress,
    ScorerStats,
)

logger = logging.getLogger(__name__)

INSTALL_HINT = "the vllm backend needs vLLM and a CUDA GPU: pip install 'spillover[vllm]'"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    return vllm


ENGINE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError)
"""What vLLM raises when the engine cannot be built or a request cannot run (too little GPU
memory, a ``max_model_len`` the model or the KV cache cannot hold, CUDA out of memory,
a failed engine process); each becomes a one-line :class:`ModelError`. vLLM's own
``EngineDeadError`` (an ``Exception``: its engine process died) is added where vLLM has it
(:func:`engine_errors`)."""

MEMORY_HINT = (
    "out of GPU memory: a smaller --max-num-batched-tokens (eval.max_num_batched_tokens) "
    "lowers the engine's activation peak, a smaller --max-model-len (eval.max_model_len) its "
    "KV cache; a smaller --gpu-memory-utilization (eval.gpu_memory_utilization) leaves more "
    "to other work on the GPU, a larger one gives the engine more"
)
"""What to turn when the engine runs out of GPU memory (in every engine error)."""


def engine_errors() -> tuple[type[BaseException], ...]:
    """:data:`ENGINE_ERRORS` and vLLM's ``EngineDeadError`` / ``EngineGenerateError`` (V1
    engine, ``vllm/v1/engine/exceptions.py``) where the installed vLLM has them."""
    found: list[type[BaseException]] = []
    try:
        from vllm.v1.engine import exceptions
    except ImportError:
        return ENGINE_ERRORS
    for name in ("EngineDeadError", "EngineGenerateError"):
        cls = getattr(exceptions, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return (*ENGINE_ERRORS, *found)


def engine_error(what: str, exc: BaseException, hint: str) -> ModelError:
    """The one-line error for an engine failure: what failed, vLLM's message on one line
    (cut at 400 characters), and what to try."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > 400:
        text = text[:399] + "…"
    return ModelError(f"{what}: {type(exc).__name__}: {text}; {hint}")


def continuation_logprob(
    sequence: Sequence[int],
    context_len: int,
    prompt_logprobs: Sequence[Mapping[int, Any] | None],
) -> float:
    """Sum the log-probabilities of ``sequence[context_len:]`` from vLLM's prompt logprobs.

    ``prompt_logprobs[i]`` maps token ids to the log-probability of position ``i`` given
    positions ``< i`` (vLLM ``Logprob`` objects, or plain floats); position 0 has none.

    Raises:
        ModelError: a scored position lacks its own token (the engine was not asked for
            prompt logprobs, or returned a truncated list).
    """
    if not 1 <= context_len < len(sequence):
        raise ModelError(
            f"cannot score a continuation at {context_len}:{len(sequence)} of a sequence"
        )
    if len(prompt_logprobs) != len(sequence):
        raise ModelError(
            f"the engine returned {len(prompt_logprobs)} prompt logprobs for {len(sequence)} tokens"
        )
    total = 0.0
    for i in range(context_len, len(sequence)):
        entry = prompt_logprobs[i]
        if entry is None or sequence[i] not in entry:
            raise ModelError(f"no prompt logprob for token {sequence[i]} at position {i}")
        value = entry[sequence[i]]
        total += float(getattr(value, "logprob", value))
    return total


class VLLMChoiceScorer:
    """Choice scorer on a ``vllm.LLM`` engine.

    Args:
        llm: A ``vllm.LLM`` (with ``enable_lora=True`` when ``lora_path`` is given).
        tokenizer: The model's transformers tokenizer (the token ids are ours, not vLLM's).
        boundary: Tokenisation boundary rule, see :func:`spillover.evaluate.split_pair`.
        lora_path: PEFT adapter folder applied per request (not merged).
        chunk_requests: Options handed to the engine per call (progress granularity).
    """

    def __init__(
        self,
        llm: Any,
        tokenizer: Any,
        *,
        boundary: str = "lm-eval",
        lora_path: str | os.PathLike[str] | None = None,
        chunk_requests: int = 4096,
    ) -> None:
        vllm = _import_vllm()
        self.llm = llm
        self.encoder = ChoiceEncoder(tokenizer, boundary)
        self.chunk_requests = chunk_requests
        # one generated token is the least vLLM accepts; prompt_logprobs=1 returns the
        # prompt's own token at every position (plus the top-1), as lm-eval asks for
        self.params = vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False
        )
        self.lora = None
        if lora_path is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("spillover-adapter", 1, str(lora_path))
        self.stats = ScorerStats()
        self.errors = engine_errors()

    supports_bf16 = False
    """vLLM computes in its weights' dtype: no ``bf16-verified`` precision."""

    def score(
        self,
        requests: Sequence[ChoiceRequest],
        progress: ScoreProgress | None = None,
        *,
        rescore: NeedsRescoring | None = None,
    ) -> list[ChoiceScores]:
        """Score every option of every request; results in request order."""
        from vllm.inputs import TokensPrompt

        if rescore is not None:
            raise ConfigError(
                "precision 'bf16-verified' needs the transformers backend; vLLM computes in "
                "its weights' dtype (use precision 'model' or 'auto')"
            )

        encoded = self.encoder.encode(requests)
        # One engine request per distinct token sequence (the adapter is the same for all):
        # answer permutations repeat each (prompt, answer) sequence 3 or 6 times, and vLLM
        # would recompute every copy (see the module docstring). ``users`` fans each result
        # back out to the (request, option, context length) that asked for it.
        index: dict[tuple[int, ...], int] = {}
        distinct: list[list[int]] = []
        users: list[list[tuple[int, int, int]]] = []
        for r, opts in enumerate(encoded):
            for j, o in enumerate(opts):
                if o.merged:
                    self.stats.boundary_merges += 1
                seq = [*o.context, *o.continuation]
                k = index.setdefault(tuple(seq), len(distinct))
                if k == len(distinct):
                    distinct.append(seq)
                    users.append([])
                users[k].append((r, j, len(o.context)))
        logprobs = [[0.0] * len(opts) for opts in encoded]
        remaining = [len(opts) for opts in encoded]
        for start in range(0, len(distinct), self.chunk_requests):
            part = range(start, min(start + self.chunk_requests, len(distinct)))
            try:
                outputs = self.llm.generate(
                    [TokensPrompt(prompt_token_ids=distinct[k]) for k in part],
                    self.params,
                    lora_request=self.lora,
                    use_tqdm=False,
                )
            except self.errors as exc:
                raise engine_error(
                    "vLLM failed while scoring",
                    exc,
                    "a request longer than --max-model-len needs a larger one; "
                    f"{MEMORY_HINT}; or a larger --tensor-parallel-size",
                ) from None
            done = 0
            for k, out in zip(part, outputs, strict=True):
                seq = distinct[k]
                self.stats.forward_tokens += len(seq)
                for r, j, ctx_len in users[k]:
                    logprobs[r][j] = continuation_logprob(seq, ctx_len, out.prompt_logprobs)
                    remaining[r] -= 1
                    done += remaining[r] == 0
            self.stats.batches += 1
            if progress is not None and done:
                progress(done)
        self.stats.requests += len(encoded)
        return [
            ChoiceScores(tuple(lp), tuple(len(o.continuation) for o in opts))
            for lp, opts in zip(logprobs, encoded, strict=True)
        ]


VLLM_LORA_RANKS: tuple[int, ...] = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts (``MaxLoRARanks`` in its ``vllm/config/lora.py``)."""


def _lora_rank(adapter: Path) -> int:
    """The ``max_lora_rank`` for ``adapter``: the smallest value vLLM accepts that holds the
    adapter's largest rank (``r`` and every ``rank_pattern`` value of its config).

    Raises:
        ModelError: the config cannot be read or holds no valid rank.
        ConfigError: a rank above the largest one vLLM serves.
    """
    where = adapter / "adapter_config.json"
    try:
        cfg = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{where}: cannot read it ({exc})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{where}: expected a JSON object")
    rank = cfg.get("r")
    if not _is_rank(rank):
        raise ModelError(f"{where}: field 'r'={rank!r}; expected > 0")
    pattern = cfg.get("rank_pattern") or {}
    if not isinstance(pattern, dict) or not all(_is_rank(v) for v in pattern.values()):
        raise ModelError(
            f"{where}: field 'rank_pattern'={pattern!r}; expected a mapping of module "
            "names to ranks > 0"
        )
    largest = max([rank, *pattern.values()])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= largest:
            return allowed
    raise ConfigError(
        f"{where}: LoRA rank {largest}; the vllm backend serves ranks up to "
        f"{VLLM_LORA_RANKS[-1]} (use --backend hf)"
    )


def _is_rank(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


DEFAULT_MAX_MODEL_LEN = 4096
"""``max_model_len`` when none is given. vLLM otherwise builds the engine for the model's
full context (128k tokens for some), and refuses to start when the KV cache cannot hold one
sequence that long, although the longest BBQ request in any prompt format is a few hundred
tokens. 4096 leaves ample room for those and for longer prompt formats."""


def _default_max_model_len(spec: Any, where: str, trust_remote_code: bool) -> int:
    """:data:`DEFAULT_MAX_MODEL_LEN`, or the model config's ``max_position_embeddings`` when
    smaller (vLLM refuses a longer ``max_model_len`` than the model allows)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(
            where,
            revision=spec.revision if spec.kind == "hub" else None,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError, KeyError):  # vLLM reads it again and names what is wrong
        return DEFAULT_MAX_MODEL_LEN
    cfg = getattr(cfg, "text_config", None) or cfg
    limit = getattr(cfg, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        return min(DEFAULT_MAX_MODEL_LEN, limit)
    return DEFAULT_MAX_MODEL_LEN


DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
"""``gpu_memory_utilization`` when none is given (vLLM's own default): the share of the
GPU's total memory the engine may take for weights, activations and KV cache. vLLM refuses
to start when less than that is free."""


def _engine_sizes(
    gpu_memory_utilization: float | None, max_num_batched_tokens: int | None
) -> float:
    """Check the engine's memory settings; return ``gpu_memory_utilization`` (None: the
    default)."""
    if gpu_memory_utilization is None:
        gpu_memory_utilization = DEFAULT_GPU_MEMORY_UTILIZATION
    if not 0 < gpu_memory_utilization <= 1:
        raise ConfigError(
            f"`gpu_memory_utilization`={gpu_memory_utilization}; expected a share in (0, 1]"
        )
    if max_num_batched_tokens is not None and max_num_batched_tokens < 1:
        raise ConfigError(
            f"`max_num_batched_tokens`={max_num_batched_tokens}; expected a positive integer"
        )
    return gpu_memory_utilization


def load_vllm_model(
    name: str,
    *,
    adapter: str | os.PathLike[str] | None = None,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    max_num_batched_tokens: int | None = None,
    seed: int = 0,
    max_model_len: int | None = None,
) -> Any:
    """A :class:`spillover.models.LoadedModel` whose ``model`` is a ``vllm.LLM``.

    Aliases, hub ids and folders resolve as for the transformers backend (the embedded
    model is served from its converted safetensors folder). ``max_model_len`` None is
    :data:`DEFAULT_MAX_MODEL_LEN`, capped by the model's ``max_position_embeddings``;
    ``gpu_memory_utilization`` None is :data:`DEFAULT_GPU_MEMORY_UTILIZATION`;
    ``max_num_batched_tokens`` None is vLLM's default. What this process's torch still
    caches on the GPU (an earlier stage's model) is given back first, since vLLM's engine
    runs in its own process and checks the GPU's free memory. Shut the engine down with
    :func:`shutdown_engine` when done.

    Raises:
        ModelError: vLLM could not build the engine (one line, with what to try).
    """
    from ..models import (
        LoadedModel,
        load_tokenizer,
        release_cuda_memory,
        resolve_dtype,
        resolve_model,
        weights_location,
    )

    vllm = _import_vllm()
    gpu_memory_utilization = _engine_sizes(gpu_memory_utilization, max_num_batched_tokens)
    if tensor_parallel_size < 1:
        raise ConfigError(f"`tensor_parallel_size`={tensor_parallel_size}; expected >= 1")
    if max_model_len is not None and max_model_len < 1:
        raise ConfigError(f"`max_model_len`={max_model_len}; expected a positive integer")
    spec = resolve_model(name, revision)
    dtype_name = resolve_dtype(dtype, "cuda")
    where = weights_location(spec, cache_dir)
    if max_model_len is None:
        max_model_len = _default_max_model_len(spec, where, trust_remote_code)
    kwargs: dict[str, Any] = {
        "model": where,
        "dtype": dtype_name,
        "trust_remote_code": trust_remote_code,
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        # kept on, but it saves nothing here: vLLM's SamplingParams sets
        # skip_reading_prefix_cache when prompt_logprobs is asked for (vllm/sampling_params.py),
        # and KVCacheManager.get_computed_blocks (vllm/v1/core/kv_cache_manager.py) then
        # returns no cached blocks, so each request's prompt is computed in full
        "enable_prefix_caching": True,
        "seed": seed,
        "max_model_len": max_model_len,
    }
    if max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = max_num_batched_tokens
    if spec.kind == "hub" and spec.revision:
        kwargs["revision"] = spec.revision
    adapter_str: str | None = None
    if adapter is not None:
        path = Path(adapter).expanduser().resolve()
        kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(path), max_loras=1)
        adapter_str = str(path)
    tok = load_tokenizer(spec, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    release_cuda_memory()
    try:
        llm = vllm.LLM(**kwargs)
    except engine_errors() as exc:
        raise engine_error(
            f"vLLM could not start {spec.name!r} (max_model_len {max_model_len}, "
            f"tensor_parallel_size {tensor_parallel_size}, gpu_memory_utilization "
            f"{gpu_memory_utilization})",
            exc,
            "try a smaller --max-model-len (eval.max_model_len), a larger "
            "--tensor-parallel-size, or a GPU with more free memory; less memory free than "
            "--gpu-memory-utilization (eval.gpu_memory_utilization) asks for: a smaller "
            "share, or free the GPU",
        ) from None
    return LoadedModel(llm, tok, spec, dtype_name, "cuda", adapter_str, backend="vllm")


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine so that its GPU memory is free for what comes next.

    vLLM's V1 engine runs in its own process and holds its GPU memory (90 % by default)
    until that process ends; dropping the ``LLM`` object leaves that to the garbage
    collector, so a second engine in the same ``spillover run`` (or the training after the
    first evaluation) would find the GPU full. ``LLM.shutdown()`` where vLLM has it, else
    its engine client's ``shutdown()`` (``llm.llm_engine.engine_core``, read in vLLM 0.10-0.11);
    an in-process engine's model-parallel groups are destroyed too. Failures to shut down
    are logged, never raised (they must not hide the error that ended scoring).
    """
    try:
        stop = getattr(llm, "shutdown", None)
        if not callable(stop):
            engine = getattr(llm, "llm_engine", None)
            stop = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if callable(stop):
            stop()
    except Exception as exc:  # a dead engine may fail to stop again
        logger.warning("vLLM's engine did not shut down cleanly: %s", exc)
    try:
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )
    except ImportError:
        return
    try:
        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception as exc:
        logger.warning("vLLM's process groups were not destroyed: %s", exc)


__all__ = [
    "DEFAULT_GPU_MEMORY_UTILIZATION",
    "DEFAULT_MAX_MODEL_LEN",
    "INSTALL_HINT",
    "VLLM_LORA_RANKS",
    "VLLMChoiceScorer",
    "continuation_logprob",
    "engine_errors",
    "load_vllm_model",
    "shutdown_engine",
]
