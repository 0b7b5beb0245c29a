"""One command from model to report: configs, sweeps, resumable run directories.

``run_study`` sequences the stages through their public functions::

    eval-base -> prefs -> align -> eval-aligned -> compare -> report

into one run directory per combination of model x target x method x seed::

    RUN/config.yaml        resolved configuration
    RUN/manifest.json      versions, git revision, seeds, BBQ digests, models, timings
    RUN/eval/base/predictions.parquet
    RUN/prefs/{train,heldout}.parquet, split.json
    RUN/align/adapter/     LoRA adapter, log_history.json, align_config.json
    RUN/align/log_history.json
    RUN/eval/aligned/predictions.parquet
    RUN/stats/comparison.json (+ .csv), heldout_target.json
    RUN/report.html, report.md, figures/

A stage whose completion record matches the hash of its config and inputs, and
whose outputs are intact, is skipped; a stage killed midway runs again (the
evaluator resumes from its shards). With lists of models, targets, methods or
seeds, each combination is a sub-run under ``RUN/<model>__<target>__<method>__s<seed>/``
and a combined report is written at the top.

This module imports torch-dependent stages lazily, inside the stage functions.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import itertools
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from ._config_yaml import YamlDoc, build_dataclass, check_keys, load_yaml, locate, near_match
from ._io import atomic_write_json, atomic_write_text, sha256_file
from ._rundir import (
    ADAPTER_DIR,
    COMPARISON_FILE,
    HELDOUT_FILE,
    LOG_HISTORY_FILE,
    PAIRS_DIR,
    PREDICTION_FILES,
    canonical_hash,
    is_done,
    mark_done,
    write_manifest,
)
from .data import (
    CONTEXTS,
    BBQData,
    BBQItem,
    load_bbq,
    read_item_list,
    resolve_categories,
    select_items,
)
from .errors import ConfigError, MissingDependencyError

logger = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("eval-base", "prefs", "align", "eval-aligned", "compare", "report")
"""Stages of one sub-run, in order."""

DEFAULT_PER_STRATUM = 24
"""Items per category x context in the embedded default run (528 items per evaluation)."""

DEFAULT_STUDY: Mapping[str, Any] = {
    "name": "default",
    "model": "smollm2-135m",
    "target": "gender",
    "method": "dpo",
    "seed": 0,
    "eval": {"per_stratum": DEFAULT_PER_STRATUM, "prompt_format": "lm-eval"},
    "align": {"max_steps": 40},
    "compare": {
        "test": "auto",
        "correction": "holm",
        "alpha": 0.05,
        "bootstrap": 1000,
        "cluster": "template",
    },
}
"""The embedded default study (``spillover run`` without a config; also configs/default.yaml)."""


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class BBQSection:
    """Where BBQ comes from."""

    dir: str | None = None
    """BBQ folder; None: ``$SPILLOVER_BBQ_DIR``, the cache, then download."""
    cache_dir: str | None = None
    """Cache root; None: ``$SPILLOVER_CACHE`` or ``~/.cache/spillover``."""
    allow_unverified: bool = False
    """Accept files whose digest differs from the pinned release (recorded as a warning)."""


@dataclass(frozen=True, slots=True)
class EvalSection:
    """Which items both models are evaluated on, and how."""

    categories: tuple[str, ...] | None = None
    """Categories (or aliases); None: all 11."""
    contexts: tuple[str, ...] = CONTEXTS
    """Context conditions evaluated."""
    per_stratum: int | None = DEFAULT_PER_STRATUM
    """Seeded sample of N items per category x context; None: every item."""
    items: str | None = None
    """CSV/JSONL with ``category,example_id`` (instead of a sample)."""
    prompt_format: str = "lm-eval"
    """Prompt format, shared by the preference pairs so training text = evaluation text."""
    permutations: str = "none"
    """Answer orders scored: ``none``, ``cyclic`` or ``all`` (statistics use the original order)."""
    batch_tokens: int = 4096
    """Token budget of one forward pass."""
    length_norm: str = "none"
    """Prediction rule: ``none`` (summed log-prob), ``token``, ``char`` or ``byte``."""
    chunk_items: int = 256
    """Items per shard (the unit an interrupted evaluation resumes from)."""
    precision: str = "auto"
    """``auto``, ``model`` or ``bf16-verified`` (see ``spillover eval --help``)."""
    verify_margin: float = 0.3
    """``bf16-verified``: items whose top-two margin is below this are rescored in full precision."""
    backend: str = "hf"
    """Scoring engine: ``hf`` (transformers) or ``vllm`` (CUDA, ``spillover[vllm]``)."""
    tensor_parallel_size: int = 1
    """GPUs one model is spread over (``vllm`` backend)."""

    def __post_init__(self) -> None:
        if self.chunk_items < 1:
            raise ValueError(f"`chunk_items` must be positive, got {self.chunk_items}")
        if self.per_stratum is not None and self.items is not None:
            raise ValueError("give either `per_stratum` or `items`, not both")
        if self.per_stratum is not None and self.per_stratum < 1:
            raise ValueError(f"`per_stratum` must be positive, got {self.per_stratum}")


@dataclass(frozen=True, slots=True)
class PrefsSection:
    """How preference pairs are built (the target comes from the top-level ``target``)."""

    strategy: str = "stereotype"
    """``stereotype`` or ``all-wrong``."""
    contexts: tuple[str, ...] = CONTEXTS
    """Contexts pairs are drawn from."""
    heldout_frac: float = 0.2
    """Share of the target's templates held out of training."""


@dataclass(frozen=True, slots=True)
class CompareSection:
    """Statistics options (see ``spillover compare``)."""

    test: str = "auto"
    """McNemar variant: exact, midp, chi2, chi2-cc or auto."""
    correction: str = "holm"
    """Multiple-testing correction: holm, bh, bonferroni or none."""
    alpha: float = 0.05
    """Significance level after correction."""
    bootstrap: int = 1000
    """Bootstrap resamples for bias-score CIs (0: none)."""
    cluster: str = "template"
    """Bootstrap unit: ``template`` (question_index clusters) or ``item``."""
    confidence: float = 0.95
    """Confidence level of intervals."""


@dataclass(frozen=True, slots=True)
class ReportSection:
    """Report options."""

    formats: tuple[str, ...] = ("html", "md")
    """Report files to write."""
    figure_formats: tuple[str, ...] = ("png",)
    """Figure files: png and/or svg."""
    title: str | None = None
    """Report title; None: derived from the run."""


# Keys of AlignConfig that the run sets itself (not allowed in the `align` section).
_ALIGN_RESERVED = (
    "model",
    "output_dir",
    "method",
    "seed",
    "device",
    "adapter",
    "overwrite",
    "dtype",
)
_TOP_KEYS = (
    "name", "model", "target", "method", "seed", "device", "dtype",
    "bbq", "eval", "prefs", "align", "compare", "report",
)  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """A whole study; lists in ``models``/``targets``/``methods``/``seeds`` make a sweep."""

    name: str = "spillover"
    """Run name (used in titles)."""
    models: tuple[str, ...] = ("smollm2-135m",)
    """Models (aliases, hub ids, folders)."""
    targets: tuple[tuple[str, ...], ...] = (("Gender_identity",),)
    """Alignment targets; each a tuple of BBQ categories (several = multi-attribute)."""
    methods: tuple[str, ...] = ("dpo",)
    """Preference methods (see ``spillover align --help``)."""
    seeds: tuple[int, ...] = (0,)
    """Seeds (sample, split, LoRA init, data order, bootstrap)."""
    device: str | None = None
    """``cpu``, ``cuda``, ``cuda:N``; None: CUDA when available."""
    dtype: str = "auto"
    """Model dtype: auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16."""
    bbq: BBQSection = field(default_factory=BBQSection)
    """Data source."""
    eval: EvalSection = field(default_factory=EvalSection)
    """Evaluation items and format."""
    prefs: PrefsSection = field(default_factory=PrefsSection)
    """Preference pairs."""
    align: Mapping[str, Any] = field(default_factory=dict)
    """Overrides of the model preset's training defaults (AlignConfig fields)."""
    compare: CompareSection = field(default_factory=CompareSection)
    """Statistics."""
    report: ReportSection = field(default_factory=ReportSection)
    """Report."""

    @classmethod
    def default(cls) -> RunConfig:
        """The embedded default study (:data:`DEFAULT_STUDY`)."""
        return cls.from_mapping(DEFAULT_STUDY)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read and validate a YAML config; unknown keys are errors naming file and line."""
        doc = load_yaml(Path(path))
        return cls.from_mapping(doc.data, doc=doc)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, doc: YamlDoc | None = None) -> RunConfig:
        """Validate a mapping (as read from YAML)."""
        check_keys(data, _TOP_KEYS, doc=doc, section=())

        def where(*keys: str) -> str:
            return locate(doc, keys)

        def str_list(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            value = data.get(key)
            if value is None:
                return default
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and v.strip() for v in values):
                raise ConfigError(f"{where(key)}: `{key}` must be a name or a list of names")
            return tuple(values)

        models = str_list("model", cls.models)
        from .models import MODEL_ALIASES

        for i, m in enumerate(models):
            if not Path(m).expanduser().exists() and "/" not in m and m not in MODEL_ALIASES:
                raise ConfigError(
                    f"{where('model', str(i))}: unknown model preset `{m}`; use a preset "
                    f"({', '.join(MODEL_ALIASES)}), a hub id (org/name) or a folder"
                )
        methods = str_list("method", cls.methods)
        try:
            from .align import METHODS
        except ImportError:  # pragma: no cover - align ships with the package
            METHODS = methods
        for i, m in enumerate(methods):
            if m not in METHODS:
                raise ConfigError(
                    f"{where('method', str(i))}: unknown method `{m}`{near_match(m, list(METHODS))}; "
                    f"expected one of {', '.join(METHODS)}"
                )
        raw_targets = data.get("target", ["Gender_identity"])
        raw_targets = raw_targets if isinstance(raw_targets, list) else [raw_targets]
        targets: list[tuple[str, ...]] = []
        for i, t in enumerate(raw_targets):
            parts = t if isinstance(t, list) else str(t).split("+")
            try:
                targets.append(resolve_categories([str(p) for p in parts]))
            except ConfigError as exc:
                raise ConfigError(f"{where('target', str(i))}: `target`: {exc}") from None
        seeds_raw = data.get("seed", [0])
        seeds_list = seeds_raw if isinstance(seeds_raw, list) else [seeds_raw]
        if not seeds_list or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds_list
        ):
            raise ConfigError(f"{where('seed')}: `seed` must be an integer or a list of integers")
        name = data.get("name", cls.name)
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where('name')}: `name` must be a non-empty string")
        device = data.get("device")
        if device is not None and not isinstance(device, str):
            raise ConfigError(f"{where('device')}: `device` must be a string such as cpu or cuda")
        dtype = data.get("dtype", "auto")
        from .models import resolve_dtype

        try:
            resolve_dtype(str(dtype), "cpu")
        except ConfigError as exc:
            raise ConfigError(f"{where('dtype')}: {exc}") from None
        align = dict(data.get("align") or {})
        _check_align_overrides(align, doc)
        evs = build_dataclass(EvalSection, data.get("eval"), doc=doc, section=["eval"])
        _check_eval(evs, doc)
        prefs = build_dataclass(PrefsSection, data.get("prefs"), doc=doc, section=["prefs"])
        cmp_ = build_dataclass(CompareSection, data.get("compare"), doc=doc, section=["compare"])
        _check_choice(cmp_.test, ("exact", "midp", "chi2", "chi2-cc", "auto"), "compare.test", doc)
        _check_choice(
            cmp_.correction, ("holm", "bh", "bonferroni", "none"), "compare.correction", doc
        )
        _check_choice(cmp_.cluster, ("item", "template"), "compare.cluster", doc)
        _check_choice(prefs.strategy, ("stereotype", "all-wrong"), "prefs.strategy", doc)
        _check_compare(cmp_, doc)
        return cls(
            name=name,
            models=models,
            targets=tuple(targets),
            methods=methods,
            seeds=tuple(int(s) for s in seeds_list),
            device=device,
            dtype=str(dtype),
            bbq=build_dataclass(BBQSection, data.get("bbq"), doc=doc, section=["bbq"]),
            eval=evs,
            prefs=prefs,
            align=align,
            compare=cmp_,
            report=build_dataclass(ReportSection, data.get("report"), doc=doc, section=["report"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.yaml`` records)."""
        out: dict[str, Any] = {
            "name": self.name,
            "model": list(self.models),
            "target": ["+".join(t) for t in self.targets],
            "method": list(self.methods),
            "seed": list(self.seeds),
            "device": self.device,
            "dtype": self.dtype,
        }
        for key in ("bbq", "eval", "prefs", "compare", "report"):
            sec = dataclasses.asdict(getattr(self, key))
            out[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()}
        out["align"] = dict(self.align)
        return out

    def sub_runs(self) -> list[SubRun]:
        """Every model x target x method x seed combination."""
        return [
            SubRun(m, t, meth, s)
            for m, t, meth, s in itertools.product(
                self.models, self.targets, self.methods, self.seeds
            )
        ]

    @property
    def is_sweep(self) -> bool:
        """Whether more than one combination is run."""
        return len(self.sub_runs()) > 1


def _check_choice(value: str, allowed: Sequence[str], key: str, doc: YamlDoc | None) -> None:
    if value not in allowed:
        where = locate(doc, key.split("."))
        near = difflib.get_close_matches(str(value), list(allowed), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{where}: `{key}`={value!r}; expected one of {', '.join(allowed)}{hint}")


def _check_compare(cmp_: CompareSection, doc: YamlDoc | None) -> None:
    from .stats import CompareConfig

    try:
        CompareConfig(**dataclasses.asdict(cmp_))
    except ConfigError as exc:
        where = locate(doc, ["compare"])
        raise ConfigError(f"{where}: `compare`: {exc}") from None


def _check_eval(evs: EvalSection, doc: YamlDoc | None) -> None:
    from .evaluate import BACKENDS, PRECISIONS
    from .prompts import PERMUTATION_MODES, PROMPT_FORMATS

    _check_choice(evs.prompt_format, PROMPT_FORMATS, "eval.prompt_format", doc)
    _check_choice(evs.permutations, PERMUTATION_MODES, "eval.permutations", doc)
    _check_choice(evs.precision, PRECISIONS, "eval.precision", doc)
    _check_choice(evs.backend, BACKENDS, "eval.backend", doc)
    if not evs.verify_margin >= 0:
        where = locate(doc, ["eval", "verify_margin"])
        raise ConfigError(f"{where}: `eval.verify_margin`={evs.verify_margin}; expected >= 0")
    if evs.backend == "vllm" and evs.precision == "bf16-verified":
        where = locate(doc, ["eval", "precision"])
        raise ConfigError(
            f"{where}: `eval.precision`='bf16-verified' needs `eval.backend`: hf "
            "(vLLM computes in the weights' dtype)"
        )
    if evs.tensor_parallel_size < 1 or (evs.backend != "vllm" and evs.tensor_parallel_size != 1):
        where = locate(doc, ["eval", "tensor_parallel_size"])
        raise ConfigError(
            f"{where}: `eval.tensor_parallel_size`={evs.tensor_parallel_size}; "
            "expected 1, or >= 1 with `eval.backend`: vllm"
        )
    for i, c in enumerate(evs.contexts):
        if c not in CONTEXTS:
            where = locate(doc, ["eval", "contexts", str(i)])
            raise ConfigError(f"{where}: `eval.contexts`={c!r}; expected ambig or disambig")
    if evs.categories is not None:
        try:
            resolve_categories(evs.categories)
        except ConfigError as exc:
            where = locate(doc, ["eval", "categories"])
            raise ConfigError(f"{where}: `eval.categories`: {exc}") from None


def _check_align_overrides(align: Mapping[str, Any], doc: YamlDoc | None) -> None:
    from .align import AlignConfig

    names = [f.name for f in dataclasses.fields(AlignConfig) if f.name not in _ALIGN_RESERVED]
    for key in align:
        if key in _ALIGN_RESERVED:
            where = locate(doc, ["align", key])
            raise ConfigError(
                f"{where}: `align.{key}` is set by the run (use the top-level `{key}` key)"
                if key in ("model", "method", "seed", "device", "dtype")
                else f"{where}: `align.{key}` is managed by the run directory; remove it"
            )
    check_keys(align, names, doc=doc, section=["align"])
    # type and range checks: build a throwaway config through AlignConfig's own validation
    try:
        AlignConfig.from_preset("smollm2-135m", "unused", **dict(align))
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{locate(doc, ['align'])}: `align`: {exc}") from None


@dataclass(frozen=True, slots=True)
class SubRun:
    """One model x target x method x seed combination."""

    model: str
    target: tuple[str, ...]
    method: str
    seed: int

    @property
    def slug(self) -> str:
        """Folder name of this sub-run inside a sweep."""
        model = re.sub(
            r"[^A-Za-z0-9.-]+", "-", Path(self.model).name if "/" in self.model else self.model
        )
        target = "+".join(self.target)
        return f"{model}__{target}__{self.method}__s{self.seed}"


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    """What a run will do, before doing it (``--dry-run``)."""

    sub_runs: tuple[SubRun, ...]
    n_eval_items: int
    n_train_pairs: dict[str, int]
    n_heldout_pairs: dict[str, int]
    estimate: dict[str, Any]
    stages: tuple[str, ...] = STAGES

    def lines(self) -> list[str]:
        """Human-readable plan."""
        out = [f"{len(self.sub_runs)} sub-run(s); stages: {' -> '.join(self.stages)}"]
        for sr in self.sub_runs:
            t = "+".join(sr.target)
            out.append(
                f"  {sr.slug}: model {sr.model}, target {t}, method {sr.method}, seed {sr.seed}; "
                f"eval {self.n_eval_items} items x 2 models, "
                f"pairs {self.n_train_pairs.get(t, 0)} train / {self.n_heldout_pairs.get(t, 0)} held out"
            )
        for model, est in self.estimate.items():
            out.append(f"  compute {model}: {est['summary']}")
        return out


# parameter counts of the presets (for compute estimates without loading anything)
_PARAMS = {
    "smollm2-135m": 134.5e6,
    "mistral-7b": 7.25e9,
    "llama-3.1-8b": 8.03e9,
    "qwen-2.5-7b": 7.62e9,
}


def _estimate(model: str, items: Sequence[BBQItem], steps: int, batch: int) -> dict[str, Any]:
    # ~4 characters per token is a rough English average; prompts are shared by their answers
    eval_tokens = sum(
        (len(it.context) + len(it.question) + 12 + sum(len(a) + 1 for a in it.answers)) / 4
        for it in items
    )
    # a pair is a prompt plus two short answers (~40 characters)
    pair_tokens = (
        sum(len(it.context) + len(it.question) + 40 for it in items) / max(1, len(items)) / 4
    )
    params = _PARAMS.get(model)
    if params is None:
        return {
            "summary": f"~{eval_tokens * 2 / 1e6:.2f} M tokens scored (parameter count unknown)"
        }
    eval_flops = 2 * params * eval_tokens * 2  # two evaluations
    # policy forward + backward (~3x forward) on chosen and rejected, plus a reference forward
    train_flops = steps * batch * 2 * pair_tokens * params * 2 * 4
    total = eval_flops + train_flops
    return {
        "params": params,
        "eval_tokens": int(eval_tokens * 2),
        "flops": total,
        "summary": (
            f"~{total / 1e12:.1f} TFLOP ({int(eval_tokens * 2):,} tokens scored, "
            f"{steps} training steps x {batch} pairs); about {total / 2e11 / 60:.0f} min at "
            f"0.2 TFLOP/s (2-core CPU), {total / 4e14:.1f} s at 400 TFLOP/s (one H100/H200, bf16)"
        ),
    }


# --------------------------------------------------------------------------- running


EventFn = Callable[[str, str, Mapping[str, Any]], None]
"""``on_event(stage, status, info)``; status is ``start``, ``skip``, ``done`` or ``progress``."""


@dataclass
class _Context:
    cfg: RunConfig
    root: Path
    sub: SubRun
    run_dir: Path
    data: BBQData
    items: list[BBQItem]
    force: set[str]
    on_event: EventFn
    timings: dict[str, float] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)


def _item_keys_digest(items: Iterable[BBQItem]) -> str:
    return canonical_hash(sorted([it.category, it.example_id] for it in items))


def _bbq_digest(data: BBQData) -> str:
    return canonical_hash({f.name: f.sha256 for f in data.files})


def load_items(cfg: RunConfig, seed: int, data: BBQData) -> list[BBQItem]:
    """The evaluation items of a run: a seeded stratified sample, a list, or all."""
    ev = cfg.eval
    keys = read_item_list(ev.items) if ev.items is not None else None
    return select_items(
        data.items,
        categories=ev.categories,
        contexts=ev.contexts,
        keys=keys,
        per_stratum=ev.per_stratum,
        seed=seed,
    )


def plan_run(cfg: RunConfig, *, data: BBQData | None = None) -> Plan:
    """Resolve items and pairs (cheap) and estimate compute, without loading a model."""
    from .align import AlignConfig
    from .prefs import PrefsConfig, build_pairs

    data = data or _load_data(cfg)
    items = load_items(cfg, cfg.seeds[0], data)
    train: dict[str, int] = {}
    held: dict[str, int] = {}
    fmt = "lm-eval" if cfg.eval.prompt_format == "letters-chat" else cfg.eval.prompt_format
    for target in cfg.targets:
        pairs = build_pairs(
            data.items,
            PrefsConfig(
                targets=target,
                strategy=cfg.prefs.strategy,  # type: ignore[arg-type]
                contexts=cfg.prefs.contexts,
                heldout_frac=cfg.prefs.heldout_frac,
                seed=cfg.seeds[0],
                prompt_format=fmt,
            ),
        )
        train["+".join(target)] = len(pairs.train)
        held["+".join(target)] = len(pairs.heldout)
    estimate: dict[str, Any] = {}
    for model in cfg.models:
        acfg = AlignConfig.from_preset(model, "unused", method=cfg.methods[0], **dict(cfg.align))
        steps = acfg.max_steps or int(
            (acfg.epochs or 1)
            * max(train.values() or [0])
            / max(1, acfg.batch_size * acfg.grad_accum)
        )
        estimate[model] = _estimate(model, items, steps, acfg.batch_size * acfg.grad_accum)
    return Plan(tuple(cfg.sub_runs()), len(items), train, held, estimate)


def _load_data(cfg: RunConfig) -> BBQData:
    return load_bbq(
        cfg.bbq.dir, cache_dir=cfg.bbq.cache_dir, allow_unverified=cfg.bbq.allow_unverified
    )


def run_study(
    cfg: RunConfig,
    out: str | Path,
    *,
    force: Iterable[str] = (),
    on_event: EventFn | None = None,
) -> list[Path]:
    """Run every sub-run of ``cfg`` into ``out``; returns the sub-run directories.

    Args:
        cfg: The study.
        out: Run directory (created).
        force: Stages to rerun even when complete (later stages follow); ``all`` reruns everything.
        on_event: Progress callback.

    Raises:
        ConfigError, DataError, ModelError, MissingDependencyError.
    """
    forced = set(force)
    unknown = forced - set(STAGES) - {"all"}
    if unknown:
        raise ConfigError(
            f"`--force` {', '.join(sorted(unknown))}: unknown stage; expected one of {', '.join(STAGES)} or all"
        )
    if "all" in forced:
        forced = set(STAGES)
    if cfg.eval.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        from ._eval_vllm import INSTALL_HINT

        raise MissingDependencyError(f"`eval.backend`: vllm: {INSTALL_HINT}")
    root = Path(out).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    _write_config(root, cfg)
    data = _load_data(cfg)
    events = on_event or (lambda stage, status, info: None)
    dirs: list[Path] = []
    for sub in cfg.sub_runs():
        run_dir = root / sub.slug if cfg.is_sweep else root
        run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.is_sweep:
            _write_config(run_dir, cfg, sub)
        items = load_items(cfg, sub.seed, data)
        ctx = _Context(cfg, root, sub, run_dir, data, items, forced, events)
        _run_one(ctx)
        dirs.append(run_dir)
    if cfg.is_sweep:
        from .report import write_combined_report

        events("combined-report", "start", {})
        write_combined_report(root, dirs)
        events("combined-report", "done", {"path": str(root / "report.html")})
    return dirs


def _write_config(run_dir: Path, cfg: RunConfig, sub: SubRun | None = None) -> None:
    data = cfg.to_dict()
    if sub is not None:
        data.update(
            {
                "model": [sub.model],
                "target": ["+".join(sub.target)],
                "method": [sub.method],
                "seed": [sub.seed],
            }
        )
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))


_EVAL_STAGES = {"eval-base": PREDICTION_FILES["base"], "eval-aligned": PREDICTION_FILES["aligned"]}


def _run_one(ctx: _Context) -> None:
    steps: list[tuple[str, Callable[[_Context], tuple[str, list[Path]]]]] = [
        ("eval-base", _stage_eval_base),
        ("prefs", _stage_prefs),
        ("align", _stage_align),
        ("eval-aligned", _stage_eval_aligned),
        ("compare", _stage_compare),
        ("report", _stage_report),
    ]
    forcing = False
    for name, fn in steps:
        forcing = forcing or name in ctx.force
        key = _stage_key(ctx, name)
        stage_dir = _stage_dir(ctx.run_dir, name)
        done = None if forcing else is_done(ctx.run_dir, stage_dir, key)
        if done is None and not forcing and name == "eval-base" and ctx.cfg.is_sweep:
            done = _reuse_base_eval(ctx, stage_dir, key)
        if done is not None:
            ctx.timings[name] = done.seconds
            ctx.keys[name] = key
            if name in _EVAL_STAGES:
                ctx.models[name] = _eval_provenance(ctx.run_dir / _EVAL_STAGES[name])
            ctx.on_event(name, "skip", {"seconds": done.seconds})
            continue
        ctx.on_event(name, "start", {})
        start = time.perf_counter()
        _, outputs = fn(ctx)
        seconds = time.perf_counter() - start
        mark_done(ctx.run_dir, stage_dir, name, key, outputs, seconds)
        ctx.timings[name] = round(seconds, 3)
        ctx.keys[name] = key
        ctx.on_event(name, "done", {"seconds": seconds})
        _write_run_manifest(ctx)
    _write_run_manifest(ctx)


def _reuse_base_eval(ctx: _Context, stage_dir: Path, key: str) -> Any:
    """In a sweep, copy base predictions another sub-run made with the same key."""
    rel = PREDICTION_FILES["base"]
    for other in sorted(p for p in ctx.root.iterdir() if p.is_dir() and p != ctx.run_dir):
        if is_done(other, (other / rel).parent, key) is None:
            continue
        stage_dir.mkdir(parents=True, exist_ok=True)
        target = ctx.run_dir / rel
        tmp = target.with_name(f".{target.name}.copy")
        shutil.copyfile(other / rel, tmp)
        tmp.replace(target)
        logger.info("reusing base predictions of %s", other.name)
        return mark_done(ctx.run_dir, stage_dir, "eval-base", key, [target], 0.0)
    return None


def _stage_dir(run_dir: Path, name: str) -> Path:
    return {
        "eval-base": (run_dir / PREDICTION_FILES["base"]).parent,
        "prefs": run_dir / PAIRS_DIR,
        "align": (run_dir / ADAPTER_DIR).parent,
        "eval-aligned": (run_dir / PREDICTION_FILES["aligned"]).parent,
        "compare": (run_dir / COMPARISON_FILE).parent,
        "report": run_dir / "figures",
    }[name]


def _stage_key(ctx: _Context, name: str) -> str:
    cfg, sub, rd = ctx.cfg, ctx.sub, ctx.run_dir
    bbq = _bbq_digest(ctx.data)
    base = {"spillover": __version__, "bbq": bbq, "model": sub.model, "dtype": cfg.dtype}
    if name == "eval-base":
        parts: dict[str, Any] = {
            **base,
            "eval": dataclasses.asdict(cfg.eval),
            "items": _item_keys_digest(ctx.items),
        }
    elif name == "prefs":
        parts = {
            **base,
            "prefs": dataclasses.asdict(cfg.prefs),
            "target": sub.target,
            "seed": sub.seed,
            "format": cfg.eval.prompt_format,
        }
    elif name == "align":
        parts = {
            **base,
            "align": dict(cfg.align),
            "method": sub.method,
            "seed": sub.seed,
            "pairs": sha256_file(rd / PAIRS_DIR / "train.parquet"),
        }
    elif name == "eval-aligned":
        parts = {
            **base,
            "eval": dataclasses.asdict(cfg.eval),
            "items": _item_keys_digest(ctx.items),
            "adapter": sha256_file(rd / ADAPTER_DIR / "adapter_model.safetensors"),
        }
    elif name == "compare":
        parts = {
            "compare": dataclasses.asdict(cfg.compare),
            "seed": sub.seed,
            "target": sub.target,
            "base": sha256_file(rd / PREDICTION_FILES["base"]),
            "aligned": sha256_file(rd / PREDICTION_FILES["aligned"]),
            "split": sha256_file(rd / PAIRS_DIR / "split.json"),
        }
    else:
        parts = {
            "report": dataclasses.asdict(cfg.report),
            "comparison": sha256_file(rd / COMPARISON_FILE),
            "log": sha256_file(rd / LOG_HISTORY_FILE),
        }
    return canonical_hash(parts)


def _eval_progress(ctx: _Context, stage: str) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        ctx.on_event(stage, "progress", {"done": done, "total": total})

    return progress


def _eval_config(ctx: _Context) -> Any:
    from .evaluate import EvalConfig

    ev = ctx.cfg.eval
    return EvalConfig(
        prompt_format=ev.prompt_format,
        permutations=ev.permutations,
        batch_tokens=ev.batch_tokens,
        length_norm=ev.length_norm,
        chunk_items=ev.chunk_items,
        precision=ev.precision,
        verify_margin=ev.verify_margin,
        seed=ctx.sub.seed,
    )


def _evaluate(ctx: _Context, stage: str, adapter: Path | None, out: Path) -> None:
    from .evaluate import evaluate_model, load_for_eval

    ev = ctx.cfg.eval
    lm, scorer = load_for_eval(
        ctx.sub.model,
        backend=ev.backend,
        adapter=adapter,
        device=ctx.cfg.device,
        dtype=ctx.cfg.dtype,
        cache_dir=ctx.cfg.bbq.cache_dir,
        tensor_parallel_size=ev.tensor_parallel_size,
        seed=ctx.sub.seed,
    )
    evaluate_model(
        lm,
        ctx.items,
        _eval_config(ctx),
        out=out,
        progress=_eval_progress(ctx, stage),
        provenance={"bbq": ctx.data.provenance()},
        scorer=scorer,
    )
    del lm
    ctx.models[stage] = _eval_provenance(out)


def _eval_provenance(predictions: Path) -> dict[str, Any]:
    """Model provenance of an evaluation, with how its predictions were computed (the
    resolved precision, the bf16 close calls rescored in full precision), read from the
    predictions file's own metadata, so a resumed run that skips the stage reports it too."""
    from .evaluate import read_metadata

    meta = read_metadata(predictions)
    return {
        **meta.get("model", {}),
        "precision": meta.get("config", {}).get("precision"),
        "rescored_full_precision": meta.get("scorer_stats", {}).get("verified_requests", 0),
    }


def _stage_eval_base(ctx: _Context) -> tuple[str, list[Path]]:
    out = ctx.run_dir / PREDICTION_FILES["base"]
    _evaluate(ctx, "eval-base", None, out)
    return "eval-base", [out]


def _stage_prefs(ctx: _Context) -> tuple[str, list[Path]]:
    from .prefs import PrefsConfig, build_pairs, write_pairs

    tokenizer = None
    if ctx.cfg.eval.prompt_format == "letters-chat":
        from .models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(ctx.sub.model), cache_dir=ctx.cfg.bbq.cache_dir)
    pcfg = PrefsConfig(
        targets=ctx.sub.target,
        strategy=ctx.cfg.prefs.strategy,  # type: ignore[arg-type]
        contexts=ctx.cfg.prefs.contexts,
        heldout_frac=ctx.cfg.prefs.heldout_frac,
        seed=ctx.sub.seed,
        prompt_format=ctx.cfg.eval.prompt_format,
    )
    pairs = build_pairs(ctx.data.items, pcfg, tokenizer=tokenizer, provenance=ctx.data.provenance())
    out = ctx.run_dir / PAIRS_DIR
    write_pairs(pairs, out, overwrite=True)
    return "prefs", [out / "train.parquet", out / "heldout.parquet", out / "split.json"]


def _stage_align(ctx: _Context) -> tuple[str, list[Path]]:
    from .align import AlignConfig, train_adapter

    adapter_dir = ctx.run_dir / ADAPTER_DIR
    acfg = AlignConfig.from_preset(
        ctx.sub.model,
        adapter_dir,
        method=ctx.sub.method,
        seed=ctx.sub.seed,
        device=ctx.cfg.device,
        overwrite=True,
        **dict(ctx.cfg.align),
    )

    def progress(step: int, total: int, logs: Mapping[str, Any]) -> None:
        ctx.on_event("align", "progress", {"done": step, "total": total, **dict(logs)})

    train_adapter(ctx.run_dir / PAIRS_DIR, acfg, progress=progress)
    log = ctx.run_dir / LOG_HISTORY_FILE
    shutil.copyfile(adapter_dir / "log_history.json", log)
    return "align", [adapter_dir, log]


def _stage_eval_aligned(ctx: _Context) -> tuple[str, list[Path]]:
    out = ctx.run_dir / PREDICTION_FILES["aligned"]
    _evaluate(ctx, "eval-aligned", ctx.run_dir / ADAPTER_DIR, out)
    return "eval-aligned", [out]


def _stage_compare(ctx: _Context) -> tuple[str, list[Path]]:
    from .prefs import heldout_templates
    from .stats import (
        CompareConfig,
        compare_runs,
        join_with_bbq,
        load_and_compare,
        read_predictions,
    )

    c = ctx.cfg.compare
    ccfg = CompareConfig(
        test=c.test,  # type: ignore[arg-type]
        correction=c.correction,  # type: ignore[arg-type]
        alpha=c.alpha,
        bootstrap=c.bootstrap,
        seed=ctx.sub.seed,
        cluster=c.cluster,  # type: ignore[arg-type]
        confidence=c.confidence,
        targets=ctx.sub.target,
    )
    rd = ctx.run_dir
    base_path = rd / PREDICTION_FILES["base"]
    aligned_path = rd / PREDICTION_FILES["aligned"]
    comparison = load_and_compare(base_path, aligned_path, ctx.data, ccfg)
    comparison_json = rd / COMPARISON_FILE
    comparison_csv = comparison_json.with_suffix(".csv")
    atomic_write_json(comparison_json, comparison.to_json())
    atomic_write_text(comparison_csv, comparison.to_csv())
    outputs = [comparison_json, comparison_csv]
    # the honest number for "did alignment work": target items on templates never trained on
    held = heldout_templates(rd / PAIRS_DIR / "split.json")
    base = join_with_bbq(read_predictions(base_path), ctx.data)
    aligned = join_with_bbq(read_predictions(aligned_path), ctx.data)

    held_keys = {(cat, q) for cat, qs in held.items() for q in qs}

    def on_heldout(df: Any) -> Any:
        keys = zip(df["category"], df["question_index"].astype(int), strict=True)
        return df[[k in held_keys for k in keys]]

    hb, ha = on_heldout(base), on_heldout(aligned)
    summary: dict[str, Any] = {
        "targets": list(ctx.sub.target),
        "heldout_templates": {k: sorted(v) for k, v in held.items()},
        "n_items": len(hb),
    }
    if len(hb):
        sub_cmp = compare_runs(hb, ha, dataclasses.replace(ccfg, bootstrap=0))
        summary["comparison"] = sub_cmp.to_json()
    else:
        summary["note"] = "no evaluated target item lies on a held-out template (sample too small)"
    atomic_write_json(rd / HELDOUT_FILE, summary)
    outputs.append(rd / HELDOUT_FILE)
    return "compare", outputs


def _stage_report(ctx: _Context) -> tuple[str, list[Path]]:
    from .report import ReportConfig, write_report

    r = ctx.cfg.report
    _write_run_manifest(ctx)
    path = write_report(
        ctx.run_dir,
        ReportConfig(
            alpha=ctx.cfg.compare.alpha,
            formats=r.formats,
            figure_formats=r.figure_formats,
            title=r.title,
        ),
    )
    outs = [path]
    if (ctx.run_dir / "report.md").exists():
        outs.append(ctx.run_dir / "report.md")
    return "report", outs


def _write_run_manifest(ctx: _Context) -> None:
    data = ctx.data
    write_manifest(
        ctx.run_dir,
        {
            "spillover_version": __version__,
            "name": ctx.cfg.name,
            "config": ctx.cfg.to_dict(),
            "sub_run": {
                "model": ctx.sub.model,
                "target": list(ctx.sub.target),
                "method": ctx.sub.method,
                "seed": ctx.sub.seed,
            },
            "seeds": {
                "sample": ctx.sub.seed,
                "split": ctx.sub.seed,
                "train": ctx.sub.seed,
                "bootstrap": ctx.sub.seed,
            },
            "bbq": data.provenance(),
            "models": [{"role": role, **info} for role, info in ctx.models.items()]
            or [{"role": "base", "model": ctx.sub.model}],
            "n_eval_items": len(ctx.items),
            "timings": dict(ctx.timings),
            "stage_keys": dict(ctx.keys),
            "warnings": list(data.warnings),
        },
    )


def significant_strata(comparison: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Strata of a comparison (``comparison.json`` content) flagged significant after correction."""
    wanted = {"significant_degradation", "significant_improvement"}
    return [dict(s) for s in comparison.get("strata", []) if wanted & set(s.get("flags") or [])]


__all__ = [
    "DEFAULT_STUDY",
    "STAGES",
    "BBQSection",
    "CompareSection",
    "EvalSection",
    "Plan",
    "PrefsSection",
    "ReportSection",
    "RunConfig",
    "SubRun",
    "load_items",
    "plan_run",
    "run_study",
    "significant_strata",
]
