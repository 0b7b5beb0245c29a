"""Building the report: gather a run's artifacts, render figures and documents, write them.

The report is rebuilt from files alone (no model, no torch). It reads, from a run
directory, ``stats/comparison.json`` (required), ``manifest.json``,
``align/log_history.json`` and ``eval/{base,aligned}/predictions.parquet`` (optional);
from a folder made by hand, ``comparison.json`` at its top and ``base.parquet`` /
``aligned.parquet`` (or CSV, JSONL) beside it. It writes ``report.html`` (self-contained: figures embedded, CSS inline, no script, no
external request), ``report.md`` (Markdown tables, figures linked) and ``figures/``.
Every file is written to a temporary file and renamed, and nothing is written before
all content is built: a failed build leaves the previous report as it was. Output is
deterministic: the same artifacts give the same bytes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes, atomic_write_text
from ..errors import ConfigError, DataError
from ..rundir import (
    COMPARISON_FILE,
    HELDOUT_TARGET_FILE,
    LOG_HISTORY_FILE,
    MANIFEST_FILE,
    PROBE_COMPARISON_FILE,
)
from ..stats import Comparison, ProbeComparison
from .beyond import beyond_section
from .config import ReportConfig
from .figures import (
    FIGURE_PREFIXES,
    FIGURES_DIR,
    MPL_RC,
    FigureOut,
    flag_panel,
    flag_title,
    forest,
    heatmap,
    position_figure,
    training_figure,
)
from .load import (
    PositionBias,
    ReportInputs,
    find_comparison,
    load_comparison,
    load_optional_json,
    load_position_bias,
    read_json,
    report_inputs,
)
from .probe_map import probe_figure, probe_map, probe_table
from .spillover_map import map_columns, map_figure, map_rows, map_table, run_name
from .tables import (
    provenance_rows,
    summary_lines,
    table_effects,
    table_main,
    table_significant,
)
from .target import alignment_lines
from .values import (
    ABSENT,
    CONTEXT_LABELS,
    POSITIONS,
    UNDEFINED,
    cell,
    direction,
    grid,
    interval,
    is_fine,
    method_text,
    sort_key,
    targets_of,
    text,
)

logger = logging.getLogger(__name__)


@dataclass
class _Report:
    title: str
    run_name: str
    alpha: float
    targets: list[str]
    summary: list[dict[str, str]]
    warnings: list[str]
    notes: list[str]
    flags: list[dict[str, Any]]
    figures: dict[str, FigureOut]
    flag_figures: dict[int, FigureOut]
    significant: dict[str, Any]
    table_main: dict[str, Any]
    table_effects: dict[str, Any]
    provenance: list[list[str]]
    position: dict[str, Any] | None
    alignment: list[dict[str, str]]
    n_strata: int
    embed_png: bool
    method: str
    source: str
    absent: list[str]
    beyond: dict[str, Any] | None


def _warnings(comparison: Comparison, manifest: Mapping[str, Any] | None) -> list[str]:
    """Warnings to show first: unverified BBQ, the stats stage's warnings, dropped items."""
    warnings: list[str] = list(comparison.warnings)
    if manifest is not None:
        bbq = manifest.get("bbq")
        if isinstance(bbq, Mapping):
            if bbq.get("verified") is False:
                warnings.insert(
                    0,
                    "BBQ data NOT verified: the files differ from the pinned release (SHA-256), "
                    "so these results are not comparable with published BBQ numbers.",
                )
            for w in bbq.get("warnings") or []:
                warnings.append(f"BBQ: {text(w)}")
        for w in manifest.get("warnings") or []:
            warnings.append(text(w))
    dropped = comparison.summary.get("dropped")
    if isinstance(dropped, Mapping):
        lost = {k: v for k, v in dropped.items() if v}
        if lost:
            warnings.append(
                "Items dropped before testing: "
                + ", ".join(f"{k}: {text(v)}" for k, v in lost.items())
            )
    return list(dict.fromkeys(w for w in warnings if w))  # keep order, drop duplicates


def _position_table(position: PositionBias) -> dict[str, Any]:
    models = [m for m in ("base", "aligned") if m in position.shares]
    rows = [
        [f"picks at position {p}", *(f"{position.shares[m][k] * 100:.1f}%" for m in models)]
        for k, p in enumerate(POSITIONS)
    ]
    rows += [
        [
            f"accuracy, order {perm}",
            *(
                f"{position.accuracy[m][perm] * 100:.1f}%"
                if perm in position.accuracy[m]
                else ABSENT
                for m in models
            ),
        ]
        for perm in position.permutations
    ]
    rows.append(["prediction rows", *(f"{position.counts[m]:,}" for m in models)])
    return {"header": ["", *models], "rows": rows}


def _figures(
    comparison: Comparison,
    targets: list[str],
    alpha: float,
    cfg: ReportConfig,
    history: list[Mapping[str, Any]],
    position: PositionBias | None,
    notes: list[str],
) -> tuple[dict[str, FigureOut], dict[int, FigureOut]]:
    """Every figure of a run's report (flag panels separately, by flag index)."""
    import matplotlib

    figures: dict[str, FigureOut] = {}
    flag_figures: dict[int, FigureOut] = {}
    rc: Any = MPL_RC
    with matplotlib.rc_context(rc):
        figures["heatmap_acc"] = heatmap(comparison, targets, alpha, cfg, metric="delta_accuracy")
        figures["heatmap_bias"] = heatmap(
            comparison, targets, alpha, cfg, metric="delta_bias_score"
        )
        figures["forest"] = forest(comparison, targets, alpha, cfg)
        cells = grid(comparison)
        # a panel compares an aggregate with its strata: over-abstention flags have none
        drawable = [i for i, flag in enumerate(comparison.flags) if flag.strata]
        for i in drawable[: cfg.max_flag_panels]:
            flag_figures[i] = flag_panel(i + 1, comparison.flags[i], cells, alpha, cfg)
        if len(drawable) > cfg.max_flag_panels:
            notes.append(
                f"{len(drawable)} masking or reversal flags; panels drawn for the first "
                f"{cfg.max_flag_panels} (all are listed)."
            )
        if history:
            fig = training_figure(history, cfg)
            if fig is not None:
                figures["training"] = fig
            else:
                notes.append("The log history has no loss or reward values: curves skipped.")
        if position is not None:
            figures["position"] = position_figure(position, cfg)
    return figures, flag_figures


def _absent(
    inputs: ReportInputs,
    manifest: Mapping[str, Any] | None,
    history: list[Mapping[str, Any]],
    position: PositionBias | None,
    target: Any,
) -> list[str]:
    """The parts of a report that its folder cannot give, with the file each needs."""
    out = []
    if manifest is None:
        out.append(f"provenance of models, data and seeds ({MANIFEST_FILE})")
    if not history:
        out.append(f"training curves ({LOG_HISTORY_FILE})")
    if not isinstance(target, dict):
        out.append(f"the target on held-out scenarios ({HELDOUT_TARGET_FILE})")
    if position is None:
        files = ", ".join(inputs.shown[m] for m in ("base", "aligned"))
        out.append(f"the answer-position view (predictions in several answer orders: {files})")
    return out


def _build(run_dir: Path, cfg: ReportConfig, inputs: ReportInputs) -> _Report:
    comparison = load_comparison(inputs.comparison)
    notes: list[str] = []
    load_warnings: list[str] = []
    manifest_obj = load_optional_json(run_dir / MANIFEST_FILE, "Manifest", notes, load_warnings)
    manifest = manifest_obj if isinstance(manifest_obj, dict) else None
    history_obj = load_optional_json(
        run_dir / LOG_HISTORY_FILE, "Training log history", notes, load_warnings
    )
    history = (
        [h for h in history_obj if isinstance(h, Mapping)] if isinstance(history_obj, list) else []
    )
    if history_obj is not None and not history:
        notes.append("The training log history is empty: curves skipped.")
    position = load_position_bias(inputs, notes, load_warnings)
    target_obj = load_optional_json(
        run_dir / HELDOUT_TARGET_FILE, "Held-out target comparison", notes, load_warnings
    )
    probes = _probes(run_dir, load_warnings)
    warnings = list(dict.fromkeys([*_warnings(comparison, manifest), *load_warnings]))
    alpha = cfg.alpha if cfg.alpha is not None else comparison.config.alpha
    targets = targets_of(comparison)
    strata = sorted(comparison.rows, key=sort_key)
    figures, flag_figures = _figures(comparison, targets, alpha, cfg, history, position, notes)
    flags_ctx = [
        {"title": flag_title(flag), "explanation": flag.message, "figure": flag_figures.get(i)}
        for i, flag in enumerate(comparison.flags)
    ]
    return _Report(
        title=cfg.title or f"Bias spillover report: {run_dir.resolve().name}",
        run_name=run_dir.resolve().name,
        alpha=alpha,
        targets=targets,
        summary=summary_lines(comparison, targets, alpha),
        warnings=warnings,
        notes=notes,
        flags=flags_ctx,
        figures=figures,
        flag_figures=flag_figures,
        significant=table_significant(strata, targets, alpha),
        table_main=table_main(strata, alpha),
        table_effects=table_effects(strata, alpha),
        provenance=provenance_rows(manifest, comparison),
        position=_position_table(position) if position is not None else None,
        alignment=alignment_lines(target_obj if isinstance(target_obj, dict) else None, manifest),
        n_strata=len(strata),
        embed_png="png" in cfg.figure_formats,
        method=method_text(comparison),
        source=inputs.comparison.relative_to(run_dir).as_posix(),
        absent=_absent(inputs, manifest, history, position, target_obj),
        beyond=beyond_section(probes, comparison, alpha),
    )


def _probes(run_dir: Path, warnings: list[str]) -> ProbeComparison | None:
    """The likelihood probes' comparison, when the run evaluated any (else None, silently)."""
    path = run_dir / PROBE_COMPARISON_FILE
    if not path.is_file():
        return None
    try:
        return ProbeComparison.from_json(
            read_json(path, "expected the probes' comparison"), str(path)
        )
    except DataError as exc:
        msg = f"{PROBE_COMPARISON_FILE} could not be read and is skipped: {exc}"
        logger.warning(msg)
        warnings.append(msg)
        return None


def md_escape(value: Any) -> str:
    """Escape text for a Markdown table cell or paragraph (no raw HTML survives)."""
    out = value if isinstance(value, str) else text(value)
    out = out.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    out = out.replace("|", "\\|").replace("\r", " ").replace("\n", " ")
    return re.sub(r"([\\`*_\[\]])", r"\\\1", out.replace("\\|", "\x00")).replace("\x00", "\\|")


def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2")),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = md_escape
    return env


def _render_documents(
    cfg: ReportConfig, template_stem: str, context: Mapping[str, Any]
) -> dict[str, str]:
    env = _environment()
    docs: dict[str, str] = {}
    if "html" in cfg.formats:
        docs["report.html"] = env.get_template(f"{template_stem}.html.j2").render(**context)
    if "md" in cfg.formats:
        docs["report.md"] = env.get_template(f"{template_stem}.md.j2").render(**context)
    return docs


def _write_outputs(
    out_dir: Path,
    figures: Iterable[FigureOut],
    docs: Mapping[str, str],
    cfg: ReportConfig,
    *,
    prune: bool = True,
) -> None:
    fig_dir = out_dir / FIGURES_DIR
    written: set[str] = set()
    for fig in figures:
        if "png" in cfg.figure_formats and fig.png is not None:
            atomic_write_bytes(fig_dir / f"{fig.name}.png", fig.png)
            written.add(f"{fig.name}.png")
        if "svg" in cfg.figure_formats and fig.svg is not None:
            atomic_write_text(fig_dir / f"{fig.name}.svg", fig.svg)
            written.add(f"{fig.name}.svg")
    # the documents last: until they are replaced, the previous report stays whole
    for name in sorted(docs, key=lambda n: n.endswith(".html")):
        atomic_write_text(out_dir / name, docs[name])
    # figures of an earlier build that this one no longer references
    if prune and fig_dir.is_dir():
        for stale in sorted(fig_dir.iterdir()):
            if (
                stale.is_file()
                and stale.suffix in (".png", ".svg")
                and stale.name.startswith(FIGURE_PREFIXES)
                and stale.name not in written
            ):
                stale.unlink()


def write_report(
    run_dir: Path,
    cfg: ReportConfig | None = None,
    *,
    base: Path | None = None,
    aligned: Path | None = None,
) -> Path:
    """Build the report of one run, or of a folder made by hand, from its artifacts.

    Args:
        run_dir: The run directory (holding ``stats/comparison.json``), or a folder with
            ``comparison.json`` at its top (``spillover compare --json``) and, optionally,
            ``base.parquet`` / ``aligned.parquet`` (or ``.csv``, ``.jsonl``).
        cfg: Options; defaults to :class:`ReportConfig()`.
        base: The base model's predictions, instead of the folder's.
        aligned: The aligned model's predictions, instead of the folder's.

    Returns:
        The path of ``report.html`` (written when ``html`` is among the formats).

    Raises:
        DataError: The comparison is missing or malformed, or ``base`` / ``aligned``
            does not exist.
        ConfigError: An option is invalid.
    """
    cfg = cfg or ReportConfig()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: not a directory; expected a run directory")
    report = _build(run_dir, cfg, report_inputs(run_dir, base, aligned))
    context = {
        "r": report,
        "figure_formats": list(cfg.figure_formats),
        "contexts": CONTEXT_LABELS,
        "UNDEFINED": UNDEFINED,
    }
    docs = _render_documents(cfg, "report", context)
    figures = [*report.figures.values(), *report.flag_figures.values()]
    _write_outputs(run_dir, figures, docs, cfg)
    logger.info("report written to %s (%d figures)", run_dir / "report.html", len(figures))
    return run_dir / "report.html"


# --------------------------------------------------------------------------- sweeps


@dataclass
class _SubRun:
    name: str
    link: str | None
    md_link: str | None
    targets: list[str]
    n_fine: int
    n_degraded: int
    n_improved: int
    n_flags: int
    warnings: int


def _sub_run(
    sweep_dir: Path, run_dir: Path, comparison: Comparison, cfg: ReportConfig
) -> tuple[_SubRun, list[dict[str, Any]], str | None]:
    """One sub-run's line, its significant spillover rows, and its unverified-data warning."""
    import json

    manifest: dict[str, Any] | None = None
    try:
        obj = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        manifest = obj if isinstance(obj, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None
    alpha = cfg.alpha if cfg.alpha is not None else comparison.config.alpha
    targets = targets_of(comparison)
    name = os.path.relpath(run_dir.resolve(), sweep_dir.resolve()).replace(os.sep, "/")
    fine = [r for r in comparison.rows if is_fine(r)]
    dirs = [direction(r, alpha) for r in fine]
    warning = None
    n_warn = len(comparison.warnings)
    bbq = manifest.get("bbq") if manifest is not None else None
    if isinstance(bbq, Mapping) and bbq.get("verified") is False:
        warning = f"{name}: BBQ data NOT verified against the pinned release."
        n_warn += 1
    sub = _SubRun(
        name=name,
        link=f"{name}/report.html" if "html" in cfg.formats else None,
        md_link=f"{name}/report.md" if "md" in cfg.formats else None,
        targets=targets,
        n_fine=len(fine),
        n_degraded=dirs.count("degraded"),
        n_improved=dirs.count("improved"),
        n_flags=len(comparison.flags),
        warnings=n_warn,
    )
    rows = []
    for rec in sorted(fine, key=sort_key):
        moved = direction(rec, alpha)
        if moved is None or rec.category in targets:
            continue
        cells = [
            name,
            ", ".join(targets) or ABSENT,
            rec.category,
            rec.context_condition,
            cell(rec, "delta_accuracy", "pp"),
            interval(rec, "delta_accuracy_ci_low", "delta_accuracy_ci_high", "pp"),
            cell(rec, "p_adjusted", "p"),
            moved,
        ]
        rows.append({"cells": cells, "cls": moved})
    return sub, rows, warning


def write_combined_report(
    sweep_dir: Path, run_dirs: list[Path], cfg: ReportConfig | None = None
) -> Path:
    """Build each sub-run's report and a combined page linking them.

    The combined page lists every sub-run (targets, significant losses and gains
    among the attribute x context strata, Simpson flags), the spillover map (target x
    evaluated attribute x context: the changes in accuracy, unknown rate and bias score,
    significance marked; figure ``figures/spillover_map`` and table), when any sub-run has
    a likelihood-probe comparison (``stats/probes.json``) the map beyond BBQ's format (the
    same rows, one panel per probe benchmark: the change of its bias metric; figure
    ``figures/spillover_map_probes`` and table), and one table of the significant
    spillovers: strata of non-target attributes whose corrected test is significant.

    Args:
        sweep_dir: Folder receiving the combined ``report.html`` / ``report.md``.
        run_dirs: The sub-run directories (each with ``stats/comparison.json``).
        cfg: Options applied to every sub-report and the combined page.

    Returns:
        The path of the combined ``report.html``.

    Raises:
        DataError: A sub-run lacks a readable comparison, or ``run_dirs`` is empty.
    """
    cfg = cfg or ReportConfig()
    sweep_dir = Path(sweep_dir)
    if not run_dirs:
        raise DataError(f"{sweep_dir}: no sub-runs given; expected run directories to combine")
    # check every sub-run first: nothing is written when one is unusable
    loaded = [(Path(d), load_comparison(report_inputs(Path(d)).comparison)) for d in run_dirs]
    subs: list[_SubRun] = []
    spill_rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for run_dir, comparison in loaded:
        write_report(run_dir, cfg)
        sub, rows, warning = _sub_run(sweep_dir, run_dir, comparison, cfg)
        subs.append(sub)
        spill_rows += rows
        if warning is not None:
            warnings.append(warning)
    alphas = {cfg.alpha if cfg.alpha is not None else c.config.alpha for _, c in loaded}
    header = ["run", "target", "category", "context", "Δ acc.", "95% CI", "p adj.", "change"]
    spill_map, map_fig = _spillover_map(sweep_dir, loaded, cfg)
    probes, probe_fig, no_probes = _probe_map(sweep_dir, loaded, cfg, warnings)
    context = {
        "title": cfg.title or f"Bias spillover sweep: {sweep_dir.resolve().name}",
        "subs": subs,
        "alpha": ", ".join(sorted(f"{a:g}" for a in alphas)),
        "warnings": warnings,
        "spill": {"header": header, "rows": spill_rows},
        "map": spill_map,
        "map_figure": map_fig,
        "probes": probes,
        "probe_figure": probe_fig,
        "no_probes": no_probes,
        "embed_png": "png" in cfg.figure_formats,
    }
    docs = _render_documents(cfg, "combined", context)
    figures = [f for f in (map_fig, probe_fig) if f is not None]
    _write_outputs(sweep_dir, figures, docs, cfg)
    return sweep_dir / "report.html"


def _spillover_map(
    sweep_dir: Path, loaded: list[tuple[Path, Comparison]], cfg: ReportConfig
) -> tuple[dict[str, Any] | None, FigureOut | None]:
    """The sweep's spillover map: its table and figure (None without attribute strata)."""
    import matplotlib

    rows = map_rows(sweep_dir, loaded, cfg)
    columns = map_columns(rows)
    if not columns:
        return None, None
    rc: Any = MPL_RC
    with matplotlib.rc_context(rc):
        fig = map_figure(rows, columns, cfg)
    return map_table(rows, columns), fig


def _probe_map(
    sweep_dir: Path, loaded: list[tuple[Path, Comparison]], cfg: ReportConfig, warnings: list[str]
) -> tuple[dict[str, Any] | None, FigureOut | None, list[str]]:
    """The map beyond BBQ's format: its table, figure and the sub-runs without probes (None,
    None, [] when no sub-run compared any probe benchmark)."""
    import matplotlib

    found = {}
    for run_dir, _ in loaded:
        name = run_name(sweep_dir, run_dir)
        lost: list[str] = []
        found[name] = _probes(run_dir, lost)
        warnings += [f"{name}: {w}" for w in lost]
    pm = probe_map(map_rows(sweep_dir, loaded, cfg), found)
    if pm is None:
        return None, None, []
    rc: Any = MPL_RC
    with matplotlib.rc_context(rc):
        fig = probe_figure(pm, cfg)
    return probe_table(pm), fig, list(pm.without)


def find_run_dirs(sweep_dir: Path) -> list[Path]:
    """Sub-run directories of a sweep: direct children holding ``stats/comparison.json``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return []
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / COMPARISON_FILE).is_file())


@dataclass(frozen=True)
class ReportOutcome:
    """What :func:`report_folder` wrote."""

    path: Path
    """The report: ``report.html``, or ``report.md`` when HTML is not among the formats."""
    sub_runs: int
    """Sub-runs combined into a sweep's report; 0 for the report of one folder."""
    warnings: tuple[str, ...] = ()
    """Warnings worth repeating where the report was asked for (unverified BBQ data)."""


def report_folder(
    folder: Path,
    cfg: ReportConfig | None = None,
    *,
    base: Path | None = None,
    aligned: Path | None = None,
) -> ReportOutcome:
    """The report stage on a folder (``spillover report``): the combined report of a sweep
    directory (sub-folders holding runs), else the report of one run or of a folder made by
    hand (:func:`write_report`).

    Raises:
        ConfigError: ``base`` / ``aligned`` given for a sweep; an invalid option.
        DataError: as :func:`write_report`.
    """
    cfg = cfg or ReportConfig()
    folder = Path(folder)
    subs = [] if find_comparison(folder) is not None else find_run_dirs(folder)
    if subs:
        if base is not None or aligned is not None:
            raise ConfigError(
                f"{folder} is a sweep; --base and --aligned apply to the report of one folder"
            )
        return ReportOutcome(write_combined_report(folder, subs, cfg), len(subs))
    out = write_report(folder, cfg, base=base, aligned=aligned)
    shown = out if "html" in cfg.formats else out.with_suffix(".md")
    manifest = load_optional_json(folder / MANIFEST_FILE, "manifest", [], [])
    bbq = manifest.get("bbq") if isinstance(manifest, dict) else None
    unverified = isinstance(bbq, dict) and bbq.get("verified") is False
    warnings = ("BBQ data of this run is NOT verified (see the report's warnings)",)
    return ReportOutcome(shown, 0, warnings if unverified else ())
