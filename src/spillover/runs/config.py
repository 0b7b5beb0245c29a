"""The run config: a whole study (or a sweep of them), validated before any work starts.

Each YAML section builds the stage's own config object, the one the Python API and the
stage commands build: ``bbq`` -> :class:`~spillover.data.BBQSource`, ``eval`` ->
:class:`~spillover.data.Selection` (item keys) and :class:`~spillover.evaluate.EvalConfig`
(scoring keys), ``prefs`` -> :class:`~spillover.align.PrefsConfig`, ``align`` -> overrides
of :class:`~spillover.align.AlignConfig` after the model's preset, ``compare`` ->
:class:`~spillover.stats.CompareConfig`, ``report`` -> :class:`~spillover.report.ReportConfig`.
Keys that the run sets per sub-run (seed, target, model, method, device) are refused inside
the sections, with the top-level key to use instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .._checks import SEED_MAX, check_device
from ..align import METHODS, AlignConfig, PrefsConfig, resolve_trl_args
from ..data import (
    PROBES,
    BBQSource,
    ProbeSelection,
    Selection,
    check_benchmark,
    resolve_categories,
)
from ..errors import ConfigError
from ..evaluate import EvalConfig
from ..models import MODEL_ALIASES, resolve_dtype
from ..prompts import permutation_id, permutations
from ..report import ReportConfig
from ..stats import CompareConfig
from .yaml_doc import YamlDoc, build_dataclass, check_keys, load_yaml, locate, near_match, relocate
from .yaml_doc import section as yaml_section

DEFAULT_SELECTION = Selection(per_stratum=100)
"""The items a run evaluates unless its ``eval`` section chooses (``per_stratum`` or
``items``): a seeded sample of 100 per category x context (2,200 items per evaluation)."""

_TOP_KEYS = (
    "name", "model", "target", "method", "seed", "device", "dtype", "benchmarks",
    "bbq", "probes", "eval", "prefs", "align", "compare", "report",
)  # fmt: skip
_SECTIONS = _TOP_KEYS[8:]

# Per section: the fields the run sets itself, and the top-level key that sets them
# (None: the run directory manages it).
_RESERVED: Mapping[str, Mapping[str, str | None]] = {
    "eval": {"seed": "seed"},
    "prefs": {"targets": "target", "seed": "seed", "prompt_format": "eval.prompt_format"},
    "align": {
        "model": "model",
        "method": "method",
        "seed": "seed",
        "device": "device",
        "dtype": "dtype",
        "output_dir": None,
        "adapter": None,
        "overwrite": None,
    },
    "compare": {"seed": "seed", "targets": "target"},
}


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
"""What ``name`` may be: one plain folder name (``runs/<name>``), up to 100 characters of
letters, digits and ``. _ + -``, not starting with a dot or dash."""

_SLUG_MODEL_MAX = 64  # model part of a sub-run folder name (the whole stays under 255 bytes)


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _refuse_reserved(values: Mapping[str, Any], name: str, doc: YamlDoc | None) -> None:
    for key, top in _RESERVED.get(name, {}).items():
        if key not in values:
            continue
        where = locate(doc, [name, key])
        if top is None:
            raise ConfigError(f"{where}: `{name}.{key}` is managed by the run directory; remove it")
        raise ConfigError(
            f"{where}: `{name}.{key}` is set by the run (use the top-level `{top}` key)"
        )


@dataclass(frozen=True)
class ProbesConfig:
    """The ``probes`` section: where the likelihood-probe benchmarks come from and which
    of their items a run scores (per benchmark, the keys of
    :class:`~spillover.data.ProbeSelection`; the seed is the sub-run's)."""

    dir: str | None = None
    """Folder with one sub-folder per benchmark (``crows-pairs/``, ...); None:
    ``$SPILLOVER_DATA_DIR``, else the cache, else download (upstream, then PyPI)."""
    allow_unverified: bool = False
    """Accept files whose SHA-256 differs from the pinned release (recorded as a warning)."""
    items: Mapping[str, ProbeSelection] = field(default_factory=dict)
    """Per benchmark, which of its items are scored; a benchmark left out: all of them."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as the section is written (per benchmark its selection keys)."""
        out: dict[str, Any] = {"dir": self.dir, "allow_unverified": self.allow_unverified}
        for name, sel in self.items.items():
            out[name] = {k: v for k, v in _plain(sel, ("seed",)).items() if v is not None}
        return out


def _benchmarks(data: Mapping[str, Any], doc: YamlDoc | None) -> tuple[str, ...]:
    """The ``benchmarks`` list, checked: known names, each once, BBQ among them."""
    raw = data.get("benchmarks", ["bbq"])
    values = raw if isinstance(raw, list) else [raw]
    out: list[str] = []
    for i, value in enumerate(values):
        where = locate(doc, _item_path(data, "benchmarks", i))
        if not isinstance(value, str):
            raise ConfigError(f"{where}: `benchmarks`: {value!r}; expected a benchmark name")
        try:
            name = check_benchmark(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}: `benchmarks`: {exc}") from None
        if name in out:
            raise ConfigError(f"{where}: `benchmarks` lists {name} twice; expected each once")
        out.append(name)
    if "bbq" not in out:
        raise ConfigError(
            f"{locate(doc, ['benchmarks'])}: `benchmarks` leaves out bbq; a study evaluates "
            "BBQ (the alignment's own benchmark) and, beside it, any of "
            f"{', '.join(tuple(PROBES))}"
        )
    return tuple(out)


def _probes_section(values: Mapping[str, Any], doc: YamlDoc | None) -> ProbesConfig:
    """The ``probes`` section: ``dir``, ``allow_unverified``, and a selection per benchmark."""
    own = ("dir", "allow_unverified")
    check_keys(values, [*own, *tuple(PROBES)], doc=doc, section=["probes"])
    base = build_dataclass(
        ProbesConfig, {k: v for k, v in values.items() if k in own}, doc=doc,
        section=["probes"], allowed=list(own),
    )  # fmt: skip
    items: dict[str, ProbeSelection] = {}
    for name in tuple(PROBES):
        if name not in values:
            continue
        part = yaml_section(values, name, doc)
        if "seed" in part:
            raise ConfigError(
                f"{locate(doc, ['probes', name, 'seed'])}: `probes.{name}.seed` is set by the "
                "run (use the top-level `seed` key)"
            )
        allowed = [n for n in _fields(ProbeSelection) if n != "seed"]
        items[name] = build_dataclass(
            ProbeSelection, part, doc=doc, section=["probes", name], allowed=allowed
        )
    return dataclasses.replace(base, items=items)


@dataclass(frozen=True, slots=True)
class SubRun:
    """One model x target x method x seed combination."""

    model: str
    target: tuple[str, ...]
    method: str
    seed: int

    @property
    def slug(self) -> str:
        """Folder name of this sub-run inside a sweep: one plain path component (the
        model's last part in letters, digits, ``.`` and ``-``, no leading dot)."""
        name = Path(self.model).name if "/" in self.model else self.model
        model = re.sub(r"[^A-Za-z0-9.-]+", "-", name).lstrip(".") or "model"
        if len(model) > _SLUG_MODEL_MAX:
            digest = hashlib.sha256(self.model.encode("utf-8")).hexdigest()[:8]
            model = f"{model[: _SLUG_MODEL_MAX - 9]}-{digest}"
        return f"{model}__{'+'.join(self.target)}__{self.method}__s{self.seed}"


DEFAULT_STUDY: Mapping[str, Any] = MappingProxyType(
    {
        "benchmarks": ["bbq", "winogender", "crows-pairs"],
        "probes": {"crows-pairs": {"per_attribute": 40}},
    }
)
"""What the embedded default study (``spillover run`` without a config,
``configs/default.yaml``, :meth:`RunConfig.default`) sets beyond the field defaults: beside
BBQ, Winogender in full (the target's own attribute in another format) and a seeded sample
of 40 CrowS-Pairs pairs per bias type (every attribute in another format), what keeps the
default run within about 15 % more time (docs/benchmarks.md). A config that leaves
``benchmarks`` out evaluates BBQ alone."""


@dataclass(frozen=True)
class RunConfig:
    """A whole study; lists in ``models``/``targets``/``methods``/``seeds`` make a sweep.

    ``RunConfig()`` holds the field defaults: SmolLM2-135M-Instruct aligned on gender with
    DPO and the model's preset, evaluated on :data:`DEFAULT_SELECTION` of BBQ, compared with
    :class:`~spillover.stats.CompareConfig`'s defaults. A YAML key left out takes its field
    default. :meth:`default`, the embedded default study (``spillover run`` without a
    config), adds :data:`DEFAULT_STUDY`'s likelihood probes.
    """

    name: str = "default"
    """Run name (default run directory ``runs/<name>``, titles)."""
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
    benchmarks: tuple[str, ...] = ("bbq",)
    """Benchmarks both models are evaluated on: ``bbq`` and any of the likelihood probes
    (``crows-pairs``, ``stereoset``, ``winobias``, ``winogender``); BBQ is always one."""
    bbq: BBQSource = field(default_factory=BBQSource)
    """Where BBQ is read from."""
    probes: ProbesConfig = field(default_factory=lambda: ProbesConfig())
    """Where the likelihood-probe benchmarks are read from, and which of their items."""
    selection: Selection = DEFAULT_SELECTION
    """The evaluated items (the item keys of the ``eval`` section); the seed is the sub-run's."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How both models are scored (the scoring keys of the ``eval`` section)."""
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    """Preference pairs; targets, seed and prompt format are the sub-run's."""
    align: Mapping[str, Any] = field(default_factory=dict)
    """Overrides of the model preset's training defaults (AlignConfig fields)."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """Statistics; seed and targets are the sub-run's."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """Report options."""

    @classmethod
    def default(cls) -> RunConfig:
        """The embedded default study: the field defaults with :data:`DEFAULT_STUDY`'s
        benchmarks, validated as a run config is."""
        return cls.from_mapping(DEFAULT_STUDY)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read and validate a YAML config; every error names the file, line and key."""
        doc = load_yaml(Path(path))
        return cls.from_mapping(doc.data, doc=doc)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, doc: YamlDoc | None = None) -> RunConfig:
        """Validate a mapping (as read from YAML).

        Raises:
            ConfigError: naming the file, line and key when ``doc`` is given.
        """
        check_keys(data, _TOP_KEYS, doc=doc, section=())
        sections = {k: yaml_section(data, k, doc) for k in _SECTIONS}
        top = _top_level(data, doc)
        selection, evaluation = _eval_section(sections["eval"], doc)
        cfg = cls(
            **top,
            benchmarks=_benchmarks(data, doc),
            bbq=build_dataclass(BBQSource, sections["bbq"], doc=doc, section=["bbq"]),
            probes=_probes_section(sections["probes"], doc),
            selection=selection,
            eval=evaluation,
            prefs=_build(PrefsConfig, sections["prefs"], "prefs", doc),
            align=_align_section(sections["align"], doc),
            compare=_build(CompareConfig, sections["compare"], "compare", doc),
            report=build_dataclass(ReportConfig, sections["report"], doc=doc, section=["report"]),
        )
        _check_sub_runs(cfg, doc)
        _check_combinations(cfg, doc)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.yaml`` records; reads back equal)."""
        out: dict[str, Any] = {
            "name": self.name,
            "model": list(self.models),
            "target": ["+".join(t) for t in self.targets],
            "method": list(self.methods),
            "seed": list(self.seeds),
            "device": self.device,
            "dtype": self.dtype,
            "benchmarks": list(self.benchmarks),
            "bbq": _plain(self.bbq, ()),
            "probes": self.probes.to_dict(),
            "eval": {**_plain(self.selection, ("seed",)), **_plain(self.eval, ("seed",))},
            "prefs": _plain(self.prefs, tuple(_RESERVED["prefs"])),
            "align": dict(self.align),
            "compare": _plain(self.compare, tuple(_RESERVED["compare"])),
            "report": _plain(self.report, ()),
        }
        return out

    def sub_runs(self) -> list[SubRun]:
        """Every model x target x method x seed combination."""
        combos = itertools.product(self.models, self.targets, self.methods, self.seeds)
        return [SubRun(m, t, meth, s) for m, t, meth, s in combos]

    @property
    def is_sweep(self) -> bool:
        """Whether more than one combination is run."""
        return len(self.sub_runs()) > 1

    # the stage configs of one sub-run: the section's object with the run's own fields set

    def selection_for(self, sub: SubRun) -> Selection:
        """The evaluated items of ``sub``."""
        return dataclasses.replace(self.selection, seed=sub.seed)

    def eval_for(self, sub: SubRun) -> EvalConfig:
        """The scoring config of ``sub``."""
        return dataclasses.replace(self.eval, seed=sub.seed)

    def prefs_for(self, sub: SubRun) -> PrefsConfig:
        """The pairs config of ``sub`` (pairs use the evaluation's prompt format)."""
        return dataclasses.replace(
            self.prefs, targets=sub.target, seed=sub.seed, prompt_format=self.eval.prompt_format
        )

    def align_for(self, sub: SubRun, output_dir: str | Path) -> AlignConfig:
        """The training config of ``sub``: the model's preset, then the ``align`` overrides
        (their ``trl_args`` checked against the installed TRL, when there are any)."""
        cfg = AlignConfig.from_preset(
            sub.model,
            output_dir,
            method=sub.method,
            seed=sub.seed,
            device=self.device,
            dtype=self.dtype,
            overwrite=True,
            **dict(self.align),
        )
        return resolve_trl_args(cfg)

    def probe_selection_for(self, sub: SubRun, benchmark: str) -> ProbeSelection:
        """The items of a likelihood-probe benchmark that ``sub`` evaluates."""
        chosen = self.probes.items.get(benchmark, ProbeSelection())
        return dataclasses.replace(chosen, seed=sub.seed)

    def compare_for(self, sub: SubRun) -> CompareConfig:
        """The statistics config of ``sub``."""
        return dataclasses.replace(self.compare, seed=sub.seed, targets=sub.target)


def _plain(obj: Any, skip: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _build(cls: type, values: Mapping[str, Any], name: str, doc: YamlDoc | None) -> Any:
    """A stage config from its section, the run's own fields left at their defaults."""
    _refuse_reserved(values, name, doc)
    allowed = [n for n in _fields(cls) if n not in _RESERVED.get(name, {})]
    return build_dataclass(cls, values, doc=doc, section=[name], allowed=allowed)


def _eval_section(values: Mapping[str, Any], doc: YamlDoc | None) -> tuple[Selection, EvalConfig]:
    """The ``eval`` section: item keys build a Selection, the others an EvalConfig."""
    _refuse_reserved(values, "eval", doc)
    item_keys = [n for n in _fields(Selection) if n != "seed"]
    scoring_keys = [n for n in _fields(EvalConfig) if n != "seed"]
    check_keys(values, [*item_keys, *scoring_keys], doc=doc, section=["eval"])
    items = {k: v for k, v in values.items() if k in item_keys}
    if "per_stratum" not in items and "items" not in items:  # no choice made: the default's
        items["per_stratum"] = DEFAULT_SELECTION.per_stratum
    scoring = {k: v for k, v in values.items() if k in scoring_keys}
    selection = build_dataclass(Selection, items, doc=doc, section=["eval"], allowed=item_keys)
    evaluation = build_dataclass(
        EvalConfig, scoring, doc=doc, section=["eval"], allowed=scoring_keys
    )
    return selection, evaluation


def _align_section(values: Mapping[str, Any], doc: YamlDoc | None) -> dict[str, Any]:
    """The ``align`` overrides, coerced to AlignConfig's field types and checked through a
    throwaway config (each model x method of the run is checked once the run is built)."""
    from pydantic import TypeAdapter, ValidationError

    _refuse_reserved(values, "align", doc)
    names = [n for n in _fields(AlignConfig) if n not in _RESERVED["align"]]
    check_keys(values, names, doc=doc, section=["align"])
    hints = typing.get_type_hints(AlignConfig)
    coerced: dict[str, Any] = {}
    for key, value in values.items():
        if key == "target_modules" and isinstance(value, str):
            coerced[key] = value  # comma-separated, split by AlignConfig
            continue
        if key in ("eval_strategy", "save_strategy") and value is False:
            coerced[key] = "no"  # YAML reads a bare `no` as false
            continue
        try:
            coerced[key] = TypeAdapter(hints[key]).validate_python(value, strict=False)
        except ValidationError as exc:
            msg = exc.errors()[0].get("msg", "invalid value")
            raise ConfigError(
                f"{locate(doc, ['align', key])}: `align.{key}`: {msg} (got {value!r})"
            ) from None
    try:
        AlignConfig.from_preset("smollm2-135m", "unused", **coerced)
    except ConfigError as exc:
        raise relocate(exc, names, doc, ["align"]) from None
    except TypeError as exc:
        raise ConfigError(f"{locate(doc, ['align'])}: `align`: {exc}") from None
    return coerced


def _names(
    data: Mapping[str, Any], key: str, default: tuple[str, ...], doc: YamlDoc | None
) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        return default
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(f"{locate(doc, [key])}: `{key}` must be a name or a list of names")
    return tuple(values)


def _item_path(data: Mapping[str, Any], key: str, i: int) -> list[str]:
    """Key path of the ``i``-th value of top-level ``key`` (a list or one value)."""
    return [key, str(i)] if isinstance(data.get(key), list) else [key]


def _check_name(name: object, where: str) -> None:
    """Refuse a ``name`` that is not one plain folder name (it makes ``runs/<name>``)."""
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name) and ".." not in name:
        return
    raise ConfigError(
        f"{where}: `name`={name!r}; expected a plain folder name of up to 100 letters, digits "
        "and . _ + - (no '/', no '..', not starting with a dot), e.g. my-study; "
        "use `--out` to choose the run directory"
    )


def _check_model(model: str, where: str) -> None:
    """Refuse a model that cannot resolve: unknown preset, missing or non-model folder."""
    if any(ord(c) < 32 for c in model):
        raise ConfigError(f"{where}: `model`={model!r}; expected a name without control characters")
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{where}: `model`: {path} is not a model folder (no config.json); expected a "
                "folder written by save_pretrained, a hub id or a preset"
            )
        return
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(
            f"{where}: `model`: {model}: no such folder; expected a model folder, a hub id "
            f"(org/name) or a preset ({', '.join(MODEL_ALIASES)})"
        )
    if "/" not in model and model not in MODEL_ALIASES:
        raise ConfigError(
            f"{where}: unknown model preset `{model}`; use a preset "
            f"({', '.join(MODEL_ALIASES)}), a hub id (org/name) or a folder"
        )


def _check_sub_runs(cfg: RunConfig, doc: YamlDoc | None) -> None:
    """Refuse sweep lists that name one sub-run twice or two sub-runs one folder."""
    axes: tuple[tuple[str, Sequence[Any]], ...] = (
        ("model", cfg.models),
        ("target", cfg.targets),
        ("method", cfg.methods),
        ("seed", cfg.seeds),
    )
    for key, values in axes:
        for i, value in enumerate(values):
            if value in values[:i]:
                shown = "+".join(value) if isinstance(value, tuple) else value
                raise ConfigError(
                    f"{locate(doc, [key, str(i)])}: `{key}` lists {shown} twice; expected "
                    "each value once (a sweep runs every combination)"
                )
    folders: dict[str, str] = {}
    for model in cfg.models:
        part = SubRun(model, ("x",), "x", 0).slug.split("__")[0]
        if part in folders:
            raise ConfigError(
                f"{locate(doc, ['model'])}: models `{folders[part]}` and `{model}` would share "
                f"the sub-run folder name `{part}`; expected models whose last path parts "
                "differ; run them as separate studies"
            )
        folders[part] = model


def _check_combinations(cfg: RunConfig, doc: YamlDoc | None) -> None:
    """Check what only a combination decides: each model x method's training config (its
    preset, the ``align`` overrides, the device), and the comparison's permutation."""
    names = [n for n in _fields(AlignConfig) if n not in _RESERVED["align"]]
    for model, method in itertools.product(cfg.models, cfg.methods):
        try:
            cfg.align_for(SubRun(model, cfg.targets[0], method, cfg.seeds[0]), "unused")
        except ConfigError as exc:
            if str(exc).startswith("`device`"):
                raise ConfigError(f"{locate(doc, ['device'])}: {exc}") from None
            raise ConfigError(
                f"{relocate(exc, names, doc, ['align'])} (model `{model}`, method `{method}`)"
            ) from None
    if cfg.compare.permutation is not None:
        ids = [permutation_id(p) for p in permutations(cfg.eval.permutations)]
        if cfg.compare.permutation not in ids:
            raise ConfigError(
                f"{locate(doc, ['compare', 'permutation'])}: `compare.permutation`="
                f"{cfg.compare.permutation!r}; `eval.permutations`={cfg.eval.permutations!r} "
                f"scores {', '.join(ids)}; choose one of them or widen `eval.permutations`"
            )


def _top_level(data: Mapping[str, Any], doc: YamlDoc | None) -> dict[str, Any]:
    """The top-level keys: name, the sweep axes, device and dtype."""
    models = _names(data, "model", RunConfig.models, doc)
    for i, m in enumerate(models):
        _check_model(m, locate(doc, _item_path(data, "model", i)))
    methods = _names(data, "method", RunConfig.methods, doc)
    for i, m in enumerate(methods):
        if m not in METHODS:
            raise ConfigError(
                f"{locate(doc, _item_path(data, 'method', i))}: unknown method `{m}`"
                f"{near_match(m, list(METHODS))}; expected one of {', '.join(METHODS)}"
            )
    raw = data.get("target", ["Gender_identity"])
    raw_targets = raw if isinstance(raw, list) else [raw]
    if not raw_targets:
        raise ConfigError(
            f"{locate(doc, ['target'])}: `target` is an empty list; expected a category "
            "(e.g. gender), 'gender+race' or a list of them"
        )
    targets: list[tuple[str, ...]] = []
    for i, t in enumerate(raw_targets):
        parts = t if isinstance(t, list) else str(t).split("+")
        try:
            targets.append(resolve_categories([str(p) for p in parts]))
        except ConfigError as exc:
            raise ConfigError(
                f"{locate(doc, _item_path(data, 'target', i))}: `target`: {exc}"
            ) from None
    seeds = data.get("seed", [0])
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(
            f"{locate(doc, ['seed'])}: `seed` must be an integer or a list of integers"
        )
    for i, seed in enumerate(seeds):
        if not 0 <= seed <= SEED_MAX:
            raise ConfigError(
                f"{locate(doc, _item_path(data, 'seed', i))}: `seed`={seed}; expected an "
                f"integer in 0..{SEED_MAX} (the range numpy and torch seed with)"
            )
    name = data.get("name", RunConfig.name)
    _check_name(name, locate(doc, ["name"]))
    device = data.get("device")
    if device is not None:
        try:
            check_device(device)
        except ConfigError as exc:
            raise ConfigError(f"{locate(doc, ['device'])}: {exc}") from None
    dtype = str(data.get("dtype", "auto"))
    try:
        resolve_dtype(dtype, "cpu")
    except ConfigError as exc:
        raise ConfigError(f"{locate(doc, ['dtype'])}: {exc}") from None
    return {
        "name": name,
        "models": models,
        "targets": tuple(targets),
        "methods": methods,
        "seeds": tuple(int(s) for s in seeds),
        "device": device,
        "dtype": dtype,
    }
