"""Evaluation: score BBQ items with a causal LM and write per-item predictions.

Modules: ``config`` (:class:`EvalConfig`), ``scoring`` (requests, scores, the
:class:`ChoiceScorer` protocol, the shared tokeniser), ``hf`` (the packed transformers
scorer), ``vllm`` (the optional vLLM scorer), ``files`` (the predictions schema, Parquet
files, shards) and ``run`` (:func:`evaluate_model` and friends). Import from this package,
not from those modules. Nothing here imports torch until a model is scored; this package
never imports :mod:`spillover.align`.
"""

from __future__ import annotations

from .config import BACKENDS, LENGTH_NORMS, PRECISIONS, EvalConfig
from .files import (
    METADATA_KEY,
    PREDICTION_COLUMNS,
    Prediction,
    arrow_schema,
    items_digest,
    predictions_table,
    read_metadata,
    read_predictions_table,
    shard_dir,
)
from .hf import HFChoiceScorer, score_naive
from .run import (
    EvalOutcome,
    EvalProgress,
    evaluate_distributed,
    evaluate_model,
    load_for_eval,
    make_prediction,
    normalised,
    render_all,
    resolve_precision,
    run_evaluation,
    score_items,
    sort_items,
    summarize_predictions,
)
from .scoring import (
    BOUNDARIES,
    ChoiceEncoder,
    ChoiceRequest,
    ChoiceScorer,
    ChoiceScores,
    EncodedOption,
    ScorerStats,
    split_pair,
)
from .vllm import INSTALL_HINT as VLLM_INSTALL_HINT
from .vllm import VLLMChoiceScorer, continuation_logprob, load_vllm_model

__all__ = [
    "BACKENDS",
    "BOUNDARIES",
    "LENGTH_NORMS",
    "METADATA_KEY",
    "PRECISIONS",
    "PREDICTION_COLUMNS",
    "VLLM_INSTALL_HINT",
    "ChoiceEncoder",
    "ChoiceRequest",
    "ChoiceScorer",
    "ChoiceScores",
    "EncodedOption",
    "EvalConfig",
    "EvalOutcome",
    "EvalProgress",
    "HFChoiceScorer",
    "Prediction",
    "ScorerStats",
    "VLLMChoiceScorer",
    "arrow_schema",
    "continuation_logprob",
    "evaluate_distributed",
    "evaluate_model",
    "items_digest",
    "load_for_eval",
    "load_vllm_model",
    "make_prediction",
    "normalised",
    "predictions_table",
    "read_metadata",
    "read_predictions_table",
    "render_all",
    "resolve_precision",
    "run_evaluation",
    "score_items",
    "score_naive",
    "shard_dir",
    "sort_items",
    "split_pair",
    "summarize_predictions",
]
