"""CLI behaviour: fast start, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import invoke


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
