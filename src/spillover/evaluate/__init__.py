"""Evaluation: score benchmark items with a causal LM and write per-item predictions.

Modules: ``config`` (:class:`EvalConfig`), ``scoring`` (requests, scores, the
``ChoiceScorer`` protocol, the shared tokeniser), ``hf`` (the packed transformers
scorer), ``vllm`` (the optional vLLM scorer), ``shards`` (resumable chunks, data-parallel
parts) and ``run`` (:func:`evaluate_selection` and the functions below it). The
predictions it writes follow :mod:`spillover.predictions`. Other packages import from this
face, not from those modules. Nothing here imports torch until a model is scored; this
package never imports :mod:`spillover.align`.
"""

from __future__ import annotations

from .config import EvalConfig, check_backend
from .probes import evaluate_benchmark
from .run import evaluate_model, evaluate_selection, summarize_predictions

__all__ = [
    "EvalConfig",
    "check_backend",
    "evaluate_benchmark",
    "evaluate_model",
    "evaluate_selection",
    "summarize_predictions",
]
