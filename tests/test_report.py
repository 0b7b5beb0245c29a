"""Report stage: self-contained, escaped, complete, deterministic, atomic."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_runner import invoke
from spillover.errors import ConfigError, DataError
from spillover.report import ReportConfig, write_combined_report, write_report

FIXTURES = Path(__file__).parent / "fixtures"
XSS = "<script>alert(1)</script>"
XSS_ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _load_make_run() -> Any:
    spec = importlib.util.spec_from_file_location(
        "make_report_run", FIXTURES / "make_report_run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_run


def _edit_json(path: Path, edit: Any) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj, indent=2))


def _stratum(obj: dict[str, Any], category: str, context: str) -> dict[str, Any]:
    return next(
        s
        for s in obj["strata"]
        if s["category"] == category
        and s["context_condition"] == context
        and s.get("question_polarity") is None
    )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic run's artifacts (no report yet), with hostile text and undefined values."""
    run = tmp_path_factory.mktemp("artifacts") / "run"
    _load_make_run()(run)

    def edit(obj: dict[str, Any]) -> None:
        _stratum(obj, "Age", "ambig")["note"] = f"template 3 quirk {XSS}"
        rxg = _stratum(obj, "Race_x_gender", "disambig")
        for key in ("bias_score_aligned", "delta_bias_score"):
            rxg[key] = None
        rxg["delta_bias_score_ci_low"] = rxg["delta_bias_score_ci_high"] = None
        obj["warnings"].append(f"stats: 3 items had no parsable answer {XSS}")

    _edit_json(run / "stats" / "comparison.json", edit)

    def edit_manifest(obj: dict[str, Any]) -> None:
        obj["models"][0]["name"] = f"org/model{XSS}"
        obj["bbq"]["verified"] = False
        obj["bbq"]["warnings"] = ["Age.jsonl: SHA-256 differs from the pinned release"]

    _edit_json(run / "manifest.json", edit_manifest)
    return run


@pytest.fixture(scope="module")
def built(artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The artifacts with a report built once (PNG figures); read-only for the tests."""
    run = tmp_path_factory.mktemp("built") / "run"
    shutil.copytree(artifacts, run)
    write_report(run)
    return run


def _copy(src: Path, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _local_refs(html: str) -> list[str]:
    return [
        ref
        for ref in re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)["\']', html, flags=re.I)
        if not ref.startswith(("data:", "#"))
    ]


def _md_table(md: str, heading: str) -> list[list[str]]:
    """Rows (cells) of the first table after ``heading``, header and rule excluded."""
    block = md.split(heading, 1)[1]
    lines = [ln for ln in block.splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    rows = []
    for ln in lines[start + 2 :]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    return rows


# --------------------------------------------------------------------------- content


def test_html_is_self_contained_and_figures_are_valid(built: Path) -> None:
    html = (built / "report.html").read_text()
    assert not re.search(r'(?:src|href)\s*=\s*["\']?\s*(?:https?:)?//', html, flags=re.I)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    refs = _local_refs(html)
    assert refs, "the report links its figure files"
    for ref in refs:
        path = built / ref
        assert path.is_file(), ref
        assert path.read_bytes().startswith(PNG_MAGIC), ref
    # every figure is also embedded, and the embedded images are PNGs
    import base64

    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(embedded) == 6  # 2 heatmaps, forest, 1 flag panel, training, position
    assert all(base64.b64decode(e).startswith(PNG_MAGIC) for e in embedded)
    expected = {
        "heatmap_delta_accuracy.png",
        "heatmap_delta_bias_score.png",
        "forest_delta_accuracy.png",
        "flag_01_masking_age.png",
        "training_curves.png",
        "position_bias.png",
    }
    assert {p.name for p in (built / "figures").iterdir()} == expected
    assert {Path(r).name for r in refs} == expected


def test_dataset_and_user_text_is_escaped(built: Path) -> None:
    html = (built / "report.html").read_text()
    md = (built / "report.md").read_text()
    assert XSS not in html and XSS not in md
    # the note, the stats warning and the model name all appear, escaped
    assert html.count(XSS_ESCAPED) >= 3
    assert md.count(XSS_ESCAPED) >= 3


def test_undefined_values_are_labelled_not_zero(built: Path) -> None:
    md = (built / "report.md").read_text()
    rows = _md_table(md, "### Effect sizes and bias scores")
    header = [
        "category",
        "context",
        "polarity",
        "CI method",
        "odds ratio",
        "odds ratio 95% CI",
        "bias score base",
        "bias score aligned",
        "Δ bias score",
        "Δ bias 95% CI",
        "note",
    ]
    rxg = next(r for r in rows if r[:3] == ["Race\\_x\\_gender", "disambig", "all"])
    cells = dict(zip(header, rxg, strict=True))
    assert cells["bias score aligned"] == "undefined"
    assert cells["Δ bias score"] == "undefined"
    assert cells["Δ bias 95% CI"] == "undefined"
    assert cells["bias score base"] not in ("undefined", "0", "+0.000")
    pooled = next(r for r in rows if r[:3] == ["Age", "all", "all"])
    assert dict(zip(header, pooled, strict=True))["Δ bias score"] == "undefined"
    assert not re.search(r"\bnan\b", md, flags=re.I)
    html = (built / "report.html").read_text()
    assert "<td>undefined</td>" in html
    assert not re.search(r"\bnan\b", html, flags=re.I)


def test_every_stratum_has_a_markdown_row(built: Path) -> None:
    strata = json.loads((built / "stats" / "comparison.json").read_text())["strata"]
    md = (built / "report.md").read_text()
    main = _md_table(md, "### Accuracy and tests")
    effects = _md_table(md, "### Effect sizes and bias scores")
    assert len(strata) == 38  # 22 attribute x context, 11 pooled, 3 over attributes, 2 polarity
    assert len(main) == len(effects) == len(strata)

    def key(s: dict[str, Any]) -> tuple[str, str, str]:
        cat = s["category"].replace("_", "\\_")
        return (cat, s["context_condition"], s.get("question_polarity") or "all")

    assert sorted(tuple(r[:3]) for r in main) == sorted(key(s) for s in strata)
    assert sorted(tuple(r[:3]) for r in effects) == sorted(key(s) for s in strata)
    # the significant Age ambig loss carries its numbers
    age = next(r for r in main if r[:3] == ["Age", "ambig", "all"])
    assert "-15.8 pp" in age and "significant\\_degradation" in age[-1]


def test_summary_flags_and_warnings_are_visible(built: Path, artifacts: Path) -> None:
    comparison = json.loads((artifacts / "stats" / "comparison.json").read_text())
    explanation = comparison["flags"][0]["explanation"]
    html = (built / "report.html").read_text()
    md = (built / "report.md").read_text()
    assert explanation in html
    assert explanation in md
    summary = html.split('id="summary"', 1)[1].split("</section>", 1)[0]
    assert "Alignment target: Gender_identity." in summary
    assert "1 of 22 attribute × context strata lost accuracy significantly (ambiguous: 1" in summary
    assert "Spillover losses on non-target attributes: Age · ambig" in summary
    assert "Holm correction" in summary
    warnings = html.split('id="warnings"', 1)[1].split("</section>", 1)[0]
    assert "BBQ data NOT verified" in warnings
    assert "Age.jsonl: SHA-256 differs" in warnings
    assert html.index('id="warnings"') < html.index('id="summary"')
    assert "**BBQ data NOT verified" in md
    # provenance
    assert "HuggingFaceTB" not in html or "models.base" in html
    assert "models.base" in html and "timings.align" in html
    assert "environment.cpu_bf16" in html and "Synthetic CPU" in md  # why timings differ


def test_position_table_matches_predictions(built: Path) -> None:
    import pandas as pd

    md = (built / "report.md").read_text()
    rows = {r[0]: r[1:] for r in _md_table(md, "## Answer position")}
    for col, model in enumerate(("base", "aligned")):
        df = pd.read_parquet(built / "eval" / model / "predictions.parquet")
        share_a = (df["displayed_pred"] == 0).mean() * 100
        assert rows["picks at position A"][col] == f"{share_a:.1f}%"
        acc = df[df["permutation"] == "120"]["correct"].mean() * 100
        assert rows["accuracy, order 120"][col] == f"{acc:.1f}%"


# --------------------------------------------------------------------------- robustness


def test_rebuild_is_deterministic_and_imports_no_heavy_library(built: Path, tmp_path: Path) -> None:
    run = _copy(built, tmp_path)
    before = {p.name: p.read_bytes() for p in (run / "figures").iterdir()}
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from spillover.report import write_report\n"
        f"write_report(Path({str(run)!r}))\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    src = str(Path(__file__).resolve().parent.parent / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"},
    )
    assert out.stdout.strip() == ""
    assert (run / "report.md").read_bytes() == (built / "report.md").read_bytes()
    assert (run / "report.html").read_bytes() == (built / "report.html").read_bytes()
    assert {p.name: p.read_bytes() for p in (run / "figures").iterdir()} == before


def test_missing_optional_artifacts_are_skipped_with_a_note(
    artifacts: Path, tmp_path: Path
) -> None:
    run = _copy(artifacts, tmp_path)
    (run / "manifest.json").unlink()
    (run / "align" / "log_history.json").unlink()
    shutil.rmtree(run / "eval")
    html = (write_report(run, ReportConfig(formats=("html",)))).read_text()
    notes = html.split('id="notes"', 1)[1]
    assert "Manifest not found (manifest.json)" in notes
    assert "Training log history not found (log_history.json)" in notes
    assert "No per-item predictions" in notes
    assert not (run / "report.md").exists()
    names = {p.name for p in (run / "figures").iterdir()}
    assert "training_curves.png" not in names and "position_bias.png" not in names
    assert "heatmap_delta_accuracy.png" in names


def test_single_permutation_skips_the_position_view(artifacts: Path, tmp_path: Path) -> None:
    import pandas as pd

    run = _copy(artifacts, tmp_path)
    for model in ("base", "aligned"):
        path = run / "eval" / model / "predictions.parquet"
        df = pd.read_parquet(path)
        df[df["permutation"] == "012"].to_parquet(path, index=False)
    (run / "align" / "log_history.json").write_text("[]")
    md = (
        write_report(run, ReportConfig(formats=("md",), figure_formats=("svg",))).parent
        / "report.md"
    ).read_text()
    assert "single answer order: position view skipped" in md
    assert "log history is empty" in md
    assert "## Answer position" not in md
    svgs = sorted((run / "figures").iterdir())
    assert [p.suffix for p in svgs] == [".svg"] * 4
    for p in svgs:
        text = p.read_text()
        assert text.lstrip().startswith("<?xml") and "<svg" in text and "</svg>" in text
        assert f"figures/{p.name}" in md


def test_missing_comparison_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"stats/comparison\.json: not found"):
        write_report(tmp_path)


def test_failed_build_leaves_the_previous_report(built: Path, tmp_path: Path) -> None:
    run = _copy(built, tmp_path)
    previous = {p: p.read_bytes() for p in [run / "report.html", run / "report.md"]}
    comparison = run / "stats" / "comparison.json"
    comparison.write_text(comparison.read_text()[:500])  # truncated: not JSON
    with pytest.raises(DataError, match=r"comparison\.json: not valid JSON"):
        write_report(run)
    comparison.write_text(json.dumps({"strata": [{"category": "Age"}]}))
    with pytest.raises(DataError, match=r"strata\[0\]\.context_condition"):
        write_report(run)
    assert {p: p.read_bytes() for p in previous} == previous
    assert not [p for p in run.rglob("*.tmp")]


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        ReportConfig(alpha=1.5)
    with pytest.raises(ConfigError):
        ReportConfig(formats=("pdf",))
    with pytest.raises(ConfigError):
        ReportConfig(figure_formats=())


# --------------------------------------------------------------------------- CLI and sweeps


def test_cli_missing_comparison_exits_1_with_one_line(tmp_path: Path) -> None:
    result = invoke(["report", str(tmp_path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert "comparison.json" in result.output.replace("\n", "")


def test_cli_sweep_builds_combined_report(artifacts: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _copy(artifacts, sweep, "gender")
    race = _copy(artifacts, sweep, "race")
    _edit_json(race / "manifest.json", lambda m: m["bbq"].update(verified=True))
    _edit_json(race / "stats" / "comparison.json", lambda c: c["config"].update(targets=["Age"]))
    result = invoke(["report", str(sweep), "--formats", "html,md"])
    assert result.exit_code == 0, result.output
    html = (sweep / "report.html").read_text()
    for name in ("gender", "race"):
        assert (sweep / name / "report.html").is_file()
        assert f'href="{name}/report.html"' in html
    refs = _local_refs(html)
    assert all((sweep / r).is_file() for r in refs)
    md = (sweep / "report.md").read_text()
    spill = _md_table(md, "## Significant spillovers")
    # gender run: Age is a spillover (loss and gain); race run targets Age: Gender is one
    assert spill[0][:4] == ["gender", "Gender\\_identity", "Age", "ambig"]
    assert any(r[0] == "race" and r[2] == "Gender\\_identity" for r in spill)
    assert not any(r[0] == "race" and r[2] == "Age" for r in spill)
    assert "gender: BBQ data NOT verified" in html and "race: BBQ" not in html


def test_combined_report_needs_runs(tmp_path: Path) -> None:
    with pytest.raises(DataError):
        write_combined_report(tmp_path, [])
    with pytest.raises(DataError, match=r"comparison\.json"):
        write_combined_report(tmp_path, [tmp_path / "nope"])


# --------------------------------------------------------------------------- browser


@pytest.mark.slow
def test_report_renders_in_headless_chromium(built: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not on PATH")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1280,2400",
            (built / "report.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    data = shot.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 50_000
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text and figures, not a blank page


def test_alignment_section_leads_with_the_collapse_guard(artifacts: Path, tmp_path: Path) -> None:
    run = _copy(artifacts, tmp_path)
    comparison = json.loads((run / "stats" / "comparison.json").read_text())
    mix = {
        "collapsed": True,
        "reasons": ["the aligned model answers 'unknown' on 96 % of these items (base 40 %)"],
        "advice": "what to try: prefs.strategy balanced",
    }
    summary = {
        "targets": ["Gender_identity"],
        "n_items": 48,
        "n_in_sample": 0,
        "comparison": comparison,
        "answer_mix": mix,
    }
    (run / "stats" / "heldout_target.json").write_text(json.dumps(summary))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["sub_run"] = {"model": "smollm2-135m"}
    (run / "manifest.json").write_text(json.dumps(manifest))
    md = (write_report(run, ReportConfig(formats=("md",))).parent / "report.md").read_text()
    section = md.split("## What the alignment did", 1)[1].split("## Summary", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert lines[0].startswith("- **Collapse guard: on the target's held-out scenarios")
    assert "96 %" in lines[0] and "not a fairer one" in lines[0]
    assert "SmolLM2-135M" in lines[1] and "not evidence about spillover" in lines[1]
    assert "48 items" in lines[2] and "ambig: accuracy" in lines[2]
    assert md.index("## What the alignment did") < md.index("## Summary")


def test_alignment_section_states_the_answer_mix_when_not_collapsed(
    artifacts: Path, tmp_path: Path
) -> None:
    run = _copy(artifacts, tmp_path)
    comparison = json.loads((run / "stats" / "comparison.json").read_text())
    side = {"n_disambig": 24, "disambig_unknown_rate": 0.0}
    mix = {
        "n": 48,
        "base": {**side, "unknown_share": 0.0, "position_share": [0.27, 0.375, 0.355]},
        "aligned": {**side, "unknown_share": 0.125, "disambig_unknown_rate": 1 / 24,
                    "position_share": [0.29, 0.375, 0.335]},
        "collapsed": False,
        "reasons": [],
        "advice": None,
    }  # fmt: skip
    summary = {"targets": ["Gender_identity"], "n_items": 48, "n_in_sample": 0,
               "comparison": comparison, "answer_mix": mix}  # fmt: skip
    (run / "stats" / "heldout_target.json").write_text(json.dumps(summary))
    md = (write_report(run, ReportConfig(formats=("md",))).parent / "report.md").read_text()
    section = md.split("## What the alignment did", 1)[1].split("## Summary", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("- ")]
    assert not any("Collapse guard" in ln for ln in lines)
    at = next(i for i, ln in enumerate(lines) if "48 items" in ln and "ambig: accuracy" in ln)
    assert lines[at + 1] == (
        "- Answer mix on those 48 items: 'unknown' chosen 0 % → 12 % of the time "
        "(disambiguated: 0 % → 4 %), answer positions A/B/C 27/38/36 % → 29/38/34 %. The "
        "collapse guard (one answer kind on more than 90 % of items, or disambiguated 'unknown' "
        "up by more than 20 points) did not fire."
    )


def test_alignment_section_shows_the_training_figure_drawn_from_the_run_log(
    artifacts: Path, tmp_path: Path
) -> None:
    from spillover.report.figures import training_figure

    run = _copy(artifacts, tmp_path)
    comparison = json.loads((run / "stats" / "comparison.json").read_text())
    # the held-out target's comparison holds the target's rows and their pooled ones
    comparison["strata"] = [
        s for s in comparison["strata"] if s["category"] in ("Gender_identity", "all")
    ]
    gender = {s["context_condition"]: s["mdc_accuracy"] for s in comparison["strata"]
              if s["category"] == "Gender_identity" and s.get("question_polarity") is None
              and s["context_condition"] != "all"}  # fmt: skip
    summary = {"targets": ["Gender_identity"], "n_items": 48, "n_in_sample": 0,
               "comparison": comparison}  # fmt: skip
    (run / "stats" / "heldout_target.json").write_text(json.dumps(summary))
    log = [
        {"step": 1, "loss": 0.6931, "rewards/accuracies": 0.0, "rewards/margins": 0.0},
        {"step": 2, "loss": 0.61, "rewards/accuracies": 0.75, "rewards/margins": 0.2},
        {"step": 2, "eval_loss": 0.58, "eval_rewards/accuracies": 0.8125,
         "eval_rewards/margins": 0.31},
        {"step": 4, "loss": 0.41, "rewards/accuracies": 1.0, "rewards/margins": 0.9},
        {"step": 4, "eval_loss": 0.52, "eval_rewards/accuracies": 0.875,
         "eval_rewards/margins": 0.47},
    ]  # fmt: skip
    (run / "align" / "log_history.json").write_text(json.dumps(log))
    md = (write_report(run, ReportConfig(formats=("md",))).parent / "report.md").read_text()
    section = md.split("## What the alignment did", 1)[1].split("## Summary", 1)[0]
    assert "### What it learned: training and held-out pairs per step" in section
    assert "(figures/training_curves.png)" in section and "## Training" not in md
    # the target's line carries its interval and the change its test can detect
    line = next(ln for ln in section.splitlines() if "48 items" in ln)
    assert "interval" in line and "(cluster-signflip)" in line
    assert len(gender) == 2 and all(m is not None for m in gender.values())
    for mdc in gender.values():
        assert f"detects a change of ±{100 * mdc:.1f} points with 80 % power" in line
    # what the figure plots is the run's log, step for step
    fig = training_figure(json.loads((run / "align" / "log_history.json").read_text()),
                          ReportConfig())  # fmt: skip
    assert fig is not None
    assert fig.data["eval_loss"] == ([2.0, 4.0], [0.58, 0.52])
    assert fig.data["loss"] == ([1.0, 2.0, 4.0], [0.6931, 0.61, 0.41])
    assert fig.data["eval_rewards/accuracies"] == ([2.0, 4.0], [0.8125, 0.875])
    assert fig.data["rewards/margins"][1] == [0.0, 0.2, 0.9]
    png = (run / "figures" / "training_curves.png").read_bytes()
    log[2]["eval_loss"] = 0.3  # another log draws another figure
    (run / "align" / "log_history.json").write_text(json.dumps(log))
    write_report(run, ReportConfig(formats=("md",)))
    assert (run / "figures" / "training_curves.png").read_bytes() != png


# --------------------------------------------------------------------------- spillover map

MAP_RUNS = ("gender", "race", "gender+race")
MAP_HEADER = [
    "target",
    "run",
    "attribute",
    "role",
    *(
        f"{m}, {ctx}"
        for ctx in ("ambig", "disambig")
        for m in ("Δ accuracy (pp)", "Δ unknown rate (pp)", "Δ bias score")
    ),
]


def _load_fixture(name: str) -> Any:
    """A function of ``tests/fixtures/make_report_run.py``."""
    spec = importlib.util.spec_from_file_location(
        "make_report_run", FIXTURES / "make_report_run.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


@pytest.fixture(scope="module")
def map_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sub-runs with different targets (one lacking a stratum), combined."""
    sweep = tmp_path_factory.mktemp("map") / "sweep"
    dirs = _load_fixture("make_sweep")(sweep)
    assert [d.name for d in dirs] == list(MAP_RUNS)
    assert _stratum_or_none(dirs[-1], "Religion", "disambig") is None
    write_combined_report(sweep, dirs, ReportConfig(figure_formats=("png", "svg")))
    return sweep


def _stratum_or_none(run: Path, category: str, context: str) -> dict[str, Any] | None:
    obj = json.loads((run / "stats" / "comparison.json").read_text())
    try:
        return _stratum(obj, category, context)
    except StopIteration:
        return None


def _map_md(sweep: Path) -> dict[tuple[str, str], dict[str, str]]:
    """The map table of the combined Markdown, by (run, attribute), cells by column."""
    rows = _md_table((sweep / "report.md").read_text(), "## Spillover map")
    out = {}
    for row in rows:
        cells = dict(zip(MAP_HEADER, row, strict=True))
        out[(cells["run"], cells["attribute"].replace("\\_", "_"))] = cells
    return out


def test_spillover_map_figure_files_and_embedding(map_sweep: Path) -> None:
    png = map_sweep / "figures" / "spillover_map.png"
    svg = map_sweep / "figures" / "spillover_map.svg"
    assert png.read_bytes().startswith(PNG_MAGIC)
    text = svg.read_text()
    assert "<svg" in text and "</svg>" in text
    html = (map_sweep / "report.html").read_text()
    assert 'id="fig-spillover_map"' in html and 'href="figures/spillover_map.svg"' in html
    assert all((map_sweep / r).is_file() for r in _local_refs(html))
    md = (map_sweep / "report.md").read_text()
    assert "![Spillover map](figures/spillover_map.png)" in md
    assert md.index("## Spillover map") < md.index("## Significant spillovers")


def test_spillover_map_table_numbers_marks_and_blanks(map_sweep: Path) -> None:
    cells = _map_md(map_sweep)
    assert len(cells) == 3 * 11  # every sub-run x every evaluated attribute
    gender = json.loads((map_sweep / "gender" / "stats" / "comparison.json").read_text())
    race = json.loads((map_sweep / "race" / "stats" / "comparison.json").read_text())
    # Age, ambiguous, gender run: b = 45, c = 7 of 240 -> (7 - 45) / 240 = -15.8 points,
    # significant under the scenario-clustered test
    age = _stratum(gender, "Age", "ambig")
    assert age["delta_accuracy"] == pytest.approx((7 - 45) / 240)
    assert age["significant"] is True and age["significant_unknown"] is True
    row = cells[("gender", "Age")]
    assert row["Δ accuracy (pp), ambig"] == "**-15.8 pp\\***"
    unknown = 100 * age["delta_unknown_rate"]
    assert row["Δ unknown rate (pp), ambig"] == f"**{unknown:+.1f} pp\\***"
    assert row["role"] == "spillover"
    # Religion, ambiguous, race run: (5 - 50) / 240 = -18.75 points, significant
    rel = _stratum(race, "Religion", "ambig")
    assert rel["delta_accuracy"] == pytest.approx((5 - 50) / 240) and rel["significant"]
    assert cells[("race", "Religion")]["Δ accuracy (pp), ambig"] == "**-18.8 pp\\***"
    # a default cell: b = 9, c = 3 -> -2.5 points, not significant: no mark, not bold
    dis = _stratum(race, "Disability_status", "ambig")
    assert dis["significant"] is False
    assert cells[("race", "Disability_status")]["Δ accuracy (pp), ambig"] == "-2.5 pp"
    # bias score, one decimal, marked when its bootstrap interval excludes 0
    bias = _stratum(race, "Race_ethnicity", "disambig")
    excludes = bias["delta_bias_score_ci_high"] < 0 or bias["delta_bias_score_ci_low"] > 0
    shown = f"{bias['delta_bias_score']:+.1f}"
    expect = f"**{shown}\\***" if excludes else shown
    assert cells[("race", "Race_ethnicity")]["Δ bias score, disambig"] == expect
    # the targets' own cells
    assert cells[("race", "Race_ethnicity")]["role"] == "target"
    both = [a for (run, a), c in cells.items() if run == "gender+race" and c["role"] == "target"]
    assert both == ["Gender_identity", "Race_ethnicity"]
    assert cells[("gender+race", "Age")]["target"] == "Gender\\_identity+Race\\_ethnicity"
    # the stratum the gender+race run lacks is blank, not zero; its ambiguous one is there
    lacking = cells[("gender+race", "Religion")]
    for m in ("Δ accuracy (pp)", "Δ unknown rate (pp)", "Δ bias score"):
        assert lacking[f"{m}, disambig"] == ""
        assert lacking[f"{m}, ambig"] not in ("", "undefined")


def test_spillover_map_html_marks_significant_cells(map_sweep: Path) -> None:
    html = (map_sweep / "report.html").read_text()
    table = html.split('<table class="map">', 1)[1].split("<tbody>", 1)[1].split("</table>")[0]
    rows = re.findall(r"<tr( class=\"own\")?>(.*?)</tr>", table, flags=re.S)
    by_key = {}
    for own, body in rows:
        tds = re.findall(r"<td( class=\"(?:text|sig)\")?>(.*?)</td>", body)
        by_key[(tds[1][1], tds[2][1])] = (own, tds)
    own, tds = by_key[("gender", "Age")]
    assert not own
    assert tds[4] == (' class="sig"', "-15.8 pp*")
    own, tds = by_key[("race", "Race_ethnicity")]
    assert own and tds[3][1] == "target"
    _, tds = by_key[("gender+race", "Religion")]
    assert [v for _, v in tds[7:]] == ["", "", ""]
    # every significant accuracy change of every run is marked, and nothing else is
    for run in MAP_RUNS:
        comparison = json.loads((map_sweep / run / "stats" / "comparison.json").read_text())
        for s in comparison["strata"]:
            if s["level"] != "category+context_condition":
                continue
            col = 4 if s["context_condition"] == "ambig" else 7
            cls, value = by_key[(run, s["category"])][1][col]
            assert (cls == ' class="sig"') == bool(s["significant"]), (run, s["category"])
            assert value.endswith("*") == bool(s["significant"])


def test_spillover_map_in_a_tiny_sweep_over_targets(tmp_path: Path) -> None:
    """A real sweep over two targets with a tiny random-weight model ends in the map."""
    from spillover.runs import RunConfig, run_study
    from tiny_models import make_tiny

    model = make_tiny(tmp_path / "tiny-model")
    study = {
        "name": "tiny-map",
        "model": str(model),
        "target": ["gender", "gender+race"],
        "method": "dpo",
        "seed": 0,
        "bbq": {"dir": str(FIXTURES / "bbq_mini"), "allow_unverified": True},
        "eval": {"per_stratum": 2, "chunk_items": 8},
        "align": {"max_steps": 2, "batch_size": 2},
        "compare": {"bootstrap": 100},
        "report": {"formats": ["md"], "figure_formats": ["png", "svg"]},
    }
    cfg = RunConfig.from_mapping(study)
    dirs = run_study(cfg, tmp_path / "sweep")
    assert len(dirs) == 2
    sweep = tmp_path / "sweep"
    assert (sweep / "figures" / "spillover_map.png").read_bytes().startswith(PNG_MAGIC)
    assert (sweep / "figures" / "spillover_map.svg").is_file()
    rows = _md_table((sweep / "report.md").read_text(), "## Spillover map")
    targets = {r[0] for r in rows}
    assert targets == {"Gender\\_identity", "Gender\\_identity+Race\\_ethnicity"}
    for d in dirs:
        comparison = json.loads((d / "stats" / "comparison.json").read_text())
        s = _stratum(comparison, "Age", "ambig")
        row = next(r for r in rows if r[1] == d.name.replace("_", "\\_") and r[2] == "Age")
        text = f"{100 * s['delta_accuracy']:+.1f} pp" + ("\\*" if s["significant"] else "")
        assert row[4] in (text, f"**{text}**")


# --------------------------------------------------------------------------- map beyond BBQ

PROBE_HEADING = "## Spillover map beyond BBQ's format"
PROBE_HEADER = [
    "target",
    "run",
    "attribute",
    "role",
    "CrowS-Pairs: Δ pct_stereotype",
    "StereoSet: Δ ss",
    "WinoBias: Δ diff",
    "Winogender: Δ gender_gap",
]
BENCHMARK_OF = dict(
    zip(PROBE_HEADER[4:], ("crows-pairs", "stereoset", "winobias", "winogender"), strict=True)
)


@pytest.fixture(scope="module")
def probe_sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three sub-runs of ``map_sweep``; gender with all four probe benchmarks, race with
    CrowS-Pairs and StereoSet, gender+race with none (real probe comparisons), combined."""
    sweep = tmp_path_factory.mktemp("probe-map") / "sweep"
    dirs = _load_fixture("make_probe_sweep")(sweep)
    assert [(d / "stats" / "probes.json").is_file() for d in dirs] == [True, True, False]
    write_combined_report(sweep, dirs, ReportConfig(figure_formats=("png", "svg")))
    return sweep


def _probe_strata(run: Path) -> list[dict[str, Any]]:
    obj = json.loads((run / "stats" / "probes.json").read_text())
    strata: list[dict[str, Any]] = obj["strata"]
    return strata


def _expected_probe_cell(strata: list[dict[str, Any]], benchmark: str, attribute: str) -> str:
    """The table cell from the records, by the documented rule: the attribute's row over
    every subset, or the overall row of a benchmark probing that attribute only."""
    rows = [s for s in strata if s["benchmark"] == benchmark]
    own = [s for s in rows if s["attribute"] == attribute and s["subset"] == "all"]
    if not own and {s["attribute"] for s in rows} == {attribute, "all"}:
        own = [s for s in rows if s["level"] == "overall"]
    if not own:
        return ""
    (rec,) = own
    if rec["outcome"] == "stereotype_preferred":
        mark = "\\*" if rec["significant"] else ""
    else:
        lo, hi = rec["delta_metric_ci_low"], rec["delta_metric_ci_high"]
        mark = "†" if lo > 0 or hi < 0 else ""
    way = "toward" if rec["delta_distance"] < 0 else "away"
    text = f"{rec['delta_metric']:+.1f}{mark} ({way})"
    return f"**{text}**" if mark else text


def _probe_md(sweep: Path) -> dict[tuple[str, str], dict[str, str]]:
    rows = _md_table((sweep / "report.md").read_text(), PROBE_HEADING)
    out = {}
    for row in rows:
        cells = dict(zip(PROBE_HEADER, row, strict=True))
        out[(cells["run"], cells["attribute"].replace("\\_", "_"))] = cells
    return out


def test_probe_map_figure_files_and_embedding(probe_sweep: Path) -> None:
    png = probe_sweep / "figures" / "spillover_map_probes.png"
    svg = probe_sweep / "figures" / "spillover_map_probes.svg"
    assert png.read_bytes().startswith(PNG_MAGIC)
    assert "</svg>" in svg.read_text()
    html = (probe_sweep / "report.html").read_text()
    assert 'id="fig-spillover_map_probes"' in html
    assert 'href="figures/spillover_map_probes.svg"' in html
    assert all((probe_sweep / r).is_file() for r in _local_refs(html))
    md = (probe_sweep / "report.md").read_text()
    assert "![Spillover map beyond BBQ's format](figures/spillover_map_probes.png)" in md
    assert md.index("## Spillover map\n") < md.index(PROBE_HEADING)
    assert md.index(PROBE_HEADING) < md.index("## Significant spillovers")
    section = md.split(PROBE_HEADING, 1)[1].split("## Significant spillovers")[0]
    assert "blue = moved toward the unbiased value" in section  # the caption says it
    assert "No likelihood-probe comparison (blank rows of the figure): gender+race." in section
    assert section.count("Blodgett et al. (2021") == 2  # CrowS-Pairs' and StereoSet's caveat


def test_probe_map_table_numbers_marks_and_blanks(probe_sweep: Path) -> None:
    cells = _probe_md(probe_sweep)
    # the sub-runs with probes x every attribute some benchmark probes (9 CrowS-Pairs
    # attributes and StereoSet's Profession); gender+race has no line
    assert {run for run, _ in cells} == {"gender", "race"}
    assert len(cells) == 2 * 10
    for (run, attribute), row in cells.items():
        strata = _probe_strata(probe_sweep / run)
        for column, benchmark in BENCHMARK_OF.items():
            assert row[column] == _expected_probe_cell(strata, benchmark, attribute), (
                run, attribute, benchmark,
            )  # fmt: skip
        assert row["role"] == ("target" if (run, attribute) in {
            ("gender", "Gender_identity"), ("race", "Race_ethnicity")} else "spillover")  # fmt: skip
    # the planted changes, by hand: CrowS-Pairs gender in the gender run falls 43.75 points,
    # significant, past 50 (away from the unbiased value); StereoSet race in the race run
    gender = _probe_strata(probe_sweep / "gender")
    crows = next(
        s for s in gender if s["benchmark"] == "crows-pairs" and s["attribute"] == "Gender_identity"
    )
    assert crows["delta_metric"] == pytest.approx(-43.75) and crows["significant"] is True
    assert crows["delta_distance"] > 0
    assert cells[("gender", "Gender_identity")][PROBE_HEADER[4]] == "**-43.8\\* (away)**"
    assert cells[("race", "Race_ethnicity")][PROBE_HEADER[5]] == "**+53.1\\* (away)**"
    # WinoBias: its overall row stands for gender; marked † by its interval, not by the
    # record's test (of accuracy, not of the gap)
    wb = next(s for s in gender if s["benchmark"] == "winobias" and s["level"] == "overall")
    assert wb["delta_metric_ci_high"] < 0
    assert cells[("gender", "Gender_identity")][PROBE_HEADER[6]] == (
        f"**{wb['delta_metric']:+.1f}† (away)**"
    )
    # a benchmark the sub-run lacks, an attribute the benchmark lacks: blank, never 0
    for attribute in ("Age", "Gender_identity", "Race_ethnicity", "Profession"):
        assert cells[("race", attribute)][PROBE_HEADER[6]] == ""
        assert cells[("race", attribute)][PROBE_HEADER[7]] == ""
    assert cells[("gender", "Age")][PROBE_HEADER[5]] == ""
    assert cells[("gender", "Profession")][PROBE_HEADER[4]] == ""
    assert cells[("gender", "Profession")][PROBE_HEADER[5]] != ""


def test_probe_map_html_marks_follow_the_records(probe_sweep: Path) -> None:
    html = (probe_sweep / "report.html").read_text()
    table = html.split('<table class="map probes">', 1)[1].split("<tbody>", 1)[1]
    table = table.split("</table>")[0]
    rows = re.findall(r"<tr( class=\"own\")?>(.*?)</tr>", table, flags=re.S)
    assert len(rows) == 20
    for own, body in rows:
        tds = re.findall(r"<td( class=\"(?:text|sig)\")?>(.*?)</td>", body)
        run, attribute = tds[1][1], tds[2][1]
        assert bool(own) == (tds[3][1] == "target")
        strata = _probe_strata(probe_sweep / run)
        for (cls, value), benchmark in zip(tds[4:], BENCHMARK_OF.values(), strict=True):
            expect = _expected_probe_cell(strata, benchmark, attribute)
            marked = expect.startswith("**")
            assert (cls == ' class="sig"') == marked, (run, attribute, benchmark)
            assert value == expect.strip("*").replace("\\*", "*")


def test_probe_map_cells_undefined_and_alpha(probe_sweep: Path) -> None:
    """An undefined change reads undefined (not 0); ``alpha`` decides from adjusted p."""
    import dataclasses

    from spillover.report.probe_map import probe_cell_text, probe_record
    from spillover.stats import ProbeComparison

    obj = json.loads((probe_sweep / "gender" / "stats" / "probes.json").read_text())
    probes = ProbeComparison.from_json(obj)
    wg = probe_record(probes, "winogender", "Gender_identity")
    assert wg is not None and wg.level == "overall"
    undefined = dataclasses.replace(wg, delta_metric=None, delta_distance=None)
    assert probe_cell_text(undefined, None) == {"text": "undefined", "sig": False}
    assert probe_record(probes, "winogender", "Age") is None
    crows = probe_record(probes, "crows-pairs", "Gender_identity")
    assert crows is not None and crows.p_adjusted is not None
    assert probe_cell_text(crows, None)["sig"] is True
    assert probe_cell_text(crows, crows.p_adjusted / 2)["sig"] is False


def test_probe_map_skips_an_unreadable_probe_comparison_with_a_warning(
    probe_sweep: Path, tmp_path: Path
) -> None:
    sweep = tmp_path / "sweep"
    shutil.copytree(probe_sweep, sweep)
    (sweep / "race" / "stats" / "probes.json").write_text('{"strata": 3}')
    dirs = [sweep / run for run in MAP_RUNS]
    write_combined_report(sweep, dirs, ReportConfig(formats=("md",)))
    md = (sweep / "report.md").read_text()
    warnings = md.split("## Warnings", 1)[1].split("## Sub-runs")[0]
    assert "race: stats/probes.json could not be read and is skipped" in warnings
    assert "blank rows of the figure): race, gender+race." in md
    assert {run for run, _ in _probe_md(sweep)} == {"gender"}


def test_sweep_without_probes_is_unchanged(map_sweep: Path, probe_sweep: Path) -> None:
    """No probe comparison: no section, no figure; with them, the section is all that is
    added (the same BBQ sub-runs give the same page around it)."""
    md = (map_sweep / "report.md").read_text()
    html = (map_sweep / "report.html").read_text()
    assert "beyond BBQ" not in md and "beyond BBQ" not in html
    assert not list((map_sweep / "figures").glob("spillover_map_probes*"))
    with_probes = (probe_sweep / "report.md").read_text()
    head, rest = with_probes.split(PROBE_HEADING, 1)
    assert head + "## Significant spillovers" + rest.split("## Significant spillovers", 1)[1] == md


# --------------------------------------------------------------------------- by hand


def _hand_predictions(folder: Path) -> tuple[Path, Path]:
    """Base and aligned predictions on the mini BBQ (CSV): the aligned model is right more."""
    import pandas as pd

    from spillover.data import BBQSource

    items = BBQSource(str(FIXTURES / "bbq_mini"), None, True).load().items
    rows = []
    for i, it in enumerate(items):
        wrong = (it.label + 1) % 3
        rows.append((it.category, it.example_id, it.label if i % 3 else wrong, it.label))
    df = pd.DataFrame(rows, columns=["category", "example_id", "base", "aligned"])
    folder.mkdir(parents=True, exist_ok=True)
    base, aligned = folder / "base.csv", folder / "aligned.csv"
    df.rename(columns={"base": "pred_index"})[["category", "example_id", "pred_index"]].to_csv(
        base, index=False
    )
    df.rename(columns={"aligned": "pred_index"})[["category", "example_id", "pred_index"]].to_csv(
        aligned, index=False
    )
    return base, aligned


def test_report_from_a_folder_made_by_hand(tmp_path: Path) -> None:
    folder = tmp_path / "by-hand"
    base, aligned = _hand_predictions(folder)
    mini = str(FIXTURES / "bbq_mini")
    result = invoke(
        ["compare", str(base), str(aligned), "--bbq-dir", mini, "--allow-unverified",
         "--bootstrap", "0", "--json", str(folder / "comparison.json")]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = invoke(["report", str(folder)])
    assert result.exit_code == 0, result.output
    html = (folder / "report.html").read_text()
    md = (folder / "report.md").read_text()
    strata = json.loads((folder / "comparison.json").read_text())["strata"]
    main = _md_table(md, "### Accuracy and tests")
    assert len(main) == len(strata)
    keys = {(s["category"].replace("_", "\\_"), s["context_condition"]) for s in strata}
    assert {tuple(r[:2]) for r in main} == keys
    age = next(s for s in strata if s["category"] == "Age" and s["context_condition"] == "ambig")
    row = next(r for r in main if r[:2] == ["Age", "ambig"])
    assert f"{100 * age['delta_accuracy']:+.1f} pp" in row
    # what the folder cannot give is said, not failed on
    for doc in (html, md):
        assert "folder made by hand" in doc
        assert "training curves (align/log\\_history.json)" in doc or (
            "training curves (align/log_history.json)" in doc
        )
        assert "stats/heldout\\_target.json" in doc or "stats/heldout_target.json" in doc
        assert "manifest.json" in doc
    # read as compare reads it: its answer order and positions follow from pred_index, but
    # whether an answer is right needs the `correct` or `label` column
    assert "base.csv has no column(s) correct: position view skipped" in html
    assert "## Training" not in md and "## What the alignment did" not in md
    # predictions named on the command line; a missing one is a one-line error
    elsewhere = tmp_path / "elsewhere.csv"
    shutil.copy(base, elsewhere)
    result = invoke(["report", str(folder), "--base", str(elsewhere), "--formats", "md"])
    assert result.exit_code == 0, result.output
    assert "elsewhere.csv has no column(s)" in (folder / "report.md").read_text()
    result = invoke(["report", str(folder), "--base", str(tmp_path / "nope.parquet")])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.parquet" in lines[0]
