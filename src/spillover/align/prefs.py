"""Preference pairs from BBQ items, with a scenario-level held-out split.

Each pair is ``(prompt, chosen, rejected)`` in the exact text the evaluator
scores: ``prompt`` is :attr:`RenderedItem.prompt` and ``chosen``/``rejected``
are continuation strings of :func:`spillover.prompts.render` (e.g. ``" The man"``
for ``lm-eval``, ``"A"`` for ``letters-chat``). Aligning on these strings means a
model is trained on the very text it is later evaluated on.

Strategies (``chosen`` is always the correct answer):

``balanced`` (default)
    Ambiguous items: "unknown" over the biased answer (``rejected_kind="biased"``; for
    an item without a known biased answer, over one of the two groups drawn with a
    seeded RNG, ``"other"``). Disambiguated items: the correct answer over "unknown"
    and over the wrong group (two pairs). "Unknown" is then chosen once per ambiguous
    item and rejected once per disambiguated item, about equally often, so a model cannot
    win the preference loss by raising "unknown" everywhere.
``stereotype``
    One pair per item. ``rejected`` is the biased answer (``target_loc``) when it is
    wrong (``rejected_kind="biased"``); when the biased answer is the correct one
    (disambiguated contexts that confirm the stereotype) it is the other group
    (``"other"``). "Unknown" is never rejected. Items without a known biased answer
    (``target_loc`` NA in BBQ's metadata; 16 of 5,672 gender items) are skipped and
    counted as ``skipped_no_target``.
``all-wrong``
    One pair per wrong answer (two per item); ``rejected_kind`` says which
    (``biased``, ``other`` or ``unknown``).

Held-out split: whole *scenarios* (``BBQItem.scenario``: the templates of a category
that share a question text) are held out, drawn with a seeded RNG that depends only on
``seed``, the category and its scenarios. BBQ writes most scenarios twice (a label and a
name version of one template with the same questions); holding out templates would leave
a held-out template's twin, and its questions, in training. With scenarios, no held-out
item's question text appears among the training items of its category.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .._checks import check_choice
from .._io import atomic_open, atomic_write_json, check_output_dir, replace_dir, scratch_dir
from ..data import CONTEXTS, BBQData, BBQItem, BBQSource, resolve_categories
from ..errors import ConfigError, DataError
from ..prompts import check_format, has_chat_template, is_chat_format, render
from .probe_pairs import (
    PAIR_SOURCES,
    PROBE_PAIR_COLUMNS,
    ProbePair,
    heldout_clusters,
    prefix_text,
    probe_pairs,
)

logger = logging.getLogger(__name__)

Strategy = Literal["balanced", "stereotype", "all-wrong"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
RejectedKind = Literal["biased", "other", "unknown"]

PAIR_COLUMNS: tuple[str, ...] = (
    "prompt",
    "chosen",
    "rejected",
    "category",
    "example_id",
    "question_index",
    "context_condition",
    "question_polarity",
    "strategy",
    "rejected_kind",
)
"""Columns of ``train.parquet`` and ``heldout.parquet`` (the first three as TRL expects)."""

TRAIN_FILE = "train.parquet"
HELDOUT_FILE = "heldout.parquet"
SPLIT_FILE = "split.json"
PAIRS_KIND = "pairs"
"""Owner-marker kind of a pairs folder (see :func:`~spillover._io.check_output_dir`)."""
PAIRS_META_KEY = b"spillover.pairs"
"""Parquet schema-metadata key of the pairs files: format version and data warnings (JSON)."""
FORMAT_VERSION = 1


@dataclass(frozen=True, slots=True)
class PrefsConfig:
    """How preference pairs are built and split."""

    targets: tuple[str, ...] = ("Gender_identity",)
    """Target attributes (BBQ categories or aliases such as ``gender``); resolved on creation."""
    strategy: str = "balanced"
    """``balanced`` ("unknown" chosen and rejected about equally often), ``stereotype``
    (one pair per item, "unknown" never rejected) or ``all-wrong`` (one pair per wrong
    answer); see :mod:`spillover.align.prefs`."""
    contexts: tuple[str, ...] = CONTEXTS
    """Context conditions to draw items from: ``ambig``, ``disambig`` or both."""
    heldout_frac: float = 0.2
    """Fraction of each category's scenarios held out of training (0 disables the split)."""
    seed: int = 0
    """Seed of the held-out scenario draw."""
    prompt_format: str = "lm-eval"
    """Prompt format of :mod:`spillover.prompts` (``letters-chat`` needs a tokenizer)."""
    source: str = "bbq"
    """Benchmark the pairs come from: ``bbq``, or ``crows-pairs`` / ``stereoset`` (their
    items of the targets; the less stereotypical option chosen over the more stereotypical
    one; whole writers / target terms held out), to align on one format and evaluate on
    the other."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        object.__setattr__(self, "targets", resolve_categories(self.targets))
        check_choice("strategy", self.strategy, STRATEGIES)
        ctxs: list[str] = []
        for c in self.contexts:
            for part in str(c).split(","):
                part = part.strip()
                if not part:
                    continue
                if part not in CONTEXTS:
                    raise ConfigError(
                        f"`contexts`={part!r}; expected one or both of {', '.join(CONTEXTS)}"
                    )
                if part not in ctxs:
                    ctxs.append(part)
        if not ctxs:
            raise ConfigError("`contexts` is empty; give ambig, disambig or both")
        object.__setattr__(self, "contexts", tuple(ctxs))
        if not (0.0 <= self.heldout_frac < 1.0) or math.isnan(self.heldout_frac):
            raise ConfigError(
                f"`heldout_frac`={self.heldout_frac}; expected a fraction in [0, 1) "
                "(e.g. 0.2 holds out a fifth of each category's scenarios)"
            )
        check_format(self.prompt_format)
        check_choice("source", self.source, PAIR_SOURCES)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able view."""
        out = dataclasses.asdict(self)
        out["targets"] = list(self.targets)
        out["contexts"] = list(self.contexts)
        return out


@dataclass(frozen=True, slots=True)
class Pair:
    """One preference pair, with the item it came from."""

    prompt: str
    """Prompt text (chat template already applied for chat formats)."""
    chosen: str
    """Continuation of the correct answer."""
    rejected: str
    """Continuation of a wrong answer."""
    category: str
    """BBQ category of the item."""
    example_id: int
    """Item id within its category."""
    question_index: int
    """Template id of the item."""
    context_condition: str
    """``ambig`` or ``disambig``."""
    question_polarity: str
    """``neg`` or ``nonneg``."""
    strategy: str
    """Strategy that made the pair."""
    rejected_kind: RejectedKind
    """What the rejected answer is: the ``biased`` one, the ``other`` group, or ``unknown``."""

    def to_row(self) -> dict[str, Any]:
        """The pair as a table row with :data:`PAIR_COLUMNS`."""
        return {name: getattr(self, name) for name in PAIR_COLUMNS}


@dataclass(frozen=True)
class PairSet:
    """Training and held-out pairs, with the split and its provenance."""

    train: tuple[Pair | ProbePair, ...]
    """Pairs from scenarios (or clusters) not held out."""
    heldout: tuple[Pair | ProbePair, ...]
    """Pairs from held-out scenarios or clusters (never used for training)."""
    heldout_templates: Mapping[str, tuple[int, ...]]
    """Held-out ``question_index`` values per category (every template of a held-out scenario)."""
    config: PrefsConfig
    """How the pairs were built."""
    counts: Mapping[str, Any] = field(default_factory=dict)
    """Counts: items used, pairs per split, chosen and rejected answer kinds, skipped items."""
    provenance: Mapping[str, Any] = field(default_factory=dict)
    """BBQ provenance (source, digests, warnings) and the tokenizer used, if any."""
    heldout_scenarios: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Held-out scenario ids per category."""
    heldout_questions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """The question texts of the held-out items per category (none occurs in training)."""
    heldout_clusters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Pairs from a probe benchmark: the held-out clusters per target attribute."""

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns of the pair files."""
        return PAIR_COLUMNS if self.config.source == "bbq" else PROBE_PAIR_COLUMNS

    def split_info(self) -> dict[str, Any]:
        """The content of ``split.json``."""
        extra: dict[str, Any] = {}
        if self.config.source != "bbq":
            extra = {
                "source": self.config.source,
                "heldout_clusters": {c: list(t) for c, t in self.heldout_clusters.items()},
            }
        return {
            "format_version": FORMAT_VERSION,
            "unit": "scenario" if self.config.source == "bbq" else "cluster",
            **extra,
            "heldout_scenarios": {c: list(t) for c, t in self.heldout_scenarios.items()},
            "heldout_templates": {c: list(t) for c, t in self.heldout_templates.items()},
            "heldout_questions": {c: list(t) for c, t in self.heldout_questions.items()},
            "counts": dict(self.counts),
            "seed": self.config.seed,
            "config": self.config.to_dict(),
            "provenance": dict(self.provenance),
            "warnings": list((self.provenance.get("bbq") or {}).get("warnings", [])),
        }


# --------------------------------------------------------------------------- building


def split_scenarios(
    items: Iterable[BBQItem], heldout_frac: float, seed: int
) -> dict[str, tuple[int, ...]]:
    """Draw the held-out scenarios of each category.

    ``round(heldout_frac * n_scenarios)`` scenarios are held out per category, at least
    one when ``heldout_frac > 0`` and never all of them. The draw depends only on
    ``seed``, the category and its set of scenarios.

    Returns:
        Sorted held-out scenario ids per category.
    """
    per_cat: dict[str, set[int]] = {}
    for it in items:
        per_cat.setdefault(it.category, set()).add(int(it.scenario or 0))
    out: dict[str, tuple[int, ...]] = {}
    for cat in sorted(per_cat):
        scenarios = sorted(per_cat[cat])
        k = 0
        if heldout_frac > 0 and len(scenarios) > 1:
            k = min(max(1, round(heldout_frac * len(scenarios))), len(scenarios) - 1)
        rng = random.Random(f"{seed}:{cat}")
        out[cat] = tuple(sorted(rng.sample(scenarios, k)))
    return out


def heldout_split(
    items: Iterable[BBQItem], heldout_frac: float, seed: int
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Held-out scenarios and the templates they hold, per category of ``items``."""
    pool = list(items)
    scenarios = split_scenarios(pool, heldout_frac, seed)
    templates: dict[str, set[int]] = {c: set() for c in scenarios}
    for it in pool:
        if it.scenario in scenarios.get(it.category, ()):
            templates[it.category].add(it.question_index)
    return scenarios, {c: tuple(sorted(t)) for c, t in templates.items()}


def _kind(item: BBQItem, idx: int) -> RejectedKind:
    if idx == item.unknown_loc:
        return "unknown"
    if item.target_loc is not None and idx == item.target_loc:
        return "biased"
    return "other"


def _selected(items: Iterable[BBQItem], cfg: PrefsConfig) -> list[BBQItem]:
    return [
        it for it in items if it.category in cfg.targets and it.context_condition in cfg.contexts
    ]


def target_split(
    items: Iterable[BBQItem], cfg: PrefsConfig
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The held-out scenarios and templates :func:`build_pairs` draws for ``cfg`` (cheap:
    no prompt is rendered), so a run can sample its target items from them beforehand."""
    return heldout_split(_selected(items, cfg), cfg.heldout_frac, cfg.seed)


def probe_target_split(items: Sequence[Any], cfg: PrefsConfig) -> dict[str, tuple[str, ...]]:
    """The held-out clusters of each target when pairs come from a probe benchmark
    (``cfg.source``): what :func:`make_pairs` holds out, cheap, so a run can draw that
    benchmark's evaluated target items from them beforehand."""
    chosen = [it for it in items if it.benchmark == cfg.source and it.attribute in cfg.targets]
    return heldout_clusters(chosen, cfg.heldout_frac, cfg.seed)


def _rejected_indices(item: BBQItem, strategy: str, seed: int) -> list[int]:
    wrong = [i for i in range(3) if i != item.label]
    groups = [i for i in wrong if i != item.unknown_loc]  # wrong non-"unknown" answers
    if strategy == "all-wrong":
        return wrong
    if strategy == "balanced":
        if item.context_condition == "disambig":
            return [item.unknown_loc, *groups]
        if item.target_loc is not None and item.target_loc != item.label:
            return [item.target_loc]
        rng = random.Random(f"{seed}:{item.category}:{item.example_id}")
        return [rng.choice(groups)]
    if item.target_loc is None:
        return []
    if item.target_loc != item.label:
        return [item.target_loc]
    # the biased answer is correct: reject the other group (not "unknown")
    return groups


def build_pairs(
    items: Sequence[BBQItem],
    cfg: PrefsConfig,
    *,
    tokenizer: Any = None,
    provenance: Mapping[str, Any] | None = None,
) -> PairSet:
    """Build preference pairs from BBQ items and split them by scenario.

    Args:
        items: BBQ items; those outside ``cfg.targets`` and ``cfg.contexts`` are ignored.
        cfg: Pair and split settings.
        tokenizer: The model's tokenizer; needed for chat formats.
        provenance: BBQ provenance (:meth:`BBQData.provenance`) to record.

    Returns:
        The pairs, split into train and held-out.

    Raises:
        ConfigError: a chat format without a chat template.
        DataError: no item matches the targets and contexts, or no pair results.
    """
    selected = _selected(items, cfg)
    if not selected:
        raise DataError(
            f"no BBQ items for targets {', '.join(cfg.targets)} in contexts "
            f"{', '.join(cfg.contexts)}; load those categories first"
        )
    scenarios, heldout = target_split(selected, cfg)
    train: list[Pair] = []
    held: list[Pair] = []
    skipped = 0
    for it in selected:
        rejected = _rejected_indices(it, cfg.strategy, cfg.seed)
        if not rejected:
            skipped += 1
            continue
        rendered = render(it, cfg.prompt_format, tokenizer=tokenizer)
        cont = {rendered.order[j]: rendered.continuations[j] for j in range(3)}
        dest = held if it.scenario in scenarios.get(it.category, ()) else train
        dest.extend(_pair(it, rendered.prompt, cont, idx, cfg.strategy) for idx in rejected)
    if not train:
        raise DataError(
            "no training pairs: every selected item was skipped or held out "
            f"({skipped} skipped for lack of a biased answer); lower --heldout-frac or "
            "use --strategy balanced"
        )
    if skipped:
        logger.info("skipped %d item(s) without a known biased answer (target_loc NA)", skipped)
    by_key = {it.key: it for it in selected}
    questions = {
        c: tuple(
            sorted({it.question for it in selected if it.category == c and it.question_index in t})
        )
        for c, t in heldout.items()
    }
    counts = _counts(selected, train, held, scenarios, heldout, by_key, cfg, skipped)
    prov: dict[str, Any] = {"bbq": dict(provenance) if provenance is not None else None}
    if tokenizer is not None:
        prov["tokenizer"] = getattr(tokenizer, "name_or_path", None)
    return PairSet(tuple(train), tuple(held), heldout, cfg, counts, prov, scenarios, questions)


def _pair(it: BBQItem, prompt: str, cont: Mapping[int, str], idx: int, strategy: str) -> Pair:
    return Pair(
        prompt=prompt,
        chosen=cont[it.label],
        rejected=cont[idx],
        category=it.category,
        example_id=it.example_id,
        question_index=it.question_index,
        context_condition=it.context_condition,
        question_polarity=it.question_polarity,
        strategy=strategy,
        rejected_kind=_kind(it, idx),
    )


def _counts(
    selected: Sequence[BBQItem],
    train: Sequence[Pair],
    held: Sequence[Pair],
    scenarios: Mapping[str, tuple[int, ...]],
    heldout: Mapping[str, tuple[int, ...]],
    by_key: Mapping[tuple[str, int], BBQItem],
    cfg: PrefsConfig,
    skipped: int,
) -> dict[str, Any]:
    def chosen(pairs: Sequence[Pair]) -> dict[str, int]:
        kinds = Counter(
            _kind(it, it.label) for p in pairs for it in [by_key[(p.category, p.example_id)]]
        )
        return dict(sorted(kinds.items()))

    def scenario_count(cat: str) -> int:
        return len({it.scenario for it in selected if it.category == cat})

    return {
        "items": len(selected),
        "skipped_no_target": skipped,
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "train_templates": {
            c: len({p.question_index for p in train if p.category == c}) for c in cfg.targets
        },
        "heldout_templates": {c: len(heldout.get(c, ())) for c in cfg.targets},
        "train_scenarios": {c: scenario_count(c) - len(scenarios.get(c, ())) for c in cfg.targets},
        "heldout_scenarios": {c: len(scenarios.get(c, ())) for c in cfg.targets},
        "chosen_kind": {"train": chosen(train), "heldout": chosen(held)},
        "rejected_kind": {
            "train": dict(sorted(Counter(p.rejected_kind for p in train).items())),
            "heldout": dict(sorted(Counter(p.rejected_kind for p in held).items())),
        },
    }


# --------------------------------------------------------------------------- files


def write_pairs(
    pairs: PairSet, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``train.parquet``, ``heldout.parquet`` and ``split.json`` into ``out_dir``.

    The folder is assembled beside ``out_dir`` and renamed into place, so it is
    either complete or untouched.

    Raises:
        ConfigError: ``out_dir`` exists and is not empty, and ``overwrite`` is false, or
            it is a folder spillover did not make (see :func:`~spillover._io.check_output_dir`).
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = Path(out_dir).expanduser()
    check_output_dir(target, PAIRS_KIND, overwrite=overwrite)
    tmp = scratch_dir(target)
    info = pairs.split_info()
    # the files carry the data warnings too (e.g. unverified BBQ), not only split.json
    file_meta = json.dumps({"format_version": FORMAT_VERSION, "warnings": info["warnings"]})
    try:
        for name, rows in ((TRAIN_FILE, pairs.train), (HELDOUT_FILE, pairs.heldout)):
            df = pd.DataFrame([p.to_row() for p in rows], columns=list(pairs.columns))
            for col in ("example_id", "question_index"):
                if col in df.columns:
                    df[col] = df[col].astype("int64")
            table = pa.Table.from_pandas(df, preserve_index=False)
            meta = {**(table.schema.metadata or {}), PAIRS_META_KEY: file_meta.encode()}
            with atomic_open(tmp / name, "wb") as fh:
                pq.write_table(table.replace_schema_metadata(meta), fh)
        atomic_write_json(tmp / SPLIT_FILE, info)
        tmp.chmod(0o755)
        replace_dir(tmp, target, PAIRS_KIND)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _probe_pair_set(
    data: Any, cfg: PrefsConfig, model: str | None, cache_dir: str | os.PathLike[str] | None
) -> PairSet:
    """Pairs of a probe benchmark (:mod:`.probe_pairs`); ``data`` is its loaded items."""
    if getattr(data, "name", None) != cfg.source or not hasattr(data, "items"):
        raise ConfigError(
            f"`source`={cfg.source!r} builds pairs from that benchmark's items; load it "
            "(spillover.data.load_benchmark) and pass it as the data"
        )
    if model is None:
        raise ConfigError(
            f"pairs from {cfg.source} start with the model's BOS token; give the model "
            "(e.g. --model smollm2-135m)"
        )
    from ..models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(model), cache_dir=cache_dir)
    train, held, clusters, counts = probe_pairs(
        data.items, source=cfg.source, targets=cfg.targets, strategy=cfg.strategy,
        heldout_frac=cfg.heldout_frac, seed=cfg.seed, prefix=prefix_text(tokenizer),
    )  # fmt: skip
    prov = {"bbq": None, "data": dict(data.provenance()), "tokenizer": tokenizer.name_or_path}
    return PairSet(tuple(train), tuple(held), {}, cfg, counts, prov, heldout_clusters=clusters)


def make_pairs(
    data: BBQData | BBQSource | Any,
    cfg: PrefsConfig,
    out_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> PairSet:
    """The pairs stage: build the pairs of ``cfg`` and write them to ``out_dir``
    (``spillover prefs`` and the run's ``prefs`` stage both call this).

    Args:
        data: Loaded BBQ, or where to load it from (only the target categories are read,
            after the checks below); for ``cfg.source`` other than ``bbq``, that
            benchmark's loaded items (``spillover.data.load_benchmark``).
        cfg: Pair and split settings.
        out_dir: The pairs folder to write.
        model: Model whose tokenizer renders a chat format (``letters-chat``); ignored
            for the other formats.
        cache_dir: Cache root of the model's files.
        overwrite: Replace an existing pairs folder (only one spillover made).

    Raises:
        ConfigError: ``out_dir`` is taken, or a chat format without ``model`` or with a
            model that has no chat template; as :func:`build_pairs`.
    """
    target = Path(out_dir).expanduser()
    check_output_dir(target, PAIRS_KIND, overwrite=overwrite)  # before any work
    if cfg.source != "bbq":
        pairs = _probe_pair_set(data, cfg, model, cache_dir)
        write_pairs(pairs, target, overwrite=overwrite)
        return pairs
    tokenizer = None
    if is_chat_format(cfg.prompt_format):
        if model is None:
            raise ConfigError(
                f"prompt format {cfg.prompt_format!r} renders prompts with a model's chat "
                "template; give the model (e.g. --model smollm2-135m)"
            )
        from ..models import load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(model), cache_dir=cache_dir)
        if not has_chat_template(tokenizer):
            raise ConfigError(
                f"prompt format {cfg.prompt_format!r} needs a model with a chat template; "
                f"{model!r} has none (use prompt format lm-eval or letters)"
            )
    if isinstance(data, BBQSource):
        data = data.load(categories=cfg.targets)
    pairs = build_pairs(data.items, cfg, tokenizer=tokenizer, provenance=data.provenance())
    write_pairs(pairs, target, overwrite=overwrite)
    return pairs


def read_split(pairs_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``split.json`` of a pairs folder.

    Raises:
        DataError: missing or malformed.
    """
    path = Path(pairs_dir).expanduser()
    if path.is_dir():
        path = path / SPLIT_FILE
    if not path.is_file():
        raise DataError(f"{path}: no {SPLIT_FILE}; make pairs with `spillover prefs` first")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(info, dict) or "heldout_templates" not in info:
        raise DataError(f"{path}: not a spillover split file (no 'heldout_templates')")
    return info


def _split_where(split_json: str | os.PathLike[str] | Mapping[str, Any]) -> str:
    if isinstance(split_json, Mapping):
        return SPLIT_FILE
    path = Path(split_json).expanduser()
    return str(path / SPLIT_FILE if path.is_dir() else path)


def heldout_templates(
    split_json: str | os.PathLike[str] | Mapping[str, Any],
) -> dict[str, set[int]]:
    """Held-out templates per category, from ``split.json`` (a path, its folder, or its content).

    Every template of a held-out scenario is listed (split files written before
    scenarios, with ``"unit"`` absent, list held-out templates alone). Evaluation uses
    this to report the target attribute on held-out scenarios separately from those the
    model was trained on.
    """
    info = split_json if isinstance(split_json, Mapping) else read_split(split_json)
    where = _split_where(split_json)
    held = info["heldout_templates"]
    if not isinstance(held, Mapping):
        raise DataError(f"{where}: field 'heldout_templates' is not an object of category lists")
    out: dict[str, set[int]] = {}
    for c, ts in held.items():
        if not isinstance(ts, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ts
        ):
            raise DataError(
                f"{where}: field 'heldout_templates.{c}' is not a list of template numbers"
            )
        out[str(c)] = set(ts)
    return out


def split_targets(split_json: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[str, ...]:
    """The target categories a ``split.json`` was made for (its ``config.targets``)."""
    info = split_json if isinstance(split_json, Mapping) else read_split(split_json)
    targets = (info.get("config") or {}).get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise DataError(
            f"{_split_where(split_json)}: field 'config.targets' is not a list of categories"
        )
    return tuple(targets)


def heldout_for(
    split_json: str | os.PathLike[str] | Mapping[str, Any],
    targets: Sequence[str] | None = None,
    items: Sequence[BBQItem] | None = None,
) -> tuple[tuple[str, ...], dict[str, set[int]]]:
    """The targets a split was made for and the BBQ templates it held out per target: what
    the comparison of a run (and ``spillover compare --heldout-from``) keeps of them.

    Args:
        split_json: ``split.json``, its pairs folder, or its content.
        targets: The targets the caller compares; None takes the split's. Given, they must
            be the split's (in any order).
        items: BBQ's items; needed for a split of pairs from a probe benchmark, which
            trained on no BBQ item: every template of the targets is then held out.

    Raises:
        DataError: the split file is missing or malformed.
        ConfigError: ``targets`` differ from the split's; a probe split without ``items``.
    """
    made_for = split_targets(split_json)
    if targets is not None and set(targets) != set(made_for):
        raise ConfigError(
            f"`targets`={','.join(targets)}: the pairs of {_split_where(split_json)} were made "
            f"for {','.join(made_for)}"
        )
    info = split_json if isinstance(split_json, Mapping) else read_split(split_json)
    if info.get("source", "bbq") != "bbq":
        if items is None:
            raise ConfigError(
                f"{_split_where(split_json)}: pairs from {info['source']} held out none of "
                "BBQ's items; pass BBQ's items to hold out all of them"
            )
        return made_for, {c: {it.question_index for it in items if it.category == c}
                          for c in made_for}  # fmt: skip
    held = heldout_templates(split_json)
    return made_for, {c: held.get(c, set()) for c in made_for}


def read_pairs(pairs_dir: str | os.PathLike[str], split: str = "train") -> Any:
    """Read one split (``train`` or ``heldout``) of a pairs folder as a DataFrame.

    Raises:
        DataError: the folder or file is missing, or lacks the pair columns.
    """
    import pandas as pd

    if split not in ("train", "heldout"):
        raise ConfigError(f"`split`={split!r}; expected 'train' or 'heldout'")
    root = Path(pairs_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: pairs folder does not exist; make it with `spillover prefs`")
    path = root / (TRAIN_FILE if split == "train" else HELDOUT_FILE)
    if not path.is_file():
        raise DataError(f"{path}: missing; the pairs folder is incomplete (run `spillover prefs`)")
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return df
