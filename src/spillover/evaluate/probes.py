"""Scoring the likelihood-probe benchmarks (CrowS-Pairs, StereoSet, WinoBias, Winogender).

Each :class:`~spillover.data.ProbeItem` is one :class:`ChoiceRequest`: its context and
options, scored by the same scorer as BBQ (packed, bf16-verified, vLLM) and tokenised by
the same :class:`ChoiceEncoder`, so an empty context is the tokenizer's BOS (else EOS)
token as lm-evaluation-harness scores CrowS-Pairs. The stored scores are the summed
log-probabilities; the benchmark's normalisation (summed, or per scored token for
StereoSet) decides ``pred_index``. Predictions follow
:class:`~spillover.predictions.ProbePrediction`; finished chunks are shards, so an
interrupted evaluation resumes.
"""

from __future__ import annotations

import itertools
import logging
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data import PROBES, BenchmarkData, ProbeItem, ProbeSelection
from ..errors import ConfigError, DataError
from ..predictions import KINDS, ProbePrediction, RecordKind, write_table
from .config import EvalConfig
from .hf import HFChoiceScorer, compile_requested
from .run import EvalOutcome, loaded_for_eval, resolve_precision
from .scoring import ChoiceRequest, ChoiceScorer, ChoiceScores
from .shards import MANIFEST_FORMAT, items_digest, open_shards, read_shard, shard_dir, write_shard

logger = logging.getLogger(__name__)

ProbeProgress = Callable[[int, int], None]
"""``progress(done, total)`` in scored items."""


def decision_scores(scores: ChoiceScores, normalisation: str) -> list[float]:
    """What options are compared by: the summed log-probability, or (``mean``) per scored
    token, as StereoSet's causal-LM scorer compares them (Nadeem et al. 2021, upstream
    ``code/eval_generative_models.py``: the mean log-probability per token)."""
    if normalisation == "sum":
        return [float(x) for x in scores.logprobs]
    return [lp / max(n, 1) for lp, n in zip(scores.logprobs, scores.n_tokens, strict=True)]


def _closest_gap(values: Sequence[float]) -> float:
    """The smallest gap between any two options (every pairwise comparison must hold)."""
    gaps = [abs(a - b) for a, b in itertools.combinations(values, 2)]
    return min(gaps) if gaps else float("inf")


def probe_prediction(
    item: ProbeItem, scores: ChoiceScores, model_info: Mapping[str, Any]
) -> ProbePrediction:
    """One item's scores as a :class:`ProbePrediction` (ties go to the earlier option)."""
    norm = PROBES[item.benchmark].normalisation
    decision = decision_scores(scores, norm)
    pred = max(range(len(decision)), key=lambda j: (decision[j], -j))
    lps = [float(x) for x in scores.logprobs]
    ntok = [int(n) for n in scores.n_tokens]
    three = len(lps) == 3
    return ProbePrediction(
        benchmark=item.benchmark,
        item_id=item.item_id,
        attribute=item.attribute,
        bias_type=item.bias_type,
        cluster=item.cluster,
        split=item.split,
        group=item.group,
        label=item.label,
        n_options=len(lps),
        score_0=lps[0],
        score_1=lps[1],
        score_2=lps[2] if three else None,
        n_tokens_0=ntok[0],
        n_tokens_1=ntok[1],
        n_tokens_2=ntok[2] if three else None,
        pred_index=pred,
        normalisation=norm,
        model=str(model_info.get("model")),
        model_id=str(model_info.get("model_id")),
        model_revision=model_info.get("revision"),
        adapter=model_info.get("adapter"),
    )


def score_probes(
    scorer: ChoiceScorer,
    items: Sequence[ProbeItem],
    cfg: EvalConfig,
    *,
    model_info: Mapping[str, Any],
    progress: Callable[[int], None] | None = None,
) -> list[ProbePrediction]:
    """Score probe items (no files), one prediction per item, in the given order.

    With ``cfg.precision == "bf16-verified"`` the pass runs in bfloat16 and every item whose
    closest pair of options is nearer than ``cfg.verify_margin`` is scored again in full
    precision (for StereoSet every pairwise comparison counts, not only the top two).
    """
    requests = [ChoiceRequest(it.context, it.options) for it in items]

    def close_call(i: int, scores: ChoiceScores) -> bool:
        norm = PROBES[items[i].benchmark].normalisation
        return _closest_gap(decision_scores(scores, norm)) < cfg.verify_margin

    verify = close_call if cfg.precision == "bf16-verified" else None
    scores = scorer.score(requests, progress, rescore=verify)
    return [probe_prediction(it, s, model_info) for it, s in zip(items, scores, strict=True)]


def probes_table(preds: Sequence[ProbePrediction], benchmark: str) -> Any:
    """Probe predictions as a pyarrow Table with the benchmark's record kind's schema."""
    import pyarrow as pa

    kind = KINDS[benchmark]
    cols = {c: [getattr(p, c) for p in preds] for c in kind.columns}
    return pa.Table.from_pydict(cols, schema=kind.arrow_schema())


def _score_chunks(
    scorer: ChoiceScorer,
    items: Sequence[ProbeItem],
    cfg: EvalConfig,
    kind: RecordKind,
    folder: Path,
    model_info: Mapping[str, Any],
    progress: ProbeProgress | None,
) -> tuple[list[Any], dict[str, int]]:
    """Score chunk by chunk, reading finished shards from ``folder`` and writing new ones;
    the tables in order and the summed scorer counters."""
    total, done = len(items), 0
    if progress is not None:
        progress(0, total)
    tables: list[Any] = []
    stats_total: dict[str, int] = {}
    for ci in range(0, total, cfg.chunk_items):
        chunk = items[ci : ci + cfg.chunk_items]
        shard = folder / f"{ci // cfg.chunk_items:05d}.parquet"
        loaded = read_shard(shard, chunk, 1, kind) if shard.is_file() else None
        if loaded is None:
            before = scorer.stats.as_dict()
            start = done

            def step(n: int, start: int = start) -> None:
                nonlocal done
                done = min(total, done + n)
                if progress is not None and n > 0:
                    progress(done, total)

            preds = score_probes(scorer, chunk, cfg, model_info=model_info, progress=step)
            done = start + len(chunk)
            after = scorer.stats.as_dict()
            stats = {k: after[k] - before.get(k, 0) for k in after}
            write_shard(shard, probes_table(preds, kind.name), stats, items_digest(chunk))
            reread = read_shard(shard, chunk, 1, kind)
            if reread is None:  # pragma: no cover - disk trouble
                raise DataError(f"{shard}: shard could not be read back after writing")
            table = reread[0]
        else:
            table, stats = loaded
            done += len(chunk)
        if progress is not None:
            progress(done, total)
        for k, v in stats.items():
            stats_total[k] = stats_total.get(k, 0) + int(v)
        tables.append(table)
    return tables, stats_total


def evaluate_probe_items(
    loaded_model: Any,
    items: Sequence[ProbeItem],
    cfg: EvalConfig,
    *,
    out: str | Path,
    scorer: ChoiceScorer,
    progress: ProbeProgress | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> tuple[int, dict[str, int]]:
    """Score one benchmark's items chunk by chunk into ``out`` (resumable shards beside
    it, then one file written atomically). Returns the rows written and the scorer's
    counters.

    Raises:
        ConfigError: items of several benchmarks, or shards of another configuration.
    """
    import pyarrow as pa

    from .. import __version__

    names = {it.benchmark for it in items}
    if len(names) != 1:
        raise ConfigError(f"one benchmark per predictions file; got {', '.join(sorted(names))}")
    benchmark = names.pop()
    kind = KINDS[benchmark]
    model_info = loaded_model.provenance()
    manifest = {
        "format": MANIFEST_FORMAT,
        "spillover_version": __version__,
        "benchmark": benchmark,
        "config": cfg.to_dict(),
        "model": model_info,
        "n_items": len(items),
        "items_sha256": items_digest(items),
    }
    folder = shard_dir(out)
    open_shards(folder, manifest)
    tables, stats_total = _score_chunks(scorer, items, cfg, kind, folder, model_info, progress)
    full = pa.concat_tables(tables)
    meta = {
        "spillover_version": __version__,
        "benchmark": benchmark,
        "config": cfg.to_dict(),
        "model": model_info,
        "n_items": len(items),
        "n_rows": full.num_rows,
        "items_sha256": manifest["items_sha256"],
        "scorer_stats": stats_total,
        **dict(provenance or {}),
    }
    write_table(full, Path(out), meta)
    shutil.rmtree(folder, ignore_errors=True)
    return full.num_rows, stats_total


def evaluate_benchmark(
    model: str,
    data: BenchmarkData,
    selection: ProbeSelection,
    cfg: EvalConfig,
    *,
    out: str | Path,
    adapter: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    cache_dir: str | Path | None = None,
    progress: ProbeProgress | None = None,
    heldout: Mapping[str, Collection[str]] | None = None,
) -> EvalOutcome:
    """The evaluation stage for a likelihood-probe benchmark: choose the items of ``data``
    that ``selection`` names and score them into ``out`` (``spillover eval --benchmark``
    and the run's evaluations both call this). One process: a data-parallel launch is
    refused (these benchmarks are small).

    Raises:
        ConfigError: an empty selection, several processes, or as :func:`run_evaluation`.
        ModelError, MissingDependencyError: the model cannot be loaded.
    """
    import time

    from accelerate import PartialState

    items = selection.apply(data.items, heldout=heldout)
    if not items:
        raise ConfigError(
            f"the selection of {data.name} is empty; check the splits, groups and attributes"
        )
    if PartialState(cpu=device == "cpu").num_processes > 1:
        raise ConfigError(
            f"{data.name} is scored in one process; run `spillover eval --benchmark "
            f"{data.name}` without accelerate launch or torchrun"
        )
    t0 = time.perf_counter()
    with loaded_for_eval(
        model, cfg, adapter=adapter, device=device, dtype=dtype, cache_dir=cache_dir
    ) as (loaded, engine):
        scorer = engine
        if scorer is None:
            scorer = HFChoiceScorer(
                loaded.model,
                loaded.tokenizer,
                batch_tokens=cfg.batch_tokens,
                boundary=cfg.boundary,
                compile=compile_requested(),
            )
        cfg = resolve_precision(cfg, loaded, scorer)
        t1 = time.perf_counter()
        described = dict(selection.describe())
        if heldout:
            described["heldout_clusters"] = {a: sorted(c) for a, c in heldout.items()}
        provenance = {"data": data.provenance(), "selection": described}
        rows, stats = evaluate_probe_items(
            loaded, items, cfg, out=out, scorer=scorer, progress=progress, provenance=provenance
        )
        name = loaded.spec.name
        del loaded, engine, scorer  # the engine's memory is given back on leaving
    return EvalOutcome(
        Path(out), None, 1, True, name, t1 - t0, time.perf_counter() - t1, rows, stats
    )
