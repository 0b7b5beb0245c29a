"""Scoring BBQ items with a model: predictions, the resumable evaluation, data parallelism.

Each item's three answers are scored by the summed log-probability of their
continuation tokens after the prompt (see :mod:`spillover.prompts` for the
formats); the prediction is the answer with the highest (optionally
length-normalised) score. With answer permutations, every item is scored once
per displayed order and the prediction is always mapped back to the item's
original answer index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import check_shared_dir
from ..data import CATEGORIES, BBQData, BBQItem, Selection
from ..errors import ConfigError, DataError
from ..models import LoadedModel
from ..predictions import (
    Prediction,
    predictions_table,
    read_metadata,
    table_predictions,
    write_table,
)
from ..prompts import RenderedItem, permutation_id, permutations, render
from .config import LENGTH_NORMS, EvalConfig
from .hf import HFChoiceScorer, compile_requested
from .scoring import ChoiceRequest, ChoiceScorer, ChoiceScores
from .shards import (
    MANIFEST_FORMAT,
    items_digest,
    merge_prediction_files,
    open_shards,
    part_path,
    read_shard,
    shard_dir,
    write_shard,
)

logger = logging.getLogger(__name__)

EvalProgress = Callable[[int, int], None]
"""``progress(done, total)`` in scored rows (items x permutations)."""


def sort_items(items: Iterable[BBQItem]) -> list[BBQItem]:
    """Items in output order: category order, then example id (duplicates dropped)."""
    rank = {c: i for i, c in enumerate(CATEGORIES)}
    uniq = {it.key: it for it in items}
    return sorted(
        uniq.values(), key=lambda it: (rank.get(it.category, len(rank)), it.category, it.example_id)
    )


def choice_text(continuation: str) -> str:
    """The answer text of a continuation (one leading space removed), for ``char``/``byte`` norms."""
    return continuation[1:] if continuation.startswith(" ") else continuation


def normalised(scores: ChoiceScores, continuations: Sequence[str], norm: str) -> list[float]:
    """Scores used to pick the prediction under a length normalisation."""
    lps = scores.logprobs
    if norm == "none":
        return list(lps)
    if norm == "token":
        return [lp / max(n, 1) for lp, n in zip(lps, scores.n_tokens, strict=True)]
    if norm == "char":
        return [lp / max(len(choice_text(c)), 1) for lp, c in zip(lps, continuations, strict=True)]
    if norm == "byte":
        return [
            lp / max(len(choice_text(c).encode("utf-8")), 1)
            for lp, c in zip(lps, continuations, strict=True)
        ]
    raise ConfigError(f"`length_norm`={norm!r}; expected one of {', '.join(LENGTH_NORMS)}")


def render_all(items: Sequence[BBQItem], cfg: EvalConfig, tokenizer: Any) -> list[RenderedItem]:
    """Render every item under every permutation (item-major order)."""
    orders = permutations(cfg.permutations)
    return [
        render(it, cfg.prompt_format, tokenizer=tokenizer, order=o) for it in items for o in orders
    ]


def make_prediction(
    item: BBQItem,
    rendered: RenderedItem,
    scores: ChoiceScores,
    cfg: EvalConfig,
    model_info: Mapping[str, Any],
) -> Prediction:
    """Turn one item's displayed-order scores into a :class:`Prediction`."""
    norm = normalised(scores, rendered.continuations, cfg.length_norm)
    displayed = max(range(len(norm)), key=lambda j: (norm[j], -j))
    pred = rendered.original_index(displayed)
    score = [0.0, 0.0, 0.0]
    ntok = [0, 0, 0]
    for j, k in enumerate(rendered.order):
        score[k] = float(scores.logprobs[j])
        ntok[k] = int(scores.n_tokens[j])
    return Prediction(
        category=item.category,
        example_id=item.example_id,
        question_index=item.question_index,
        context_condition=item.context_condition,
        question_polarity=item.question_polarity,
        label_type=item.label_type,
        label=item.label,
        target_loc=item.target_loc,
        unknown_loc=item.unknown_loc,
        permutation=permutation_id(rendered.order),
        pred_index=pred,
        displayed_pred=displayed,
        score_0=score[0],
        score_1=score[1],
        score_2=score[2],
        n_tokens_0=ntok[0],
        n_tokens_1=ntok[1],
        n_tokens_2=ntok[2],
        correct=pred == item.label,
        biased=None if item.target_loc is None else pred == item.target_loc,
        unknown=pred == item.unknown_loc,
        model=str(model_info.get("model")),
        model_id=str(model_info.get("model_id")),
        model_revision=model_info.get("revision"),
        adapter=model_info.get("adapter"),
        prompt_format=cfg.prompt_format,
        length_norm=cfg.length_norm,
    )


def _top_margin(values: Sequence[float]) -> float:
    top = sorted(values, reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def load_for_eval(
    model: str,
    cfg: EvalConfig,
    *,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
) -> tuple[LoadedModel, ChoiceScorer | None]:
    """Load a model for ``cfg.backend``, with the scorer :func:`evaluate_model` needs.

    ``hf``: a transformers model and None (``evaluate_model`` builds the packed scorer).
    ``vllm``: a ``vllm.LLM`` on CUDA and its :class:`~spillover.evaluate.VLLMChoiceScorer`
    (``device`` is not used; ``cfg.tensor_parallel_size`` GPUs hold the model).
    """
    if cfg.backend == "hf":
        from ..models import load_model

        # the adapter is merged for scoring: as fast as the base model, same predictions
        loaded = load_model(
            model,
            adapter=adapter,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            merge_adapter=True,
        )
        return loaded, None
    from .vllm import VLLMChoiceScorer, load_vllm_model

    loaded = load_vllm_model(
        model,
        adapter=adapter,
        dtype=dtype,
        cache_dir=cache_dir,
        tensor_parallel_size=cfg.tensor_parallel_size,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        seed=cfg.seed,
    )
    scorer = VLLMChoiceScorer(
        loaded.model, loaded.tokenizer, boundary=cfg.boundary, lora_path=loaded.adapter
    )
    return loaded, scorer


@contextlib.contextmanager
def loaded_for_eval(
    model: str,
    cfg: EvalConfig,
    *,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
) -> Iterator[tuple[LoadedModel, ChoiceScorer | None]]:
    """:func:`load_for_eval`, with the GPU memory given back on leaving, also on an error:
    a vLLM engine is shut down (:func:`~spillover.evaluate.vllm.shutdown_engine`) and the
    CUDA cache emptied, so that the stage after (training, or the next engine of a
    ``spillover run``) finds the GPU free."""
    from ..models import release_cuda_memory

    loaded, scorer = load_for_eval(
        model, cfg, adapter=adapter, device=device, dtype=dtype, cache_dir=cache_dir
    )
    try:
        yield loaded, scorer
    finally:
        if loaded.backend == "vllm":
            from .vllm import shutdown_engine

            shutdown_engine(loaded.model)
        del loaded, scorer
        release_cuda_memory()


def resolve_precision(
    cfg: EvalConfig, loaded_model: LoadedModel, scorer: ChoiceScorer
) -> EvalConfig:
    """Replace ``precision="auto"`` by what this model, scorer and machine get.

    Raises:
        ConfigError: ``bf16-verified`` asked of a scorer that does not support it.
    """
    if not scorer.supports_bf16:
        if cfg.precision == "bf16-verified":
            raise ConfigError(
                "precision 'bf16-verified' needs the transformers backend (bf16 autocast); "
                "use precision 'model' or 'auto'"
            )
        return dataclasses.replace(cfg, precision="model")
    if cfg.precision != "auto":
        return cfg
    from ..models import fast_bf16

    use = loaded_model.dtype == "float32" and fast_bf16(loaded_model.device)
    return dataclasses.replace(cfg, precision="bf16-verified" if use else "model")


def score_items(
    scorer: ChoiceScorer,
    items: Sequence[BBQItem],
    cfg: EvalConfig,
    *,
    tokenizer: Any,
    model_info: Mapping[str, Any],
    progress: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Score items (no files): one prediction per item x permutation, item-major.

    With ``cfg.precision == "bf16-verified"`` the scorer runs in bfloat16 and rescores in
    full precision every request whose top-two margin is below ``cfg.verify_margin``.
    """
    rendered = render_all(items, cfg, tokenizer)
    requests = [ChoiceRequest(r.prompt, r.continuations) for r in rendered]

    def close_call(i: int, scores: ChoiceScores) -> bool:
        margin = _top_margin(normalised(scores, rendered[i].continuations, cfg.length_norm))
        return margin < cfg.verify_margin

    verify = close_call if cfg.precision == "bf16-verified" else None
    scores = scorer.score(requests, progress, rescore=verify)
    nperm = len(permutations(cfg.permutations))
    return [
        make_prediction(items[i // nperm], r, s, cfg, model_info)
        for i, (r, s) in enumerate(zip(rendered, scores, strict=True))
    ]


# --------------------------------------------------------------------------- entry point


def evaluate_model(
    loaded_model: LoadedModel,
    items: Sequence[BBQItem],
    cfg: EvalConfig,
    *,
    out: str | Path | None = None,
    progress: EvalProgress | None = None,
    provenance: Mapping[str, Any] | None = None,
    scorer: ChoiceScorer | None = None,
) -> list[Prediction]:
    """Score BBQ items with a model; optionally write the predictions file.

    Items are deduplicated and put in output order (category order, example
    id); rows follow the permutation order within an item. With ``out``,
    each chunk of ``cfg.chunk_items`` items is written as a shard under
    ``<out>.shards/`` as soon as it is scored; an existing shard folder from a
    run with the same configuration is resumed (one with a different
    configuration is refused). The final file is written atomically and the
    shards are removed; it is byte-identical to an uninterrupted run's.

    Args:
        loaded_model: Model, tokenizer and provenance (:func:`spillover.models.load_model`).
        items: Items to score.
        cfg: Evaluation settings.
        out: Predictions Parquet file to write, or None to only return predictions.
        progress: ``progress(done, total)`` callback in rows (items x permutations).
        provenance: Extra file metadata, e.g. ``{"bbq": data.provenance()}``.
        scorer: Scoring backend; defaults to :class:`HFChoiceScorer` on the model (its bf16
            pass compiled when ``$SPILLOVER_COMPILE`` is ``1``).

    Returns:
        Predictions in output order.

    Raises:
        ConfigError: invalid settings, a chat format without a chat template,
            or shards of a differently configured run at ``out``.
    """
    from .. import __version__

    ordered = sort_items(items)
    if not ordered:
        raise ConfigError("no items to evaluate; check the selection options")
    tokenizer = loaded_model.tokenizer
    render(ordered[0], cfg.prompt_format, tokenizer=tokenizer)  # fail early (chat template)
    if scorer is None:
        scorer = HFChoiceScorer(
            loaded_model.model,
            tokenizer,
            batch_tokens=cfg.batch_tokens,
            boundary=cfg.boundary,
            compile=compile_requested(),
        )
    cfg = resolve_precision(cfg, loaded_model, scorer)
    model_info = loaded_model.provenance()
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "spillover_version": __version__,
        "config": cfg.to_dict(),
        "model": model_info,
        "n_items": len(ordered),
        "items_sha256": items_digest(ordered),
    }
    folder = shard_dir(out) if out is not None else None
    if folder is not None:
        open_shards(folder, manifest)
    full, stats = _score_chunks(scorer, ordered, cfg, tokenizer, model_info, folder, progress)
    if stats.get("boundary_merges"):
        logger.info(
            "%d option(s) had a prompt/continuation token merge at the boundary",
            stats["boundary_merges"],
        )
    if out is not None:
        assert folder is not None
        meta = {
            "spillover_version": __version__,
            "config": cfg.to_dict(),
            "model": model_info,
            "n_items": len(ordered),
            "n_rows": full.num_rows,
            "items_sha256": manifest["items_sha256"],
            "scorer_stats": stats,
            **dict(provenance or {}),
        }
        write_table(full, Path(out), meta)
        shutil.rmtree(folder, ignore_errors=True)
    return table_predictions(full)


def _score_chunks(
    scorer: ChoiceScorer,
    ordered: Sequence[BBQItem],
    cfg: EvalConfig,
    tokenizer: Any,
    model_info: Mapping[str, Any],
    folder: Path | None,
    progress: EvalProgress | None,
) -> tuple[Any, dict[str, int]]:
    """Score chunk by chunk, reading finished shards from ``folder`` and writing new ones.

    ``progress`` hears ``(0, total)`` first, then the rows done after every scored batch
    (the scorer's callback) and every shard read back.

    Returns the full predictions table and the summed scorer counters.
    """
    import pyarrow as pa

    nperm = len(permutations(cfg.permutations))
    total = len(ordered) * nperm
    done = 0
    report = _RunningTotal(progress, total)
    report(0)
    tables: list[Any] = []
    stats_total: dict[str, int] = {}
    for ci in range(0, len(ordered), cfg.chunk_items):
        chunk = ordered[ci : ci + cfg.chunk_items]
        shard = folder / f"{ci // cfg.chunk_items:05d}.parquet" if folder is not None else None
        loaded = read_shard(shard, chunk, nperm) if shard and shard.is_file() else None
        if loaded is None:
            before = scorer.stats.as_dict()
            preds = score_items(
                scorer,
                chunk,
                cfg,
                tokenizer=tokenizer,
                model_info=model_info,
                progress=report,
            )
            table = predictions_table(preds)
            after = scorer.stats.as_dict()
            stats = {k: after[k] - before.get(k, 0) for k in after}
            if shard is not None:
                write_shard(shard, table, stats, items_digest(chunk))
                reread = read_shard(shard, chunk, nperm)
                if reread is None:  # pragma: no cover - disk trouble
                    raise DataError(f"{shard}: shard could not be read back after writing")
                table = reread[0]
        else:
            table, stats = loaded
        for k, v in stats.items():
            stats_total[k] = stats_total.get(k, 0) + int(v)
        tables.append(table)
        done += len(chunk) * nperm
        report(done - report.done)  # a shard read back, or what the scorer left unreported
    return (pa.concat_tables(tables) if tables else predictions_table([])), stats_total


@dataclasses.dataclass(frozen=True)
class EvalOutcome:
    """What :func:`run_evaluation` did."""

    out: Path
    """The predictions file."""
    predictions: list[Prediction] | None
    """The predictions (None in a data-parallel run: read ``out``)."""
    processes: int
    """Processes that scored (``accelerate launch`` / torchrun), 1 otherwise."""
    main_process: bool
    """Whether this is the process that wrote ``out``."""
    model: str
    """The model's name as given."""
    load_seconds: float
    """Model loading time."""
    score_seconds: float
    """Scoring time (and the merge of a data-parallel run)."""
    n_rows: int = 0
    """Rows written to ``out`` (items x answer orders); 0 on the processes that did not write."""
    scorer_stats: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """The scorer's counters over all processes (``boundary_merges``, ``split_requests``,
    ``verified_requests``, ...), as the file's metadata records them."""


def run_evaluation(
    model: str,
    items: Sequence[BBQItem],
    cfg: EvalConfig,
    *,
    out: str | Path,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    progress: EvalProgress | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> EvalOutcome:
    """Load a model and score ``items`` into ``out``, in one process or, under
    ``accelerate launch`` / torchrun, data-parallel across all of them.

    Raises:
        ConfigError: invalid settings (e.g. vLLM under several processes).
        ModelError, MissingDependencyError: the model cannot be loaded.
    """
    import time

    import torch
    from accelerate import PartialState

    # one process unless started by `accelerate launch` / torchrun; on machines
    # without CUDA the processes talk over gloo (accelerate's MULTI_CPU)
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    if device is None and state.num_processes > 1:
        device = "cpu" if on_cpu else str(state.device)
    if cfg.backend == "vllm" and state.num_processes > 1:
        raise ConfigError(
            "--backend vllm runs as one process (spread a model over GPUs with "
            "--tensor-parallel-size), not under accelerate launch or torchrun"
        )
    ordered = sort_items(items)
    if not ordered:
        raise ConfigError("the selection is empty; check the categories, contexts and items")
    t0 = time.perf_counter()
    preds: list[Prediction] | None = None
    with loaded_for_eval(
        model, cfg, adapter=adapter, device=device, dtype=dtype, cache_dir=cache_dir
    ) as (loaded, scorer):
        render(ordered[0], cfg.prompt_format, tokenizer=loaded.tokenizer)  # chat template check
        t1 = time.perf_counter()
        name = loaded.spec.name
        if state.num_processes > 1:
            evaluate_distributed(
                loaded,
                ordered,
                cfg,
                out=out,
                progress=progress if state.is_main_process else None,
                provenance=provenance,
            )
        else:
            preds = evaluate_model(
                loaded,
                ordered,
                cfg,
                out=out,
                progress=progress,
                provenance=provenance,
                scorer=scorer,
            )
        del loaded, scorer  # the engine's memory is given back on leaving
    seconds = time.perf_counter() - t1
    meta = read_metadata(out) if state.is_main_process else {}
    return EvalOutcome(
        Path(out),
        preds,
        state.num_processes,
        state.is_main_process,
        name,
        t1 - t0,
        seconds,
        int(meta.get("n_rows", 0)),
        dict(meta.get("scorer_stats", {})),
    )


def evaluate_selection(
    model: str,
    data: BBQData,
    selection: Selection,
    cfg: EvalConfig,
    *,
    out: str | Path,
    heldout: Mapping[str, Collection[int]] | None = None,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    progress: EvalProgress | None = None,
) -> EvalOutcome:
    """The evaluation stage: choose the items of ``data`` that ``selection`` names (the
    ``heldout`` categories on their held-out templates only) and score them into ``out``
    with :func:`run_evaluation`, recording the data's provenance and the selection in the
    file. ``spillover eval`` and the run's evaluations both call this.

    Raises:
        ConfigError: the selection is empty, or as :func:`run_evaluation`.
    """
    items = selection.apply(data.items, heldout=heldout)
    if not items:
        raise ConfigError("the selection is empty; check the categories, contexts and item list")
    provenance = {
        "bbq": data.provenance(),
        "selection": selection.describe(data.categories, heldout=heldout),
    }
    return run_evaluation(
        model, items, cfg, out=out, adapter=adapter, device=device, dtype=dtype,
        cache_dir=cache_dir, progress=progress, provenance=provenance,
    )  # fmt: skip


class _RunningTotal:
    """A scorer progress callback (``n`` more rows done) that reports ``(done, total)``:
    once at ``n == 0`` (the total, before any work), then whenever rows were added."""

    def __init__(self, progress: EvalProgress | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0
        self.started = False

    def __call__(self, n: int) -> None:
        if n <= 0 and self.started:
            return
        self.started = True
        self.done = min(self.total, self.done + max(0, n))
        if self.progress is not None:
            self.progress(self.done, self.total)


def evaluate_distributed(
    loaded_model: LoadedModel,
    items: Sequence[BBQItem],
    cfg: EvalConfig,
    *,
    out: str | Path,
    progress: EvalProgress | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Data-parallel evaluation across the processes of ``accelerate launch``.

    Each process scores a consecutive block of the sorted items (accelerate's
    ``split_between_processes``) into its own resumable part file; after a
    barrier, the main process merges the parts into ``out``, with the same
    rows and row order as a single-process run. With one process this is
    :func:`evaluate_model`.

    Returns:
        ``out``.
    """
    from accelerate import PartialState

    state = PartialState(cpu=loaded_model.device == "cpu")
    ordered = sort_items(items)
    if state.num_processes == 1:
        evaluate_model(
            loaded_model, ordered, cfg, out=out, progress=progress, provenance=provenance
        )
        return Path(out)
    # the main process merges every process's part file: they must meet in one folder
    check_shared_dir(Path(out).parent, state, what="the predictions file and its part files")
    parts = [part_path(out, i, state.num_processes) for i in range(state.num_processes)]
    with state.split_between_processes(ordered) as share:
        evaluate_model(
            loaded_model,
            list(share),
            cfg,
            out=parts[state.process_index],
            progress=progress,
            provenance=provenance,
        )
    state.wait_for_everyone()
    if state.is_main_process:
        merge_prediction_files(parts, out)
    state.wait_for_everyone()
    return Path(out)


# --------------------------------------------------------------------------- summaries


def summarize_predictions(preds: Sequence[Prediction]) -> list[dict[str, Any]]:
    """Accuracy and position statistics per permutation, then pooled (``"all"``).

    Each row: ``permutation``, ``n``, ``accuracy``, ``accuracy_ambig``,
    ``accuracy_disambig``, ``unknown_rate``, ``biased_rate`` (among rows with a
    known target), ``position_0..2`` (share of predictions at each displayed
    position). The pooled row adds ``consistency``: the share of items whose
    predicted answer is the same under every permutation.
    """
    groups: dict[str, list[Prediction]] = {}
    for p in preds:
        groups.setdefault(p.permutation, []).append(p)
    rows = [_summary_row(k, groups[k]) for k in sorted(groups)]
    if len(groups) > 1 or not rows:
        pooled = _summary_row("all", list(preds))
        by_item: dict[tuple[str, int], set[int]] = {}
        for p in preds:
            by_item.setdefault((p.category, p.example_id), set()).add(p.pred_index)
        pooled["consistency"] = (
            sum(len(v) == 1 for v in by_item.values()) / len(by_item) if by_item else None
        )
        rows.append(pooled)
    return rows


def _rate(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _summary_row(name: str, preds: Sequence[Prediction]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "permutation": name,
        "n": len(preds),
        "accuracy": _rate([p.correct for p in preds]),
        "accuracy_ambig": _rate([p.correct for p in preds if p.context_condition == "ambig"]),
        "accuracy_disambig": _rate([p.correct for p in preds if p.context_condition == "disambig"]),
        "unknown_rate": _rate([p.unknown for p in preds]),
        "biased_rate": _rate([bool(p.biased) for p in preds if p.biased is not None]),
    }
    for j in range(3):
        row[f"position_{j}"] = _rate([p.displayed_pred == j for p in preds])
    return row
