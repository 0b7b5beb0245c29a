"""``spillover metrics`` and ``spillover compare``: thin command-line wrappers.

Each parses its options, calls one library function, prints with rich and writes the
requested files: all of them or, when any fails, none. ``compare``'s options are generated
from :class:`~spillover.stats.CompareConfig`, the object the run config builds too, so
the same predictions give the same comparison from either.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from ..data import BBQSource
from ..errors import ConfigError
from ..stats import WARNINGS_COLUMN, WARNINGS_SEPARATOR, CompareConfig, MetricsConfig
from ._common import (
    AllowUnverifiedOption,
    BBQDirOption,
    DataDirOption,
    console,
    path_text,
    print_table,
    warn,
)
from ._options import config_options, with_options
from ._outputs import Output, check_outputs, write_outputs

if TYPE_CHECKING:
    from ..stats import Comparison, MetricsReport

COMPARE_OPTIONS = config_options(CompareConfig)
METRICS_OPTIONS = config_options(MetricsConfig)

_PRED_HELP = (
    "Prediction file (.parquet, .csv or .jsonl), or a samples_<task>_<date>.jsonl log of "
    "lm-evaluation-harness."
)
_FORMAT_HELP = (
    "Prediction file format: auto (by suffix; a .jsonl file of lm-evaluation-harness "
    "samples, from lm_eval --log_samples, is read as lm-eval), parquet, csv, jsonl or lm-eval."
)
_NORM_HELP = (
    "For lm-eval logs, the decision to read: none (lm-eval's acc: the choice with the highest "
    "summed log-likelihood), char (acc_norm: per character of the choice) or byte (acc_bytes)."
)

FormatOption = Annotated[str, typer.Option("--format", help=_FORMAT_HELP)]
BenchmarkOption = Annotated[
    str | None,
    typer.Option(
        "--benchmark",
        help="Benchmark of the predictions: bbq, crows-pairs, stereoset, winobias or "
        "winogender (default: read from the file; a likelihood probe's file names items by "
        "item_id and its benchmark in a 'benchmark' column).",
        show_default=False,
    ),
]
LengthNormOption = Annotated[str, typer.Option("--length-norm", help=_NORM_HELP)]


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _pval(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return "<1e-16" if value < 1e-16 else format(value, ".2g")


@with_options(METRICS_OPTIONS)
def metrics_command(
    pred: Annotated[Path, typer.Argument(help=_PRED_HELP)],
    bbq_dir: BBQDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the records and warnings as JSON to this file."),
    ] = None,
    csv_out: Annotated[
        Path | None,
        typer.Option("--csv", help="Write the strata table as CSV (last column: warnings)."),
    ] = None,
    file_format: FormatOption = "auto",
    length_norm: LengthNormOption = "none",
    benchmark: BenchmarkOption = None,
    data_dir: DataDirOption = None,
    **options: Any,
) -> None:
    """Accuracy and BBQ bias scores of one run per stratum; on a likelihood probe's
    predictions, that benchmark's own metrics per attribute."""
    from ..predictions import benchmark_of
    from ..stats import load_and_compute_metrics

    name = benchmark_of(pred, file_format, length_norm=length_norm, given=benchmark)
    if name != "bbq":
        probe_metrics_command(
            pred, name, json_out=json_out, csv_out=csv_out, data_dir=path_text(data_dir),
            allow_unverified=allow_unverified,
        )  # fmt: skip
        return
    cfg = METRICS_OPTIONS.build(options)
    named = [("--json", json_out), ("--csv", csv_out)]
    check_outputs([Output(option, path) for option, path in named if path is not None])
    bbq = BBQSource(path_text(bbq_dir), None, allow_unverified).load()
    report = load_and_compute_metrics(pred, bbq, cfg, format=file_format, length_norm=length_norm)
    warnings = [*report.warnings, *report.notes]
    outputs = []
    if json_out is not None:
        payload = {"strata": report.records(), "warnings": warnings}
        outputs.append(Output("--json", json_out, _json_text(payload)))
    if csv_out is not None:
        outputs.append(Output("--csv", csv_out, _metrics_csv(report, warnings)))
    for line in warnings:
        warn(line)
    _print_metrics(report)
    write_outputs(outputs)
    for out in outputs:
        console.print(f"wrote {out.path}")


def _metrics_csv(report: MetricsReport, warnings: list[str]) -> str:
    """The strata table as CSV with a last :data:`WARNINGS_COLUMN`, as ``compare --csv``
    writes it (:meth:`Comparison.to_csv`)."""
    df = report.table.copy()
    df[WARNINGS_COLUMN] = WARNINGS_SEPARATOR.join(" ".join(w.split()) for w in warnings)
    return str(df.to_csv(index=False))


def _print_metrics(report: MetricsReport) -> None:
    table = Table(title="BBQ metrics (bias scores x100; '-' = undefined)")
    keys = [
        k
        for k in ("category", "context_condition", "question_polarity", "label_type")
        if k in report.table.columns
    ]
    for k in keys:
        table.add_column(k)
    for col in ("n", "accuracy", "unknown", "s_DIS", "s_AMB"):
        table.add_column(col, justify="right")
    has_mass = "unknown_mass" in report.table.columns
    if has_mass:
        table.add_column("unk. mass", justify="right")
    for rec in report.records():
        row = [str(rec[k]) for k in keys]
        row += [
            str(rec["n"]),
            _num(rec["accuracy"]),
            _num(rec["unknown_rate"]),
            _num(rec["bias_score_disambig"], ".1f"),
            _num(rec["bias_score_ambig"], ".1f"),
        ]
        if has_mass:
            row.append(_num(rec["unknown_mass"]))
        table.add_row(*row)
    print_table(table)


@with_options(COMPARE_OPTIONS)
def compare_command(
    base: Annotated[
        Path, typer.Argument(help="Predictions of the base model (any file metrics reads).")
    ],
    aligned: Annotated[Path, typer.Argument(help="Predictions of the aligned model.")],
    bbq_dir: BBQDirOption = None,
    allow_unverified: AllowUnverifiedOption = False,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write strata, flags and summary as JSON.")
    ] = None,
    csv_out: Annotated[
        Path | None, typer.Option("--csv", help="Write the strata table as CSV.")
    ] = None,
    file_format: FormatOption = "auto",
    length_norm: LengthNormOption = "none",
    heldout_from: Annotated[
        Path | None,
        typer.Option(
            "--heldout-from",
            help="Pairs folder (or its split.json): compare the targets on the scenarios it "
            "held out only, as spillover run does (--targets defaults to its targets).",
        ),
    ] = None,
    benchmark: BenchmarkOption = None,
    data_dir: DataDirOption = None,
    **options: Any,
) -> None:
    """Paired comparison of a base and an aligned run (scenario-clustered and item-level tests, effects, power, flags)."""
    from ..align import heldout_for
    from ..predictions import benchmark_of
    from ..stats import compare_files

    cfg = COMPARE_OPTIONS.build(options)
    held = None
    if heldout_from is not None:  # a bad split fails before any predictions or BBQ are read
        try:
            targets, _ = heldout_for(heldout_from, cfg.targets, items=())  # checks the split
        except ConfigError as exc:
            raise ConfigError(COMPARE_OPTIONS.flags(str(exc))) from None
        cfg = dataclasses.replace(cfg, targets=targets)
    name = benchmark_of(base, file_format, length_norm=length_norm, given=benchmark)
    if name != "bbq":
        if heldout_from is not None:
            raise ConfigError(f"--heldout-from reads BBQ's held-out scenarios; not for {name}")
        probe_compare_command(
            base, aligned, name, cfg, json_out=json_out, csv_out=csv_out,
            data_dir=path_text(data_dir), allow_unverified=allow_unverified,
        )  # fmt: skip
        return
    named = [("--json", json_out), ("--csv", csv_out)]
    check_outputs([Output(option, path) for option, path in named if path is not None])
    bbq = BBQSource(path_text(bbq_dir), None, allow_unverified).load()
    if heldout_from is not None:  # a split of probe pairs holds out all of BBQ's items
        held = heldout_for(heldout_from, cfg.targets, bbq.items)[1]
    result = compare_files(
        base, aligned, bbq, cfg, heldout=held, format=file_format, length_norm=length_norm
    ).comparison
    outputs = []
    if json_out is not None:
        outputs.append(Output("--json", json_out, _json_text(result.to_json())))
    if csv_out is not None:
        csv_text = result.to_csv()
        outputs.append(Output("--csv", csv_out, csv_text))
    for line in result.warnings:
        warn(line)
    _print_comparison(result)
    write_outputs(outputs)
    for out in outputs:
        console.print(f"wrote {out.path}")


def _print_comparison(result: Comparison) -> None:
    summary = result.summary
    dropped = summary["dropped"]
    if dropped["base_only"] or dropped["aligned_only"]:
        console.print(
            f"compared {summary['n_items']} common items; dropped {dropped['base_only']} "
            f"only in BASE and {dropped['aligned_only']} only in ALIGNED"
        )
    cfg = result.config
    test = (
        f"{cfg.cluster}-clustered sign-flip test"
        if summary["test"] == "signflip"
        else f"item-level {summary['test']} McNemar"
    )
    table = Table(
        title=(
            f"BASE vs ALIGNED: {test}, {cfg.correction} within each level "
            f"(primary family: {summary['family']}, {summary['family_size']} tests); "
            "accuracy in points, bias x100"
        )
    )
    for col, just in (
        ("stratum", "left"),
        ("n", "right"),
        ("acc base", "right"),
        ("acc aligned", "right"),
        ("Δacc [95% CI]", "right"),
        ("b/c", "right"),
        ("p adj", "right"),
        ("p adj item", "right"),
        ("Δunknown", "right"),
        ("Δbias", "right"),
        ("flags", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    keys = ("category", "context_condition", "question_polarity", "label_type")
    for rec in result.records():
        label = " / ".join(str(rec[k]) for k in keys if k in rec and rec[k] != "all") or "overall"
        dci = (
            f"{100 * rec['delta_accuracy']:+.1f} "
            f"[{100 * rec['delta_accuracy_ci_low']:+.1f}, {100 * rec['delta_accuracy_ci_high']:+.1f}]"
        )
        dbias = _num(rec["delta_bias_score"], "+.1f")
        if rec["delta_bias_score_ci_low"] is not None:
            dbias += (
                f" [{rec['delta_bias_score_ci_low']:+.1f}, {rec['delta_bias_score_ci_high']:+.1f}]"
            )
        style = None
        if "significant_degradation" in rec["flags"]:
            style = "red"
        elif "significant_improvement" in rec["flags"]:
            style = "green"
        table.add_row(
            label,
            str(rec["n"]),
            _num(100 * rec["acc_base"], ".1f"),
            _num(100 * rec["acc_aligned"], ".1f"),
            dci,
            f"{rec['b']}/{rec['c']}",
            _pval(rec["p_adjusted"]),
            _pval(rec["p_adjusted_item"]),
            f"{100 * rec['delta_unknown_rate']:+.1f}",
            dbias,
            ", ".join(rec["flags"]),
            style=style,
        )
    print_table(table)
    for flag in result.flags:
        console.print(Text(f"{flag.kind}: {flag.message}", style="bold"), soft_wrap=False)
    if "spillover" in summary:
        sp = summary["spillover"]
        for group in ("target", "untargeted"):
            for ctx, part in sp[group]["by_context"].items():
                console.print(
                    f"{group} ({', '.join(sp[group]['categories'])}) / {ctx}: "
                    f"{len(part['improvements'])} significant improvement(s), "
                    f"{len(part['degradations'])} significant degradation(s); pooled "
                    f"Δacc {100 * part['pooled']['delta_accuracy']:+.1f} points"
                )


# --------------------------------------------------------------------------- likelihood probes


def probe_metrics_command(
    pred: Path,
    name: str,
    *,
    json_out: Path | None,
    csv_out: Path | None,
    data_dir: str | None,
    allow_unverified: bool,
) -> None:
    """``spillover metrics`` on a likelihood probe's predictions."""
    from ..data import load_benchmark
    from ..stats import load_and_compute_probe_metrics

    named = [("--json", json_out), ("--csv", csv_out)]
    check_outputs([Output(option, path) for option, path in named if path is not None])
    data = load_benchmark(name, data_dir, allow_unverified=allow_unverified)
    report = load_and_compute_probe_metrics(pred, data)
    warnings = [*report.warnings, *report.notes]
    outputs = []
    if json_out is not None:
        payload = {"benchmark": name, "strata": report.records(), "warnings": warnings}
        outputs.append(Output("--json", json_out, _json_text(payload)))
    if csv_out is not None:
        df = report.table.copy()
        df[WARNINGS_COLUMN] = WARNINGS_SEPARATOR.join(" ".join(w.split()) for w in warnings)
        outputs.append(Output("--csv", csv_out, str(df.to_csv(index=False))))
    for line in warnings:
        warn(line)
    records = report.records()
    metrics = [k for k in records[0] if k not in ("benchmark", "level", "attribute", "subset")]
    table = Table(title=f"{name} metrics ('-' = undefined)")
    for col in ("attribute", "subset", *metrics):
        table.add_column(col, justify="left" if col in ("attribute", "subset") else "right")
    for rec in records:
        cells = [str(rec["attribute"]), str(rec["subset"])]
        cells += [_num(rec[m], ".0f" if m.startswith("n") else ".2f") for m in metrics]
        table.add_row(*cells)
    print_table(table)
    write_outputs(outputs)
    for out in outputs:
        console.print(f"wrote {out.path}")


def probe_compare_command(
    base: Path,
    aligned: Path,
    name: str,
    cfg: CompareConfig,
    *,
    json_out: Path | None,
    csv_out: Path | None,
    data_dir: str | None,
    allow_unverified: bool,
) -> None:
    """``spillover compare`` on two likelihood-probe predictions files of one benchmark."""
    from ..data import load_benchmark
    from ..stats import compare_probe_files

    named = [("--json", json_out), ("--csv", csv_out)]
    check_outputs([Output(option, path) for option, path in named if path is not None])
    data = load_benchmark(name, data_dir, allow_unverified=allow_unverified)
    result = compare_probe_files(base, aligned, data, cfg)
    outputs = []
    if json_out is not None:
        outputs.append(Output("--json", json_out, _json_text(result.to_json())))
    if csv_out is not None:
        outputs.append(Output("--csv", csv_out, str(result.strata.to_csv(index=False))))
    for line in result.warnings:
        warn(line)
    table = Table(title=f"BASE vs ALIGNED on {name}: {cfg.correction} over the fine strata")
    for col in ("stratum", "n", "clusters", "metric", "base", "aligned", "Δ [95% CI]", "p adj"):
        table.add_column(col, justify="left" if col in ("stratum", "metric") else "right")
    for r in result.rows:
        ci = ""
        if r.delta_metric_ci_low is not None and r.delta_metric_ci_high is not None:
            ci = f" [{r.delta_metric_ci_low:+.1f}, {r.delta_metric_ci_high:+.1f}]"
        label = " / ".join(x for x in (r.attribute, r.subset) if x not in ("all", ""))
        table.add_row(
            label or "overall", str(r.n), str(r.n_clusters), r.metric,
            _num(r.metric_base, ".1f"), _num(r.metric_aligned, ".1f"),
            _num(r.delta_metric, "+.1f") + ci, _pval(r.p_adjusted),
        )  # fmt: skip
    print_table(table)
    write_outputs(outputs)
    for out in outputs:
        console.print(f"wrote {out.path}")
