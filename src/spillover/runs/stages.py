"""The stage table: one :class:`Stage` record per stage of a sub-run.

A study adds, per likelihood-probe benchmark (``benchmarks:`` in the run config), the base
and the aligned model scored on it, each a stage of its own with its cache key
(:func:`stages_for`), and their paired comparison, written beside BBQ's by the ``compare``
stage. The items a sub-run scores are the benchmark's selection (``probes.<benchmark>``);
when the preference pairs come from that benchmark (``prefs.source``), its target
attributes are drawn from the clusters the split holds out, so no evaluated item was
trained on.

Each stage names its cache key (its config and the digests of the files it reads) and a
run function that does the work through the stage's public face and returns a
:class:`StageResult`. Torch-dependent stages import their packages inside the function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from .._io import atomic_write_json, atomic_write_text, sha256_file
from ..data import PROBES, BBQData, BBQItem
from ..rundir import (
    ADAPTER_DIR,
    COMPARISON_FILE,
    HELDOUT_TARGET_FILE,
    LOG_HISTORY_FILE,
    PAIRS_DIR,
    PREDICTION_FILES,
    PROBE_COMPARISON_FILE,
    canonical_hash,
    probe_predictions,
)
from .config import RunConfig, SubRun

EventFn = Callable[[str, str, Mapping[str, Any]], None]
"""``on_event(stage, status, info)``; status is ``start``, ``skip``, ``done`` or ``progress``;
``start`` and ``skip`` carry the stage's ``label`` (what people read)."""


@dataclass(frozen=True)
class Context:
    """What every stage of one sub-run reads (nothing writes into it)."""

    cfg: RunConfig
    root: Path
    sub: SubRun
    run_dir: Path
    data: BBQData
    items: tuple[BBQItem, ...]
    """The evaluated items (what the evaluations' cache key hashes)."""
    heldout: Mapping[str, tuple[int, ...]] | None
    """Templates the evaluated items of each target are drawn from (None: no restriction)."""
    on_event: EventFn
    probes: Mapping[str, Any] = field(default_factory=dict)
    """The likelihood-probe benchmarks of the study, loaded (``BenchmarkData`` by name)."""


@dataclass(frozen=True)
class StageResult:
    """What a stage produced."""

    outputs: tuple[Path, ...]
    """Files and folders written (their digests go into the completion record)."""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    """What the manifest records of the stage (for evaluations: the model and precision)."""


@dataclass(frozen=True)
class Stage:
    """One stage of a sub-run."""

    name: str
    """What ``--force`` takes and events carry."""
    label: str
    """What people read."""
    folder: str
    """Folder (relative to the run directory) holding the completion record."""
    key: Callable[[Context], Mapping[str, Any]]
    """The parts of the cache key: config values and digests of the inputs."""
    run: Callable[[Context], StageResult]
    """Does the work."""
    recorded: Callable[[Context], Mapping[str, Any]] | None = None
    """The provenance of a skipped stage, read back from its outputs."""


def items_digest(items: Sequence[BBQItem]) -> str:
    """Digest of the evaluated item keys (order-free)."""
    return canonical_hash(sorted([it.category, it.example_id] for it in items))


def base_key(ctx: Context) -> dict[str, Any]:
    files = {f.name: f.sha256 for f in ctx.data.files}
    return {
        "spillover": __version__,
        "bbq": canonical_hash(files),
        "model": ctx.sub.model,
        "dtype": ctx.cfg.dtype,
    }


def run_digest(ctx: Context, rel: str) -> str:
    return sha256_file(ctx.run_dir / rel)


# --------------------------------------------------------------------------- evaluations


def _eval_key(ctx: Context) -> dict[str, Any]:
    return {
        **base_key(ctx),
        "selection": dataclasses.asdict(ctx.cfg.selection_for(ctx.sub)),
        "eval": ctx.cfg.eval_for(ctx.sub).to_dict(),
        "items": items_digest(ctx.items),
    }


def _evaluate(ctx: Context, stage: str, adapter: Path | None, rel: str) -> StageResult:
    from ..evaluate import evaluate_selection

    out = ctx.run_dir / rel

    def progress(done: int, total: int) -> None:
        ctx.on_event(stage, "progress", {"done": done, "total": total})

    evaluate_selection(
        ctx.sub.model, ctx.data, ctx.cfg.selection_for(ctx.sub), ctx.cfg.eval_for(ctx.sub),
        out=out, heldout=ctx.heldout, adapter=adapter, device=ctx.cfg.device,
        dtype=ctx.cfg.dtype, cache_dir=ctx.cfg.bbq.cache_dir, progress=progress,
    )  # fmt: skip
    return StageResult((out,), eval_provenance(out))


def eval_provenance(predictions: Path) -> dict[str, Any]:
    """Model provenance of an evaluation and how its predictions were computed (backend,
    resolved precision, bf16 close calls rescored in full precision), read from the
    predictions file's own metadata, so a resumed run that skips the stage reports it too."""
    from ..predictions import read_metadata

    meta = read_metadata(predictions)
    config = meta.get("config", {})
    return {
        **meta.get("model", {}),
        "backend": config.get("backend"),
        "precision": config.get("precision"),
        "rescored_full_precision": meta.get("scorer_stats", {}).get("verified_requests", 0),
    }


def _run_eval_base(ctx: Context) -> StageResult:
    return _evaluate(ctx, "eval-base", None, PREDICTION_FILES["base"])


def _run_eval_aligned(ctx: Context) -> StageResult:
    return _evaluate(ctx, "eval-aligned", ctx.run_dir / ADAPTER_DIR, PREDICTION_FILES["aligned"])


def _aligned_key(ctx: Context) -> dict[str, Any]:
    return {
        **_eval_key(ctx),
        "adapter": run_digest(ctx, f"{ADAPTER_DIR}/adapter_model.safetensors"),
    }


# --------------------------------------------------------------------------- pairs, training


def _prefs_key(ctx: Context) -> dict[str, Any]:
    return {**base_key(ctx), "prefs": ctx.cfg.prefs_for(ctx.sub).to_dict()}


def _run_prefs(ctx: Context) -> StageResult:
    from ..align import make_pairs

    out = ctx.run_dir / PAIRS_DIR
    make_pairs(
        ctx.data, ctx.cfg.prefs_for(ctx.sub), out, model=ctx.sub.model,
        cache_dir=ctx.cfg.bbq.cache_dir, overwrite=True,
    )  # fmt: skip
    return StageResult((out,))


def _align_key(ctx: Context) -> dict[str, Any]:
    # the resolved config (preset values included), so a changed preset retrains
    resolved = dataclasses.asdict(ctx.cfg.align_for(ctx.sub, ADAPTER_DIR))
    return {
        **base_key(ctx),
        "align": resolved,
        "pairs": run_digest(ctx, f"{PAIRS_DIR}/train.parquet"),
    }


def _run_align(ctx: Context) -> StageResult:
    from ..align import train_adapter

    adapter_dir = ctx.run_dir / ADAPTER_DIR
    acfg = ctx.cfg.align_for(ctx.sub, adapter_dir)

    def progress(step: int, total: int, logs: Mapping[str, Any]) -> None:
        ctx.on_event("align", "progress", {"done": step, "total": total, **dict(logs)})

    train_adapter(ctx.run_dir / PAIRS_DIR, acfg, progress=progress)
    log = ctx.run_dir / LOG_HISTORY_FILE
    atomic_write_text(log, (adapter_dir / "log_history.json").read_text(encoding="utf-8"))
    return StageResult((adapter_dir, log))


# --------------------------------------------------------------------------- statistics, report


def _compare_key(ctx: Context) -> dict[str, Any]:
    key = {
        "compare": ctx.cfg.compare_for(ctx.sub).to_dict(),
        "base": run_digest(ctx, PREDICTION_FILES["base"]),
        "aligned": run_digest(ctx, PREDICTION_FILES["aligned"]),
        "split": run_digest(ctx, f"{PAIRS_DIR}/split.json"),
    }
    probes = compare_key(ctx)
    return {**key, "probes": probes} if probes else key


def _run_compare(ctx: Context) -> StageResult:
    from ..align import heldout_for
    from ..stats import compare_files

    rd = ctx.run_dir
    _, held = heldout_for(rd / PAIRS_DIR / "split.json", ctx.sub.target, ctx.data.items)
    result = compare_files(
        rd / PREDICTION_FILES["base"],
        rd / PREDICTION_FILES["aligned"],
        ctx.data,
        ctx.cfg.compare_for(ctx.sub),
        heldout=held,
    )
    comparison_json = rd / COMPARISON_FILE
    comparison_csv = comparison_json.with_suffix(".csv")
    atomic_write_json(comparison_json, result.comparison.to_json())
    atomic_write_text(comparison_csv, result.comparison.to_csv())
    atomic_write_json(rd / HELDOUT_TARGET_FILE, result.heldout_target)
    probes = compare_probe_runs(ctx)
    written = (comparison_json, comparison_csv, rd / HELDOUT_TARGET_FILE)
    return StageResult((*written, probes) if probes is not None else written)


def _report_key(ctx: Context) -> dict[str, Any]:
    return {
        "report": dataclasses.asdict(ctx.cfg.report),
        "comparison": run_digest(ctx, COMPARISON_FILE),
        "log": run_digest(ctx, LOG_HISTORY_FILE),
    }


def _run_report(ctx: Context) -> StageResult:
    from ..report import write_report

    path = write_report(ctx.run_dir, ctx.cfg.report)
    # the figures too: a deleted figure (a broken link in the report) makes the stage rerun
    written = (path, ctx.run_dir / "report.md", ctx.run_dir / "figures")
    return StageResult(tuple(p for p in written if p.exists()))


def _recorded_eval(rel: str) -> Callable[[Context], Mapping[str, Any]]:
    return lambda ctx: eval_provenance(ctx.run_dir / rel)


def _folder(rel: str) -> str:
    return str(Path(rel).parent)


# --------------------------------------------------------------------------- probe benchmarks

_SCORING_KEYS = (
    "batch_tokens", "boundary", "chunk_items", "precision", "verify_margin", "backend",
    "tensor_parallel_size", "max_model_len",
)  # fmt: skip
"""The ``eval`` settings a probe benchmark's scores depend on (prompt formats, answer
orders and BBQ's length normalisations do not apply to it)."""


def probe_heldout(ctx: Context, benchmark: str) -> dict[str, tuple[str, ...]] | None:
    """Clusters the benchmark's target items are drawn from, when the pairs come from it."""
    pcfg = ctx.cfg.prefs_for(ctx.sub)
    if pcfg.source != benchmark or pcfg.heldout_frac <= 0:
        return None
    from ..align import probe_target_split

    return probe_target_split(ctx.probes[benchmark].items, pcfg)


def probe_items_for(ctx: Context, benchmark: str) -> list[Any]:
    """The items of a probe benchmark the sub-run scores (its selection, on the held-out
    clusters when the pairs come from it): what its evaluation stages score, what a plan counts."""
    selection = ctx.cfg.probe_selection_for(ctx.sub, benchmark)
    return selection.apply(ctx.probes[benchmark].items, probe_heldout(ctx, benchmark))


def _key(benchmark: str, role: str) -> Callable[[Context], Mapping[str, Any]]:
    def key(ctx: Context) -> Mapping[str, Any]:
        data = ctx.probes[benchmark]
        scoring = ctx.cfg.eval_for(ctx.sub).to_dict()
        selection = ctx.cfg.probe_selection_for(ctx.sub, benchmark)
        held = probe_heldout(ctx, benchmark)
        out: dict[str, Any] = {
            **base_key(ctx),
            "benchmark": benchmark,
            "data": canonical_hash({f.name: f.sha256 for f in data.files}),
            "selection": dataclasses.asdict(selection),
            "heldout": {a: list(c) for a, c in held.items()} if held else None,
            "eval": {k: scoring.get(k) for k in _SCORING_KEYS},
        }
        if role == "aligned":
            out["adapter"] = run_digest(ctx, f"{ADAPTER_DIR}/adapter_model.safetensors")
        return out

    return key


def _run(benchmark: str, role: str) -> Callable[[Context], StageResult]:
    def run(ctx: Context) -> StageResult:
        from ..evaluate import evaluate_benchmark

        name = stage_name(benchmark, role)
        out = ctx.run_dir / probe_predictions(benchmark, role)

        def progress(done: int, total: int) -> None:
            ctx.on_event(name, "progress", {"done": done, "total": total})

        evaluate_benchmark(
            ctx.sub.model, ctx.probes[benchmark], ctx.cfg.probe_selection_for(ctx.sub, benchmark),
            ctx.cfg.eval_for(ctx.sub), out=out,
            adapter=ctx.run_dir / ADAPTER_DIR if role == "aligned" else None,
            device=ctx.cfg.device, dtype=ctx.cfg.dtype, cache_dir=ctx.cfg.bbq.cache_dir,
            progress=progress, heldout=probe_heldout(ctx, benchmark),
        )  # fmt: skip
        return StageResult((out,), eval_provenance(out))

    return run


def stage_name(benchmark: str, role: str) -> str:
    """``eval-base-crows-pairs``, ``eval-aligned-winogender``, ..."""
    return f"eval-{role}-{benchmark}"


def probe_stage(benchmark: str, role: str) -> Stage:
    """The evaluation of one model (``base`` or ``aligned``) on a probe benchmark."""
    rel = probe_predictions(benchmark, role)
    return Stage(
        stage_name(benchmark, role),
        f"evaluate {role} model on {PROBES[benchmark].title}",
        str(Path(rel).parent),
        _key(benchmark, role),
        _run(benchmark, role),
        lambda ctx: eval_provenance(ctx.run_dir / rel),
    )


PROBE_STAGE_NAMES: tuple[str, ...] = tuple(
    stage_name(b, r) for r in ("base", "aligned") for b in PROBES
)
"""Every probe evaluation stage a study can have (what ``--force`` accepts besides BBQ's)."""


def compare_key(ctx: Context) -> dict[str, Any]:
    """The probe predictions' digests, for the ``compare`` stage's key (empty without probes)."""
    return {
        b: [run_digest(ctx, probe_predictions(b, r)) for r in ("base", "aligned")]
        for b in ctx.cfg.benchmarks
        if b in PROBES
    }


def compare_probe_runs(ctx: Context) -> Path | None:
    """Compare both models on every probe benchmark of the study (one correction family)
    and write ``stats/probes.json``; None without probe benchmarks."""
    from .._io import atomic_write_json
    from ..predictions import join_with_items, read_predictions
    from ..stats import compare_probes

    names = [b for b in ctx.cfg.benchmarks if b in PROBES]
    if not names:
        return None
    frames: dict[str, list[Any]] = {"base": [], "aligned": []}
    for b in names:
        items = ctx.probes[b].frame()
        for role in frames:
            preds = read_predictions(ctx.run_dir / probe_predictions(b, role), benchmark=b)
            frames[role].append(join_with_items(preds, items))
    result = compare_probes(frames["base"], frames["aligned"], ctx.cfg.compare_for(ctx.sub))
    warnings = [w for b in names for w in ctx.probes[b].warnings]
    result.warnings = [*warnings, *result.warnings]
    out = ctx.run_dir / PROBE_COMPARISON_FILE
    atomic_write_json(out, result.to_json())
    return out


STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        "eval-base",
        "evaluate base model",
        _folder(PREDICTION_FILES["base"]),
        _eval_key,
        _run_eval_base,
        _recorded_eval(PREDICTION_FILES["base"]),
    ),
    Stage("prefs", "build preference pairs", PAIRS_DIR, _prefs_key, _run_prefs),
    Stage("align", "train adapter", _folder(ADAPTER_DIR), _align_key, _run_align),
    Stage(
        "eval-aligned",
        "evaluate aligned model",
        _folder(PREDICTION_FILES["aligned"]),
        _aligned_key,
        _run_eval_aligned,
        _recorded_eval(PREDICTION_FILES["aligned"]),
    ),
    Stage("compare", "compare", _folder(COMPARISON_FILE), _compare_key, _run_compare),
    Stage("report", "write report", "figures", _report_key, _run_report),
)
"""Every stage of a sub-run, in order."""

STAGES: tuple[str, ...] = tuple(s.name for s in STAGE_TABLE)
"""BBQ's stage names, in order (what ``--force`` takes, with :data:`PROBE_STAGE_NAMES`)."""


def stages_for(cfg: RunConfig) -> tuple[Stage, ...]:
    """The stages of a sub-run of ``cfg``, in order: BBQ's, with each probe benchmark's
    base evaluation after BBQ's and its aligned evaluation after BBQ's."""
    probes = [b for b in cfg.benchmarks if b != "bbq"]
    out: list[Stage] = []
    for stage in STAGE_TABLE:
        out.append(stage)
        if stage.name in ("eval-base", "eval-aligned"):
            role = stage.name.removeprefix("eval-")
            out.extend(probe_stage(b, role) for b in probes)
    return tuple(out)
