"""`spillover run`: config validation, planning, resumable end-to-end runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cli_runner import invoke
from spillover.errors import ConfigError
from spillover.runs import STAGES, RunConfig, run_study

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def write_cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- configs


def test_default_study_matches_configs_default() -> None:
    assert RunConfig.load(CONFIGS / "default.yaml") == RunConfig.default()


def test_shipped_configs_validate() -> None:
    paper = RunConfig.load(CONFIGS / "paper.yaml")
    assert paper.models == ("mistral-7b", "llama-3.1-8b", "qwen-2.5-7b")
    assert paper.targets == (("Gender_identity",),) and paper.methods == ("dpo",)
    assert paper.selection.per_stratum is None and paper.compare.correction == "holm"
    assert len(paper.sub_runs()) == 3
    beyond = RunConfig.load(CONFIGS / "beyond.yaml")
    assert (("Gender_identity", "Race_ethnicity") in beyond.targets) and len(
        beyond.sub_runs()
    ) == 27
    assert beyond.eval.permutations == "cyclic" and beyond.compare.cluster == "scenario"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "model: smollm2-135m\nevl:\n  per_stratum: 3\n",
            r"study\.yaml:2: unknown key `evl` \(did you mean `eval`\?\)",
        ),
        (
            "eval:\n  per_stratum: 3\n  prompt_fromat: lm-eval\n",
            r"study\.yaml:3: unknown key `eval\.prompt_fromat` \(did you mean `prompt_format`\?\)",
        ),
        (
            "eval:\n  per_stratum: many\n",
            r"study\.yaml:2: `eval\.per_stratum`: Input should be a valid integer.*'many'",
        ),
        ("model: mistral-8b\n", r"study\.yaml:1: unknown model preset `mistral-8b`"),
        (
            "target: [gender, religon]\n",
            r"study\.yaml:1: `target`: unknown BBQ category 'religon' \(did you mean 'Religion'\?\)",
        ),
        ("method: dpoo\n", r"study\.yaml:1: unknown method `dpoo` \(did you mean `dpo`\?\)"),
        (
            "align:\n  lora_rank: 8\n",
            r"study\.yaml:2: unknown key `align\.lora_rank` \(did you mean `lora_r`\?\)",
        ),
        (
            "align:\n  method: ipo\n",
            r"study\.yaml:2: `align\.method` is set by the run \(use the top-level `method` key\)",
        ),
        ("compare:\n  correction: fdr\n", r"study\.yaml:2: `compare\.correction`='fdr'"),
        (
            "eval:\n  per_stratum: 3\n  items: x.csv\n",
            r"study\.yaml:1: `eval`: give either `per_stratum` or `items`",
        ),
        ("seed: [0, x]\n", r"study\.yaml:1: `seed` must be an integer"),
        (
            "compare:\n  bootstrap: 50\n",
            r"study\.yaml:2: `compare\.bootstrap`=50; expected 0 \(off\) or at least 100",
        ),
        ("model: [a\n", r"study\.yaml:2: invalid YAML"),
        (
            "eval:\n  backend: vlm\n",
            r"study\.yaml:2: `eval\.backend`='vlm'; expected one of hf, vllm \(did you mean 'vllm'\?\)",
        ),
        (
            "eval:\n  backend: vllm\n  precision: bf16-verified\n",
            r"study\.yaml:3: `eval\.precision`='bf16-verified' needs `eval\.backend`: hf",
        ),
        (
            "eval:\n  verify_margin: -1\n",
            r"study\.yaml:2: `eval\.verify_margin`=-1\.0; expected >= 0",
        ),
        (
            "eval:\n  tensor_parallel_size: 2\n",
            r"study\.yaml:2: `eval\.tensor_parallel_size`=2; expected 1, or >= 1 with",
        ),
    ],
    ids=[
        "top",
        "nested",
        "type",
        "preset",
        "attribute",
        "method",
        "align-key",
        "align-reserved",
        "choice",
        "cross-field",
        "seed",
        "bootstrap",
        "yaml",
        "backend",
        "backend-precision",
        "verify-margin",
        "tensor-parallel",
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.load(write_cfg(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "eval: [1, 2]\n",
            r"study\.yaml:1: `eval` must be a mapping of keys \(found list \[1, 2\]\)",
        ),
        ("align: 5\n", r"study\.yaml:1: `align` must be a mapping of keys \(found int 5\)"),
        ("seed: 0\ncompare: holm\n", r"study\.yaml:2: `compare` must be a mapping of keys"),
    ],
    ids=["eval-list", "align-int", "compare-str"],
)
def test_section_that_is_not_a_mapping_is_one_line(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.load(write_cfg(tmp_path, text))
    out = tmp_path / "run"
    result = invoke(["run", str(write_cfg(tmp_path, text)), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_invalid_config_fails_before_any_work(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "eval:\n  per_stratumm: 3\n")
    out = tmp_path / "run"
    result = invoke(["run", str(cfg), "--out", str(out)])
    assert result.exit_code == 1
    assert "unknown key `eval.per_stratumm`" in result.output and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("vllm") is not None, reason="vLLM is installed here"
)
def test_vllm_backend_without_vllm_fails_before_any_work(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path, "eval:\n  backend: vllm\n")
    out = tmp_path / "run"
    result = invoke(["run", str(cfg), "--out", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "pip install 'spillover[vllm]'" in " ".join(result.output.split())
    assert not out.exists()


def test_bad_force_stage(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`--force` trian: unknown stage"):
        run_study(RunConfig.default(), tmp_path / "run", force=["trian"])


def test_sub_run_slugs_are_distinct() -> None:
    beyond = RunConfig.load(CONFIGS / "beyond.yaml")
    slugs = [s.slug for s in beyond.sub_runs()]
    assert len(set(slugs)) == len(slugs)
    assert "smollm2-135m__Gender_identity+Race_ethnicity__kto__s2" in slugs


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = RunConfig.load(CONFIGS / "beyond.yaml")
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")
    assert RunConfig.load(path) == cfg


@pytest.mark.fulldata
def test_paper_dry_run(full_bbq_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "paper"
    result = invoke(
        [
            "run",
            str(CONFIGS / "paper.yaml"),
            "--dry-run",
            "--bbq-dir",
            str(full_bbq_dir),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert (
        "3 sub-run(s)" in text
        and "eval-base -> prefs -> align -> eval-aligned -> compare -> report" in text
    )
    # nine categories, every item: 58,492 minus Race_x_SES and Race_x_gender
    assert "eval 31372 items x 2 models" in text
    assert "compute mistral-7b:" in text and "TFLOP" in text
    assert not out.exists()


# --------------------------------------------------------------------------- end to end


def tiny_study(model: str, bbq: Path, **extra: object) -> dict[str, object]:
    study: dict[str, object] = {
        "name": "tiny",
        "model": model,
        "target": "gender",
        "method": "dpo",
        "seed": 0,
        "bbq": {"dir": str(bbq), "allow_unverified": True},
        "eval": {"per_stratum": 2, "chunk_items": 8},
        "align": {"max_steps": 2, "batch_size": 2},
        "compare": {"bootstrap": 100},
    }
    study.update(extra)
    return study


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-model"))


def test_tiny_run_end_to_end_and_resume(
    tiny_model_dir: Path, mini_dir: Path, tmp_path: Path
) -> None:
    cfg = RunConfig.from_mapping(tiny_study(str(tiny_model_dir), mini_dir))
    events: list[tuple[str, str]] = []
    out = tmp_path / "run"
    run_study(cfg, out, on_event=lambda stage, status, info: events.append((stage, status)))
    for rel in (
        "config.yaml",
        "manifest.json",
        "eval/base/predictions.parquet",
        "eval/aligned/predictions.parquet",
        "prefs/train.parquet",
        "prefs/split.json",
        "align/adapter/adapter_config.json",
        "align/log_history.json",
        "stats/comparison.json",
        "stats/heldout_target.json",
        "report.html",
        "report.md",
    ):
        assert (out / rel).is_file(), rel
    assert [s for s, st in events if st == "done"] == list(STAGES)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["timings"]) == set(STAGES)
    assert manifest["bbq"]["verified"] is False and "UNVERIFIED" in manifest["warnings"][0]
    assert manifest["libraries"]["torch"] and manifest["sub_run"]["target"] == ["Gender_identity"]
    evals = {m["role"]: m for m in manifest["models"] if m["role"].startswith("eval-")}
    assert set(evals) == {"eval-base", "eval-aligned"}
    assert all(m["precision"] in ("model", "bf16-verified") for m in evals.values())
    for m in evals.values():  # close calls are rescored only after a bf16 pass
        limit = manifest["n_eval_items"] if m["precision"] == "bf16-verified" else 0
        assert isinstance(m["rescored_full_precision"], int)
        assert 0 <= m["rescored_full_precision"] <= limit
    assert evals["eval-aligned"]["adapter"] and not evals["eval-base"]["adapter"]
    comparison = json.loads((out / "stats/comparison.json").read_text())
    assert any("UNVERIFIED" in w for w in comparison["warnings"])
    cats = {s["category"] for s in comparison["strata"]}
    assert len(cats - {"all"}) == 11
    # the sample draws the target's items from held-out scenarios only
    split = json.loads((out / "prefs/split.json").read_text())
    held = {int(t) for t in split["heldout_templates"]["Gender_identity"]}
    base = pd.read_parquet(out / "eval/base/predictions.parquet")
    from spillover.data import load_bbq

    data = load_bbq(mini_dir, allow_unverified=True)
    gender = [data.get(c, int(e)) for c, e in zip(base.category, base.example_id, strict=True)]
    gender = [it for it in gender if it.category == "Gender_identity"]
    assert gender and all(it.question_index in held for it in gender)
    target = json.loads((out / "stats/heldout_target.json").read_text())
    assert target["n_items"] == len(gender) and target["n_in_sample"] == 0
    mix = target["answer_mix"]
    assert mix["n"] == len(gender) and isinstance(mix["collapsed"], bool)
    assert sum(mix["aligned"]["position_share"]) == pytest.approx(1.0)
    assert "What the alignment did" in (out / "report.md").read_text()
    # a second run finds every stage complete
    again: list[tuple[str, str]] = []
    run_study(cfg, out, on_event=lambda stage, status, info: again.append((stage, status)))
    assert [st for _, st in again] == ["skip"] * len(STAGES)
    assert json.loads((out / "manifest.json").read_text())["models"] == manifest["models"]
    # --force compare reruns compare and report only, with the same result
    forced: list[tuple[str, str]] = []
    run_study(cfg, out, force=["compare"], on_event=lambda s, st, i: forced.append((s, st)))
    assert [s for s, st in forced if st == "done"] == ["compare", "report"]
    assert json.loads((out / "stats/comparison.json").read_text()) == comparison


def test_tiny_sweep_shares_base_eval(tiny_model_dir: Path, mini_dir: Path, tmp_path: Path) -> None:
    cfg = RunConfig.from_mapping(tiny_study(str(tiny_model_dir), mini_dir, method=["dpo", "ipo"]))
    events: list[tuple[str, str]] = []
    dirs = run_study(cfg, tmp_path / "sweep", on_event=lambda s, st, i: events.append((s, st)))
    assert [d.name for d in dirs] == [s.slug for s in cfg.sub_runs()]
    # the second sub-run reused the first one's base predictions
    assert ("eval-base", "skip") in events
    a, b = (d / "eval/base/predictions.parquet" for d in dirs)
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "sweep" / "report.html").is_file()


def test_tiny_run_with_cyclic_permutations(
    tiny_model_dir: Path, mini_dir: Path, tmp_path: Path
) -> None:
    """Permutation ids stay "012"/"120"/"201" from the evaluator to the report."""
    study = tiny_study(str(tiny_model_dir), mini_dir)
    study["eval"] = {"per_stratum": 2, "chunk_items": 8, "permutations": "cyclic"}
    out = tmp_path / "perm"
    run_study(RunConfig.from_mapping(study), out)
    base = pd.read_parquet(out / "eval/base/predictions.parquet")
    assert sorted(base["permutation"].unique()) == ["012", "120", "201"]
    comparison = json.loads((out / "stats/comparison.json").read_text())
    assert any("identity permutation '012'" in w for w in comparison["warnings"])
    n_items = json.loads((out / "manifest.json").read_text())["n_eval_items"]
    overall = next(
        s
        for s in comparison["strata"]
        if s["category"] == "all" and s["context_condition"] == "all"
    )
    assert overall["n"] == n_items and len(base) == 3 * n_items
    html = (out / "report.html").read_text()
    assert "order 120" in html or "Answer position" in html


def _run_cli(cfg_path: Path, out: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "spillover", "run", str(cfg_path), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


@pytest.mark.slow
def test_sigkill_during_aligned_eval_resumes_to_identical_comparison(
    mini_dir: Path, tmp_path: Path
) -> None:
    study = tiny_study("smollm2-135m", mini_dir)
    study["eval"] = {"per_stratum": 2, "chunk_items": 2}
    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(study), encoding="utf-8")

    clean = tmp_path / "clean"
    proc = _run_cli(cfg_path, clean)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-2000:]

    killed = tmp_path / "killed"
    proc = _run_cli(cfg_path, killed)
    shards = killed / "eval" / "aligned" / "predictions.parquet.shards"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if shards.is_dir() and len(list(shards.glob("*.parquet"))) >= 2:
            break
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "stats" / "comparison.json").exists()
    proc = _run_cli(cfg_path, killed)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-2000:]
    a = json.loads((clean / "stats" / "comparison.json").read_text())
    b = json.loads((killed / "stats" / "comparison.json").read_text())
    assert a == b
    # same rows and values (the file metadata differ only in the adapter's path)
    pd.testing.assert_frame_equal(
        pd.read_parquet(clean / "eval/aligned/predictions.parquet").drop(columns=["adapter"]),
        pd.read_parquet(killed / "eval/aligned/predictions.parquet").drop(columns=["adapter"]),
    )
