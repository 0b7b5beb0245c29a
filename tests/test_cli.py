"""CLI behaviour: fast start, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import invoke
from spillover.cli._common import LIBRARY_BAR_ENV


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from spillover.cli import app\n"
        "r = CliRunner().invoke(app, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize(
    ("command", "text"),
    [("align", "LoRA rank [preset]."), ("eval", "pip install 'spillover[vllm]'")],
)
def test_help_prints_brackets_as_written(command: str, text: str) -> None:
    result = invoke([command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert text in " ".join(result.output.split())


def test_version() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0 and result.output.startswith("spillover ")


def test_data_info_on_mini(mini_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "info.json"
    result = invoke(
        ["data", "info", "--bbq-dir", str(mini_dir), "--allow-unverified", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "180 items in 11 categories" in result.output
    summary = json.loads(out.read_text())
    assert summary["n_items"] == 180 and summary["verified"] is False
    assert "UNVERIFIED" in summary["warnings"][0]
    # off a terminal (a batch log) the table keeps its natural width: no name cut to "…"
    assert "Disability_status" in result.output and "Sexual_orientation" in result.output
    assert "amb nonneg" in result.output and "…" not in result.output


def _bad_copy(mini_dir: Path, tmp_path: Path, line: str) -> Path:
    root = tmp_path / "bbq"
    shutil.copytree(mini_dir, root)
    path = root / "data" / "Sexual_orientation.jsonl"
    lines = path.read_text().split("\n")
    lines[4] = line
    path.write_text("\n".join(lines))
    return root


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{oops", "Sexual_orientation.jsonl:5: malformed JSON"),
        ('{"example_id": 4}', "Sexual_orientation.jsonl:5: missing field 'question_index'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    mini_dir: Path, tmp_path: Path, line: str, expected: str
) -> None:
    root = _bad_copy(mini_dir, tmp_path, line)
    out = tmp_path / "info.json"
    result = invoke(
        ["data", "info", "--bbq-dir", str(root), "--allow-unverified", "--json", str(out)]
    )
    assert result.exit_code == 1
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".info.json*"))


def test_wrong_digest_via_cli(mini_dir: Path) -> None:
    result = invoke(["data", "info", "--bbq-dir", str(mini_dir)])
    assert result.exit_code == 1
    assert "SHA-256 mismatch: expected" in result.output and "Traceback" not in result.output


def test_empty_folder_via_cli(tmp_path: Path) -> None:
    result = invoke(["data", "info", "--bbq-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no BBQ files" in result.output


def test_fetch_bad_source() -> None:
    result = invoke(["data", "fetch", "--source", "ftp"])
    assert result.exit_code == 1 and "`--source`='ftp'" in result.output


def test_console_script_runs(mini_dir: Path) -> None:
    # the console script installed beside this interpreter (a venv need not be on PATH)
    beside = Path(sys.executable).parent / "spillover"
    exe = str(beside) if beside.exists() else shutil.which("spillover")
    if exe is None:
        pytest.skip("spillover console script not installed")
    proc = subprocess.run(
        [exe, "data", "info", "--bbq-dir", str(mini_dir)], capture_output=True, text=True
    )
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert err[0].startswith("error: ") and "SHA-256 mismatch" in proc.stderr
    assert "Traceback" not in proc.stderr


def _one_line_error(result: object) -> str:
    output = getattr(result, "output", "")
    assert getattr(result, "exit_code", None) == 1, output
    assert "Traceback" not in output
    tail = output[output.index("error:") :].strip()
    assert "\n" not in " ".join(tail.split("\n  "))  # one message (rich may wrap it)
    return " ".join(tail.split())


def test_os_errors_are_one_line(mini_dir: Path) -> None:
    result = invoke(
        [
            "data",
            "info",
            "--bbq-dir",
            str(mini_dir),
            "--allow-unverified",
            "--json",
            "/proc/no-such-dir/info.json",
        ]
    )
    assert "/proc/no-such-dir" in _one_line_error(result)


@pytest.mark.parametrize(
    ("exc", "needles"),
    [
        (PermissionError(13, "Permission denied", "/data/p.csv"), ["/data/p.csv", "permissions"]),
        (IsADirectoryError(21, "Is a directory", "/data/x"), ["/data/x", "not a folder"]),
        (
            OSError(18, "Invalid cross-device link", "/a", None, "/b"),
            ["/a -> /b", "Invalid cross-device link"],
        ),
        (
            UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"),
            ["not valid utf-8", "offset 2", "save it as UTF-8"],
        ),
        (RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
        (OverflowError("int too large to convert"), ["out of range", "int too large"]),
        (MemoryError(), ["ran out of memory"]),
    ],
)
def test_environment_errors_read_as_one_line(exc: BaseException, needles: list[str]) -> None:
    from spillover.cli._common import environment_error

    message = environment_error(exc)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_debug_shows_the_traceback(mini_dir: Path) -> None:
    result = invoke(["--debug", "data", "info", "--bbq-dir", str(mini_dir)])
    assert result.exit_code == 1 and result.exception is not None
    assert type(result.exception).__name__ == "DataError"


# --------------------------------------------------------------------------- off a terminal


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


def _eval_args(model: Path, mini_dir: Path, out: Path) -> list[str]:
    return [
        "eval", "--model", str(model), "--bbq-dir", str(mini_dir), "--allow-unverified",
        "--categories", "age,gender", "--all", "--batch-tokens", "256", "--device", "cpu",
        "--out", str(out),
    ]  # fmt: skip


def test_eval_progress_off_a_terminal_is_lines(
    tiny_model: Path, mini_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CliRunner is not a terminal: progress is plain lines (no bars), throttled by
    $SPILLOVER_PROGRESS_SECONDS: 0 prints every batch, the default 30 s only start and end."""
    import re

    monkeypatch.setenv("SPILLOVER_PROGRESS_SECONDS", "0")
    result = invoke(_eval_args(tiny_model, mini_dir, tmp_path / "a.parquet"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    started = [ln for ln in lines if ln.startswith("scoring: started")]
    assert len(started) == 1, result.output
    total = int(re.fullmatch(r"scoring: started \((\d+) rows\)", started[0])[1])  # type: ignore[index]
    steps = [ln for ln in lines if re.match(rf"scoring: \d+/{total} rows, \d+%, ", ln)]
    assert len(steps) >= 3, result.output  # several batches, a line each
    # the first line's window holds the start-up: no rate from it; every later line has one
    assert "ETA" not in steps[0] and "rows/s" not in steps[0], result.output
    assert all(re.search(r"rows/s, ETA \d", ln) for ln in steps[1:]), result.output
    assert any(re.fullmatch(rf"scoring: done in [\d.]+ s, {total} rows", ln) for ln in lines)
    scoring = [ln for ln in lines if ln.startswith("scoring")]
    assert len(scoring) == len(steps) + 2, result.output  # no rich bar, nothing else
    monkeypatch.delenv("SPILLOVER_PROGRESS_SECONDS")
    quiet = invoke(_eval_args(tiny_model, mini_dir, tmp_path / "b.parquet"))
    assert quiet.exit_code == 0, quiet.output
    progress = [ln for ln in quiet.output.splitlines() if ln.startswith("scoring:")]
    assert len(progress) == 2 and "started" in progress[0] and "done in" in progress[1]


def test_library_bars_and_deprecation_noise_stay_out_of_a_log(
    tiny_model: Path, mini_dir: Path, tmp_path: Path
) -> None:
    """A real process with its output piped, as a batch job sees it: spillover's lines only,
    no tqdm frames from transformers (weight loading) and no FutureWarning from PEFT code."""
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_BAR_ENV}
    env["SPILLOVER_PROGRESS_SECONDS"] = "0"
    args = _eval_args(tiny_model, mini_dir, tmp_path / "a.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "spillover", *args], capture_output=True, text=True, env=env,
        timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "scoring: started" in proc.stderr and "scoring: done in" in proc.stderr
    assert "it/s]" not in proc.stderr and "Loading weights" not in proc.stderr, proc.stderr
    assert "FutureWarning" not in proc.stderr


def test_bad_progress_interval_is_one_line(mini_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLOVER_PROGRESS_SECONDS", "soon")
    result = invoke(["data", "info", "--bbq-dir", str(mini_dir), "--allow-unverified"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: $SPILLOVER_PROGRESS_SECONDS='soon'; expected")


def test_download_progress_off_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from spillover.cli._common import download_progress

    monkeypatch.setenv("SPILLOVER_PROGRESS_SECONDS", "0")
    with download_progress() as progress:
        for done in (0, 400_000, 1_000_000):
            progress("Age.jsonl", done, 1_000_000)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "download Age.jsonl: started (1.0 MB)"
    assert lines[1].startswith("download Age.jsonl: 400.0 kB/1.0 MB, 40%, ")
    assert lines[-1].startswith("download Age.jsonl: done in ")


def test_run_summary_keeps_category_names_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Off a terminal the summary table takes its natural width: both intersectional
    categories print in full, not cut to `Race_x_…`."""
    import pandas as pd

    from spillover.cli.run import _print_summary
    from spillover.stats import CompareConfig, compare_runs

    rows = [
        {
            "category": cat, "example_id": k, "question_index": k % 8, "scenario": k % 8,
            "context_condition": "ambig" if k % 2 else "disambig",
            "question_polarity": "neg" if k % 4 < 2 else "nonneg", "label_type": "label",
            "label": 0, "target_loc": 1, "unknown_loc": 2, "subcategory": None,
        }
        for cat in ("Race_x_SES", "Race_x_gender")
        for k in range(80)
    ]  # fmt: skip
    items = pd.DataFrame(rows).astype({"target_loc": "Int64"})
    cfg = CompareConfig(bootstrap=0, cluster="item")
    comparison = compare_runs(items.assign(pred_index=0), items.assign(pred_index=1), cfg)
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "comparison.json").write_text(json.dumps(comparison.to_json()))
    _print_summary(tmp_path)
    out = capsys.readouterr().out
    assert "Race_x_SES" in out and "Race_x_gender" in out and "…" not in out
    table = [ln for ln in out.splitlines() if "Race_x_gender" in ln]
    assert table and all("degraded" in ln for ln in table)


def test_full_bbq_tests_take_a_verified_cache_only(
    mini_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $SPILLOVER_BBQ_DIR the full-BBQ tests use a cache whose twelve files all
    verify, and no other; tests never see the user's $SPILLOVER_BBQ_DIR."""
    import os

    from full_bbq import FULL_BBQ_DIR, verified_cache
    from spillover.data.sources import BBQ_SHA256, locate_files

    assert "SPILLOVER_BBQ_DIR" not in os.environ
    assert verified_cache(tmp_path / "empty") is None
    shutil.copytree(mini_dir, tmp_path / "mini" / "bbq")  # every file, none pinned
    assert verified_cache(tmp_path / "mini") is None
    if FULL_BBQ_DIR is None:
        return
    full = tmp_path / "full" / "bbq"
    for name, path in locate_files(FULL_BBQ_DIR, BBQ_SHA256).items():
        (full / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, full / name)
    assert verified_cache(tmp_path / "full") == full
    (full / "Age.jsonl").write_bytes((full / "Age.jsonl").read_bytes() + b"\n")
    assert verified_cache(tmp_path / "full") is None
