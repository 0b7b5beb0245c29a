"""bench/gpu_check.py on the CPU with a 2-layer model: every section runs and reports numbers
(the correctness checks and the timings), a failing section is reported while the others
run, and the time budget is kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from spillover.align import PrefsConfig, build_pairs
from spillover.data import load_bbq
from tiny_models import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
SMOKE = [
    "--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1",
    "--batch-size", "2", "--items", "16", "--check-items", "4",
]  # fmt: skip

sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GPU check's inputs from the mini BBQ fixture and the tiny test tokenizer."""
    mini = Path(__file__).parent / "fixtures" / "bbq_mini"
    out = tmp_path_factory.mktemp("gpu-inputs")
    data = load_bbq(mini, allow_unverified=True)
    with open(out / "items.jsonl", "w", encoding="utf-8") as fh:
        for it in data.items[:16]:
            rec = {"context": it.context, "question": it.question, "answers": list(it.answers)}
            fh.write(json.dumps(rec) + "\n")
    make_tokenizer().save_pretrained(out / "tokenizer")
    pairs = build_pairs(data.items, PrefsConfig(targets=("gender",), seed=0))
    assert gpu_check.write_pairs(out, pd.DataFrame([p.to_row() for p in pairs.train])) >= 6
    return out


def run(inputs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--inputs", str(inputs), *SMOKE, "--out", str(out), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


TIMED = ("ours", "trl-tuned", "eval")


def test_the_cpu_smoke_run_reports_every_timed_section_with_numbers(
    inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "check.json"
    proc = run(inputs, out, "--sections", ",".join(TIMED), "--budget", "240", "--reserve", "30")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("versions: torch ")  # printed before anything runs
    report = json.loads(out.read_text())
    assert report["sections_run"] == list(TIMED)
    sections = report["sections"]
    for arm in ("ours", "trl-tuned"):
        res = sections[arm]
        assert not res.get("error"), res
        assert res["steps"] == 3 and res["timed_steps"] == 2
        assert res["steps_per_s"] > 0 and res["peak_rss_mib"] > 0 and res["setup_s"] > 0
        assert "peak_gpu_gib" not in res  # no GPU: peak RSS only
        assert res["max_length"] == sections["ours"]["max_length"]  # the same max_length
    assert sections["ours"]["adapter_saved"] is True
    assert sections["ours"]["trainer"] == "SpilloverDPOTrainer"
    assert sections["trl-tuned"]["trainer"] == "DPOTrainer"
    ev = sections["eval"]
    assert not ev.get("error"), ev
    assert ev["check_passed"] and ev["items"] == 16 and ev["items_per_s"] > 0
    assert ev["max_packed_vs_fp32"] < 1e-3  # float32 on the CPU: the check is exact
    assert report["compare"]["speedup"] > 0
    assert ev["batch_tokens"] == 4096 and ev["max_row_tokens"] == "scorer default"  # the CLI's
    printed = proc.stdout[proc.stdout.index(report["title"]) :]
    for name in (*TIMED, "compare"):
        assert f"\n{name} " in printed
    assert "steps/s (after warm-up)" in printed and "items/s" in printed
    assert "ERROR" not in printed


def test_a_failing_section_is_reported_and_the_others_still_run(
    inputs: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "inputs"
    broken.mkdir()
    for name in ("items.jsonl", "tokenizer"):
        (broken / name).symlink_to(inputs / name)  # no pairs.parquet: the DPO arm fails
    out = tmp_path / "check.json"
    proc = run(broken, out, "--sections", "ours,eval", "--budget", "200", "--reserve", "30")
    assert proc.returncode == 1
    assert "failed: ours" in proc.stderr
    report = json.loads(out.read_text())
    assert "pairs.parquet" in report["sections"]["ours"]["error"]
    assert report["sections"]["eval"]["items_per_s"] > 0
    lines = proc.stdout.splitlines()
    assert any(x.split()[:2] == ["ours", "ERROR"] and "pairs.parquet" in x for x in lines)


def test_a_spent_budget_runs_nothing_and_says_so(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = run(inputs, out, "--budget", "0")
    assert proc.returncode == 1
    report = json.loads(out.read_text())
    for name in gpu_check.SECTIONS:
        assert report["sections"][name]["error"] == "not run: the --budget was spent"


@pytest.mark.slow
def test_the_correctness_sections_run_before_the_timings_on_the_cpu(
    inputs: Path, tmp_path: Path
) -> None:
    """Step-1 log-probabilities equal TRL's, train_adapter resumes with the preset's gradient
    checkpointing, and one-process FSDP launches save an adapter, with and without --adapter."""
    assert gpu_check.SECTIONS[:3] == ("logprobs", "train", "fsdp")
    out = tmp_path / "check.json"
    proc = run(inputs, out, "--sections", "logprobs,train,fsdp", "--budget", "500")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    lp = sections["logprobs"]
    assert lp["logps_agree"] is True and lp["diff logps/chosen"] < 1e-3
    assert lp["ours"]["logps/chosen"] < 0 and lp["ours"]["loss"] == pytest.approx(0.693, abs=1e-3)
    tr = sections["train"]
    assert (tr["resumed_step"], tr["steps"], tr["recorded_checkpointing"]) == (1, 3, True)
    assert tr["resume_vs_whole_max_diff"] < 1e-5
    fs = sections["fsdp"]
    assert fs["new_adapter_saved"] is True and fs["adapter_adapter_saved"] is True


def test_the_wheels_are_pinned_to_the_installed_versions() -> None:
    from importlib import metadata

    pins = gpu_check.pinned_wheels()
    assert f"trl=={metadata.version('trl')}" in pins
    assert {p.split("==")[0] for p in pins} >= {
        "transformers", "accelerate", "peft", "datasets", "trl",
    }  # fmt: skip
