"""`spillover run`: config validation, planning, resumable end-to-end runs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from cli_runner import invoke
from spillover.data import ProbeSelection
from spillover.errors import ConfigError
from spillover.models import fast_bf16
from spillover.runs import RunConfig, run_study
from spillover.runs.config import ProbesConfig
from spillover.runs.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def write_cfg(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- configs


def test_default_study_is_written_once() -> None:
    """`RunConfig.default()` is the default study: the field defaults with DEFAULT_STUDY's
    benchmarks; the YAML file and the resolved config a run records read back equal to it."""
    default = RunConfig.default()
    assert default == dataclasses.replace(
        RunConfig(),
        benchmarks=("bbq", "winogender", "crows-pairs"),
        probes=ProbesConfig(items={"crows-pairs": ProbeSelection(per_attribute=40)}),
    )
    assert RunConfig().benchmarks == ("bbq",)  # a config without `benchmarks`: BBQ alone
    assert RunConfig.load(CONFIGS / "default.yaml") == default
    assert RunConfig.from_mapping(default.to_dict()) == default
    assert default.name == "default" and default.selection.per_stratum == 100
    sub = default.sub_runs()[0]
    assert (sub.model, sub.target, sub.method, sub.seed) == (
        "smollm2-135m",
        ("Gender_identity",),
        "dpo",
        0,
    )
    # the training steps come from the model's preset, the only place they are written
    assert default.align == {} and default.align_for(sub, "x").max_steps == 80


def test_a_yaml_item_choice_replaces_the_default_sample(tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("category,example_id\nAge,0\n", encoding="utf-8")
    listed = RunConfig.from_mapping({"eval": {"items": str(items)}})
    assert listed.selection.items == str(items) and listed.selection.per_stratum is None
    every = RunConfig.from_mapping({"eval": {"per_stratum": None}})
    assert every.selection.per_stratum is None and every.selection.items is None


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
    assert "download" not in result.output  # before BBQ is fetched (none is cached here)
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
    env = manifest["environment"]  # what a reader needs to interpret the timings
    assert env["cpu"] and env["cpu_capability"] and isinstance(env["cpu_bf16"], bool)
    assert env["cpu_bf16"] is fast_bf16("cpu")  # bf16 chosen on this CPU iff it has the ISA
    evals = {m["role"]: m for m in manifest["models"] if m["role"].startswith("eval-")}
    assert set(evals) == {"eval-base", "eval-aligned"}
    # precision follows the CPU: bf16-verified exactly where bf16 instructions exist
    assert {m["precision"] for m in evals.values()} == {
        "bf16-verified" if env["cpu_bf16"] else "model"
    }
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
    # a deleted figure (a broken link in the report) is made again, by the report stage only
    figure = sorted((out / "figures").glob("*.png"))[0]
    figure.unlink()
    mended: list[tuple[str, str]] = []
    run_study(cfg, out, on_event=lambda s, st, i: mended.append((s, st)))
    assert [s for s, st in mended if st == "done"] == ["report"] and figure.is_file()
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


# --------------------------------------------------------------------------- hardening


def _listing(root: Path) -> list[str]:
    """Every path under ``root`` (relative), to show nothing was written or deleted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _bomb(levels: int) -> str:
    """A "billion laughs" document: each anchor lists the previous one ten times."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder (``runs/`` lands here) with the caches outside it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SPILLOVER_CACHE", str(tmp_path / "cache"))
    return work


def _study_text(mini_dir: Path, body: str) -> str:
    return f"bbq:\n  dir: {mini_dir}\n  allow_unverified: true\n{body}"


def _one_line_error(result: Any, *needles: str) -> None:
    """Check exit code 1, one ``error:`` line holding every needle, no traceback."""
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# (YAML body after the 3-line bbq section, needles of the error line); line numbers count
# those 3 lines
REFUSED: list[tuple[str, str, tuple[str, ...]]] = [
    ("alias-bomb", _bomb(9), ("study.yaml:", "expands to more than 10,000 values")),
    ("recursive-alias", "eval: &e\n  x: *e\n", ("study.yaml:4:", "recursive alias")),
    ("deep", "a: " + "[" * 40 + "]" * 40 + "\n", ("study.yaml:4:", "nested deeper than 32")),
    ("too-deep-to-parse", "a: " + "[" * 3000 + "]" * 3000 + "\n", ("study.yaml", "too deeply")),
    ("nul", 'name: "a\\0b"\n', ("study.yaml:4:", "NUL character")),
    ("dup-top", "seed: 0\nseed: 1\n", ("study.yaml:5:", "duplicate key `seed` (first at line 4)")),
    (
        "dup-nested",
        "eval:\n  per_stratum: 2\n  per_stratum: 3\n",
        ("study.yaml:6:", "duplicate key `eval.per_stratum` (first at line 5)"),
    ),
    ("dup-section", "eval: {}\neval: {}\n", ("study.yaml:5:", "duplicate key `eval`")),
    ("name-abs", "name: /tmp/x\n", ("study.yaml:4:", "`name`='/tmp/x'", "plain folder name")),
    ("name-up", "name: ../../x\n", ("study.yaml:4:", "`name`='../../x'")),
    ("name-sep", "name: a/b\n", ("study.yaml:4:", "`name`='a/b'")),
    ("name-dots", "name: a..b\n", ("study.yaml:4:", "`name`='a..b'")),
    ("name-hidden", "name: .x\n", ("study.yaml:4:", "`name`='.x'")),
    ("name-empty", "name: ''\n", ("study.yaml:4:", "`name`=''")),
    ("name-space", "name: my study\n", ("study.yaml:4:", "`name`='my study'")),
    ("name-int", "name: 5\n", ("study.yaml:4:", "`name`=5")),
    ("name-long", f"name: {'n' * 101}\n", ("study.yaml:4:", "up to 100")),
    ("seed-negative", "seed: -1\n", ("study.yaml:4:", "`seed`=-1", "0..4294967295")),
    ("seed-big", "seed: 4294967296\n", ("study.yaml:4:", "`seed`=4294967296")),
    ("seed-list", "seed: [0, -1]\n", ("study.yaml:4:", "`seed`=-1")),
    ("seed-twice", "seed: [0, 0]\n", ("study.yaml:4:", "`seed` lists 0 twice")),
    ("device-tpu", "device: tpu\n", ("study.yaml:4:", "`device`='tpu'", "cuda:N")),
    ("device-index", "device: cuda:x\n", ("study.yaml:4:", "`device`='cuda:x'")),
    ("device-int", "device: 3\n", ("study.yaml:4:", "`device`=3")),
    ("target-empty", "target: []\n", ("study.yaml:4:", "`target` is an empty list")),
    (
        "target-twice",
        "target: [gender, Gender_identity]\n",
        ("`target` lists Gender_identity twice",),
    ),
    ("model-missing", "model: ./no-such-model\n", ("study.yaml:4:", "no such folder")),
    ("model-not-a-model", "model: .\n", ("study.yaml:4:", "not a model folder")),
    (
        "model-folders",
        "model: [org-a/m, org-b/m]\n",
        ("study.yaml:4:", "share the sub-run folder name `m`"),
    ),
    ("eval-list", "eval: []\n", ("study.yaml:4:", "`eval` must be a mapping")),
    ("align-int", "align: 3\n", ("study.yaml:4:", "`align` must be a mapping")),
    ("report-str", "report: html\n", ("study.yaml:4:", "`report` must be a mapping")),
    ("report-pdf", "report:\n  formats: [pdf]\n", ("study.yaml:5:", "`report.formats`=['pdf']")),
    ("report-dpi", "report:\n  dpi: 5000\n", ("study.yaml:5:", "`report.dpi`=5000")),
    (
        "batch-negative",
        "eval:\n  batch_tokens: -5\n",
        ("study.yaml:5:", "`eval.batch_tokens`=-5", "64..1048576"),
    ),
    ("batch-huge", "eval:\n  batch_tokens: 1000000000\n", ("study.yaml:5:", "64..1048576")),
    ("chunk-zero", "eval:\n  chunk_items: 0\n", ("study.yaml:5:", "`eval.chunk_items`=0")),
    ("limit-zero", "eval:\n  limit: 0\n", ("study.yaml:5:", "`eval.limit`=0")),
    (
        "bootstrap-huge",
        "compare:\n  bootstrap: 1000000000\n",
        ("study.yaml:5:", "`compare.bootstrap`=1000000000", "100,000"),
    ),
    ("bootstrap-string", "compare:\n  bootstrap: 1e9\n", ("study.yaml:5:", "`compare.bootstrap`")),
    (
        "permutation",
        "compare:\n  permutation: '021'\n",
        ("study.yaml:5:", "`compare.permutation`='021'", "scores 012"),
    ),
    ("heldout", "prefs:\n  heldout_frac: 1.5\n", ("study.yaml:5:", "`prefs.heldout_frac`=1.5")),
    ("align-type", "align:\n  max_steps: 1e3\n", ("study.yaml:5:", "`align.max_steps`", "'1e3'")),
    ("align-bool", "align:\n  merge: maybe\n", ("study.yaml:5:", "`align.merge`")),
    ("align-epochs", "align:\n  epochs: .inf\n", ("study.yaml:5:", "`align.epochs`=inf")),
    (
        "align-per-method",
        "method: [dpo, kto]\nalign:\n  batch_size: 1\n",
        ("study.yaml:6:", "`align.batch_size`=1 with method 'kto'", "method `kto`"),
    ),
    (
        "align-device",
        "device: cpu\nalign:\n  load_in_4bit: true\n",
        ("study.yaml:6:", "`align.load_in_4bit`=True with `device`='cpu'"),
    ),
]


@pytest.mark.parametrize(
    ("body", "needles"), [(b, n) for _, b, n in REFUSED], ids=[i for i, _, _ in REFUSED]
)
def test_bad_run_config_is_one_line_before_any_work(
    workdir: Path, mini_dir: Path, body: str, needles: tuple[str, ...]
) -> None:
    cfg = workdir / "study.yaml"
    cfg.write_text(_study_text(mini_dir, body), encoding="utf-8")
    before = _listing(workdir)
    for args in (["--dry-run"], []):
        start = time.perf_counter()
        result = invoke(["run", str(cfg), *args])
        assert time.perf_counter() - start < 5
        _one_line_error(result, *needles)
        assert _listing(workdir) == before  # no runs/<name>, no config.yaml


def test_alias_bomb_fails_fast(workdir: Path) -> None:
    cfg = workdir / "bomb.yaml"
    cfg.write_text(_bomb(9), encoding="utf-8")  # 10^9 values once expanded
    start = time.perf_counter()
    result = invoke(["run", str(cfg), "--dry-run"])
    assert time.perf_counter() - start < 1.0
    _one_line_error(result, "bomb.yaml:", "expands to more than 10,000 values")


def test_anchors_aliases_and_merge_keys_are_accepted(tmp_path: Path, mini_dir: Path) -> None:
    text = _study_text(
        mini_dir,
        "eval:\n  per_stratum: 2\n  contexts: &both [ambig, disambig]\n"
        "prefs:\n  contexts: *both\n"
        "report:\n  formats: [html]\n  figure_formats: [png]\n"
        "compare: {<<: {bootstrap: 100, alpha: 0.1}, alpha: 0.05}\n",
    )
    cfg = RunConfig.load(write_cfg(tmp_path, text))
    assert cfg.selection.per_stratum == 2 and cfg.report.formats == ("html",)
    assert cfg.prefs.contexts == ("ambig", "disambig")
    assert cfg.compare.bootstrap == 100 and cfg.compare.alpha == 0.05


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (lambda d: d / "missing.yaml", ("missing.yaml: config file not found",)),
        (lambda d: d, ("is a folder; expected a YAML config file",)),
        (
            lambda d: _write_bytes(d / "latin1.yaml", b"name: caf\xe9\n"),
            ("latin1.yaml:1: not UTF-8 text (byte 0xe9)",),
        ),
        (
            lambda d: _write_bytes(d / "big.yaml", b"# " + b"x" * (1 << 20) + b"\n"),
            ("big.yaml: config file larger than 1024 KiB",),
        ),
        (
            lambda d: _write_bytes(d / "top.yaml", b"- a\n- b\n"),
            ("top.yaml:1: expected a mapping of config keys",),
        ),
    ],
    ids=["missing", "folder", "not-utf8", "too-large", "top-list"],
)
def test_unreadable_config_file_is_one_line(
    workdir: Path, make: Any, needles: tuple[str, ...]
) -> None:
    path = make(workdir)
    before = _listing(workdir)
    for args in (["--dry-run"], []):
        _one_line_error(invoke(["run", str(path), *args]), *needles)
        assert _listing(workdir) == before


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_dry_run_writes_nothing_and_warns_of_unverified_data(workdir: Path, mini_dir: Path) -> None:
    cfg = workdir / "study.yaml"
    cfg.write_text(_study_text(mini_dir, "name: planned\n"), encoding="utf-8")
    before = _listing(workdir)
    result = invoke(["run", str(cfg), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "warning: UNVERIFIED BBQ data" in text and "dry run: nothing was executed" in text
    assert "-> runs/planned" in text
    assert _listing(workdir) == before


def test_dry_run_checks_force_and_out(workdir: Path, mini_dir: Path) -> None:
    cfg = workdir / "study.yaml"
    cfg.write_text(_study_text(mini_dir, ""), encoding="utf-8")
    _one_line_error(invoke(["run", str(cfg), "--dry-run", "--force", "trian"]), "`--force` trian")
    (workdir / "notes.txt").write_text("mine\n", encoding="utf-8")
    (workdir / "a-file").write_text("x", encoding="utf-8")
    before = _listing(workdir)
    for args in (["--dry-run"], []):
        _one_line_error(
            invoke(["run", str(cfg), "--out", str(workdir), *args]),
            f"{workdir}: the folder is not empty and holds no spillover run",
        )
        _one_line_error(
            invoke(["run", str(cfg), "--out", str(workdir / "a-file"), *args]),
            "a-file: the run directory is a file",
        )
        assert _listing(workdir) == before
    assert (workdir / "notes.txt").read_text(encoding="utf-8") == "mine\n"


def test_run_failing_at_the_first_stage_leaves_no_folder(workdir: Path, mini_dir: Path) -> None:
    model = workdir / "weightless"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    (workdir / "runs" / "earlier").mkdir(parents=True)  # another run's folder is left alone
    cfg = workdir / "study.yaml"
    body = f"name: broken\nmodel: {model}\neval:\n  per_stratum: 1\n"
    cfg.write_text(_study_text(mini_dir, body), encoding="utf-8")
    before = _listing(workdir)
    result = invoke(["run", str(cfg)])
    assert result.exit_code == 1 and "could not load model" in result.output
    assert "Traceback" not in result.output
    assert _listing(workdir) == before  # no runs/broken, no config.yaml
    # a new parent folder made by the run goes too
    result = invoke(["run", str(cfg), "--out", str(workdir / "new" / "run")])
    assert result.exit_code == 1 and _listing(workdir) == before


@pytest.mark.parametrize(
    "model",
    ["/models/.hidden", ".hidden", "org/" + "m" * 300, "../../etc", "a/b/..", "/"],
)
def test_sub_run_folders_are_plain_names(model: str) -> None:
    from spillover.data import CATEGORIES
    from spillover.runs.config import SubRun

    slug = SubRun(model, CATEGORIES, "sigmoid_norm", 2**32 - 1).slug
    assert "/" not in slug and not slug.startswith(".") and slug not in (".", "..")
    assert len(slug.encode("utf-8")) <= 255


def test_heldout_target_summary_carries_the_data_warnings(mini_dir: Path, tmp_path: Path) -> None:
    from spillover.align.prefs import SPLIT_FILE
    from spillover.data import load_bbq
    from spillover.rundir import PREDICTION_FILES
    from spillover.runs.study import load_items
    from spillover.stats import compare_files

    data = load_bbq(mini_dir, allow_unverified=True)
    assert data.warnings
    cfg = RunConfig.from_mapping(
        {"eval": {"per_stratum": 2}, "compare": {"bootstrap": 0}, "bbq": {"dir": str(mini_dir)}}
    )
    sub = cfg.sub_runs()[0]
    items = load_items(cfg, sub, data)
    preds = pd.DataFrame(
        {
            "category": [it.category for it in items],
            "example_id": [it.example_id for it in items],
            "pred_index": [it.label for it in items],
        }
    )
    for rel in PREDICTION_FILES.values():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        preds.to_parquet(tmp_path / rel)
    targets = {it.question_index for it in items if it.category == "Gender_identity"}
    split = {"heldout_templates": {"Gender_identity": sorted(targets)},
             "config": {"targets": ["Gender_identity"]}}  # fmt: skip
    (tmp_path / SPLIT_FILE).write_text(json.dumps(split), encoding="utf-8")
    from spillover.align import heldout_for

    _, held = heldout_for(tmp_path / SPLIT_FILE, sub.target)
    found = compare_files(
        tmp_path / PREDICTION_FILES["base"], tmp_path / PREDICTION_FILES["aligned"], data,
        cfg.compare_for(sub), heldout=held,
    )  # fmt: skip
    summary = found.heldout_target
    assert summary is not None
    assert summary["warnings"] == list(data.warnings)
    assert summary["n_items"] > 0
    assert summary["comparison"]["warnings"][: len(data.warnings)] == list(data.warnings)
    json.dumps(summary, allow_nan=False)


def test_dry_run_total_counts_every_sub_run_and_order(workdir: Path, mini_dir: Path) -> None:
    """2 methods x 2 seeds, 3 answer orders: the total is every sub-run's rows (items x
    orders), the base evaluation shared by the two methods of a seed counted once."""
    import re

    from spillover.runs.study import load_data, load_items

    body = (
        "name: sweep\nmodel: smollm2-135m\ntarget: gender\nmethod: [dpo, ipo]\nseed: [0, 1]\n"
        "eval:\n  per_stratum: 2\n  permutations: cyclic\nalign:\n  max_steps: 3\n"
    )
    path = workdir / "sweep.yaml"
    path.write_text(_study_text(mini_dir, body), encoding="utf-8")
    result = invoke(["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    cfg = RunConfig.load(path)
    data = load_data(cfg)
    n = {sub: len(load_items(cfg, sub, data)) for sub in cfg.sub_runs()}
    # by hand: every sub-run scores its aligned model; the base model once per seed
    aligned = sum(3 * k for k in n.values())
    base = sum(3 * n[sub] for sub in cfg.sub_runs() if sub.method == "dpo")
    lines = result.output.splitlines()
    (total,) = [ln for ln in lines if ln.strip().startswith("total over")]
    assert "total over 4 sub-run(s)" in total
    assert f"{aligned + base:,} BBQ rows scored in 6 evaluation(s) (4 aligned, 2 base; " in total
    assert "2 sub-run(s) reuse another's base evaluation" in total
    assert "12 training steps" in total
    subs = cfg.sub_runs()
    for sub in subs:  # each sub-run's line is followed by its compute
        at = next(i for i, ln in enumerate(lines) if ln.strip().startswith(f"{sub.slug}:"))
        line = lines[at + 1]
        assert line.strip().startswith(f"compute {sub.model}:")
        assert f"{3 * n[sub] * (1 if sub.method == 'ipo' else 2):,} BBQ rows scored" in line
        assert f"({n[sub]} items x 3 order(s)" in line
        if sub.method == "ipo":
            twin = next(s for s in subs if s.seed == sub.seed and s.method == "dpo")
            assert f"x 1 evaluation(s); base evaluation reused from {twin.slug})" in line
        else:
            assert "x 2 evaluation(s))" in line
    # the total's TFLOP is the sum of the sub-runs'
    per_sub = [
        float(m) for m in re.findall(r"compute smollm2-135m: ~([\d.]+) TFLOP", result.output)
    ]
    tflop = float(re.search(r"total over 4 sub-run\(s\): ~([\d.]+) TFLOP", total)[1])  # type: ignore[index]
    assert len(per_sub) == 4 and tflop == pytest.approx(sum(per_sub), abs=0.2)


class _Stop(Exception):
    pass


def test_run_resumes_an_interrupted_align_from_its_checkpoint(
    tiny_model_dir: Path, mini_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from spillover.align import train_adapter

    study = tiny_study(
        str(tiny_model_dir),
        mini_dir,
        align={"max_steps": 4, "batch_size": 2, "save_steps": 2, "eval_steps": 2},
    )
    cfg = RunConfig.from_mapping(study)
    out = tmp_path / "run"

    def stop_after_step_3(stage: str, status: str, info: Any) -> None:
        progress = stage == "align" and status == "progress" and set(info) == {"done", "total"}
        if progress and info["done"] == 3:
            raise _Stop

    with pytest.raises(_Stop):
        run_study(cfg, out, on_event=stop_after_step_3)
    assert (out / "align" / "adapter.checkpoints" / "checkpoint-2").is_dir()
    assert not (out / "align" / "adapter").exists()
    steps: list[int] = []

    def record(stage: str, status: str, info: Any) -> None:
        if stage == "align" and status == "progress":
            steps.append(int(info["done"]))

    run_study(cfg, out, on_event=record)
    assert min(steps) == 3 and max(steps) == 4  # steps 1-2 came from the checkpoint
    assert not (out / "align" / "adapter.checkpoints").exists()
    prov = json.loads((out / "align" / "adapter" / "provenance.json").read_text())
    assert prov["resumed_from_step"] == 2
    clean = tmp_path / "clean"
    train_adapter(out / "prefs", cfg.align_for(cfg.sub_runs()[0], clean))
    a = load_file(str(clean / "adapter_model.safetensors"))
    b = load_file(str(out / "align" / "adapter" / "adapter_model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    # the held-out evaluations are in the log and beside the training points in the report
    history = json.loads((out / "align" / "log_history.json").read_text())
    assert [h["step"] for h in history if "eval_rewards/accuracies" in h] == [2, 4]
    assert "evaluated during training" in (out / "report.md").read_text()


def test_align_trl_args_are_checked_and_keyed(tmp_path: Path, mini_dir: Path) -> None:
    bad = write_cfg(tmp_path, "align:\n  max_steps: 2\n  trl_args:\n    optimm: adafactor\n")
    pattern = r"study\.yaml:3: `align\.trl_args`: .*did you mean 'optim'"
    with pytest.raises(ConfigError, match=pattern):
        RunConfig.load(bad)
    reserved = write_cfg(tmp_path, "align:\n  trl_args: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match=r"set by spillover from `align\.learning_rate`"):
        RunConfig.load(reserved)
    good = RunConfig.from_mapping({"align": {"trl_args": {"per_device_eval_batch_size": "2"}}})
    acfg = good.align_for(good.sub_runs()[0], "x")
    assert acfg.trl_args == {"per_device_eval_batch_size": 2}
    assert RunConfig.from_mapping(good.to_dict()).align_for(good.sub_runs()[0], "x") == acfg
    # the align stage's cache key is the resolved config: another pass-through retrains
    off = write_cfg(tmp_path, "align:\n  eval_strategy: no\n  save_strategy: no\n")
    loaded = RunConfig.load(off)
    acfg_off = loaded.align_for(loaded.sub_runs()[0], "x")
    assert (acfg_off.eval_strategy, acfg_off.save_strategy) == ("no", "no")
    plain = RunConfig.from_mapping({"align": {}})
    assert plain.align_for(plain.sub_runs()[0], "x") == dataclasses.replace(acfg, trl_args={})


def test_by_hand_commands_equal_the_run(
    tiny_model_dir: Path, mini_dir: Path, tmp_path: Path
) -> None:
    """The README's by-hand block (prefs, eval --heldout-from, align, eval, compare
    --heldout-from, report) gives the run's items, adapter and comparison."""
    cfg = RunConfig.from_mapping(tiny_study(str(tiny_model_dir), mini_dir))
    run = tmp_path / "run"
    run_study(cfg, run)
    hand = tmp_path / "byhand"
    data = ["--bbq-dir", mini_dir, "--allow-unverified"]
    sample = ["--per-stratum", "2", "--seed", "0", "--chunk-items", "8"]
    model = ["--model", tiny_model_dir]
    steps = [
        ["prefs", "--target", "gender", "--seed", "0", "--out", hand / "pairs", *data],
        ["eval", *model, *sample, "--heldout-from", hand / "pairs", *data,
         "--out", hand / "base.parquet"],
        ["align", *model, "--pairs", hand / "pairs", "--method", "dpo", "--max-steps", "2",
         "--batch-size", "2", "--seed", "0", "--out", hand / "adapter"],
        ["eval", *model, "--adapter", hand / "adapter", *sample, "--heldout-from",
         hand / "pairs", *data, "--out", hand / "aligned.parquet"],
        ["compare", hand / "base.parquet", hand / "aligned.parquet", "--heldout-from",
         hand / "pairs", "--bootstrap", "100", *data, "--json", hand / "comparison.json"],
        ["report", hand],
    ]  # fmt: skip
    for args in steps:
        result = invoke(args)
        assert result.exit_code == 0, (args[0], result.output)
    keys = ["category", "example_id", "pred_index"]
    for role in ("base", "aligned"):
        ran = pd.read_parquet(run / f"eval/{role}/predictions.parquet")[keys]
        made = pd.read_parquet(hand / f"{role}.parquet")[keys]
        pd.testing.assert_frame_equal(
            ran.sort_values(keys[:2]).reset_index(drop=True),
            made.sort_values(keys[:2]).reset_index(drop=True),
        )
    ran = json.loads((run / "stats/comparison.json").read_text())
    made = json.loads((hand / "comparison.json").read_text())
    assert made["strata"] == ran["strata"] and made["config"] == ran["config"]
    assert made["summary"] == ran["summary"]
    assert (hand / "report.html").is_file() and (hand / "report.md").is_file()
    # the targets of --heldout-from are the comparison's; a mismatch is one line
    bad = invoke(["compare", hand / "base.parquet", hand / "aligned.parquet", "--heldout-from",
                  hand / "pairs", "--targets", "race", *data])  # fmt: skip
    assert bad.exit_code == 1 and "were made for Gender_identity" in bad.output


def test_tiny_target_sweep_draws_the_spillover_map(
    tiny_model_dir: Path, mini_dir: Path, tmp_path: Path
) -> None:
    """A sweep over a single and a multi-attribute target (configs/map.yaml in small)."""
    study = tiny_study(str(tiny_model_dir), mini_dir, target=["gender", "gender+race"])
    study["report"] = {"figure_formats": ["png", "svg"]}
    cfg = RunConfig.from_mapping(study)
    sweep = tmp_path / "sweep"
    dirs = run_study(cfg, sweep)
    assert len(dirs) == 2
    for ext in ("png", "svg"):
        assert (sweep / "figures" / f"spillover_map.{ext}").stat().st_size > 1000
    md = (sweep / "report.md").read_text()
    section = md[md.index("## Spillover map") :]
    rows = [ln for ln in section.splitlines() if ln.startswith("| Gender")]
    # one row per target x evaluated attribute x context, both targets present
    labels = {ln.split("|")[1].strip() for ln in rows}
    assert {"Gender_identity", "Gender_identity+Race_ethnicity"} <= {
        lb.replace("\\_", "_") for lb in labels
    }, rows[:3]
    assert 'id="fig-spillover_map"' in (sweep / "report.html").read_text()


@pytest.mark.parametrize(
    ("bf16", "expected"),
    [
        (True, "about 6 min at 0.43 TFLOP/s (2 CPU cores with bf16 instructions"),
        (False, "about 10 min to 16 min at 0.15-0.24 TFLOP/s (2 CPU cores in float32"),
    ],
)
def test_plan_cpu_time_follows_the_cpus_bf16_instructions(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: str
) -> None:
    """The default study's FLOP count (145.6 TFLOP) gives back its measured stage times:
    5.6 min with bf16 instructions, 10-16 min in float32 (docs/benchmarks.md)."""
    from spillover.runs import plan

    monkeypatch.setattr(plan, "_cpu_bf16", lambda: bf16)
    line = plan._times(145.6e12)
    assert line.startswith(expected), line
    assert line.endswith("0.4 s at 400 TFLOP/s (one H100/H200, bf16)")


# --------------------------------------------------------------------------- beyond BBQ

PROBES_MINI = Path(__file__).parent / "fixtures" / "probes_mini"


def test_a_study_on_all_five_benchmarks_runs_and_resumes(
    tiny_model_dir: Path, mini_dir: Path, tmp_path: Path
) -> None:
    """`benchmarks:` adds a base and an aligned evaluation per likelihood probe, compared
    in one family beside BBQ (stats/probes.json); a second run skips every stage."""
    from spillover.predictions.parquet import read_metadata
    from spillover.runs.stages import stages_for
    from spillover.stats import ProbeComparison

    study = tiny_study(
        str(tiny_model_dir), mini_dir,
        benchmarks=["bbq", "crows-pairs", "stereoset", "winobias", "winogender"],
        probes={"dir": str(PROBES_MINI), "allow_unverified": True,
                "stereoset": {"groups": ["intrasentence"]}},
    )  # fmt: skip
    cfg = RunConfig.from_mapping(study)
    names = [s.name for s in stages_for(cfg)]
    assert names[:5] == [
        "eval-base", "eval-base-crows-pairs", "eval-base-stereoset", "eval-base-winobias",
        "eval-base-winogender",
    ]  # fmt: skip
    events: list[tuple[str, str]] = []
    out = tmp_path / "run"
    run_study(cfg, out, on_event=lambda stage, status, info: events.append((stage, status)))
    assert [s for s, st in events if st == "done"] == names
    for bench in ("crows-pairs", "stereoset", "winobias", "winogender"):
        meta = read_metadata(out / f"eval/{bench}/aligned/predictions.parquet")
        assert meta["benchmark"] == bench and meta["model"]["adapter"]
    probes = ProbeComparison.from_json(
        json.loads((out / "stats/probes.json").read_text()), "probes.json"
    )
    assert {r.benchmark for r in probes.rows} == {
        "crows-pairs",
        "stereoset",
        "winobias",
        "winogender",
    }
    comparison = json.loads((out / "stats/comparison.json").read_text())
    assert comparison["strata"]  # BBQ's comparison as before
    md = (out / "report.md").read_text()
    section = md.split("## Beyond BBQ's format", 1)[1].split("\n## ", 1)[0].replace("\\_", "_")
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert rows[0].startswith("| attribute | BBQ ambiguous: Δ accuracy |")
    assert "CrowS-Pairs: Δ pct_stereotype" in rows[0] and "StereoSet: Δ SS" in rows[0]
    body = {ln.split(" | ")[0][2:]: ln for ln in rows[1:]}
    assert "Gender_identity (target)" in body and "Profession" in body  # StereoSet's own
    assert all(ln.rstrip(" |").endswith(("none detected", "format: changed on BBQ only",
               "content: changed on BBQ and on another format",
               "changed on another format only")) for ln in body.values())  # fmt: skip
    assert "Blodgett et al. (2021" in section and "How to read this" in section
    assert 'id="beyond"' in (out / "report.html").read_text()
    events.clear()
    run_study(cfg, out, on_event=lambda stage, status, info: events.append((stage, status)))
    assert {st for _, st in events if st in ("done", "skip")} == {"skip"}


def test_benchmarks_are_checked_in_the_run_config(tmp_path: Path) -> None:
    bad = write_cfg(tmp_path, "benchmarks: [bbq, crowspairs, winogendr]\n")
    with pytest.raises(
        ConfigError,
        match=r"study\.yaml:1: `benchmarks`: unknown benchmark 'winogendr' \(did you mean 'winogender'\?\)",
    ):
        RunConfig.load(bad)
    with pytest.raises(ConfigError, match=r"`benchmarks` leaves out bbq"):
        RunConfig.from_mapping({"benchmarks": ["crows-pairs"]})
    with pytest.raises(ConfigError, match=r"`probes.stereoset.seed` is set by the run"):
        RunConfig.from_mapping({"probes": {"stereoset": {"seed": 3}}})
    ok = RunConfig.from_mapping({"benchmarks": "bbq"})
    assert ok.benchmarks == ("bbq",)


def test_dry_run_lists_the_probe_stages_and_counts_their_items(
    workdir: Path, mini_dir: Path
) -> None:
    """The plan shows each probe benchmark's evaluation stages and the items both models
    score, the counts a run's stages would score (the selection applied by hand)."""
    from spillover.data import ProbeSelection, load_benchmark

    body = (
        "model: smollm2-135m\ntarget: gender\nbenchmarks: [bbq, winogender, crows-pairs]\n"
        f"probes:\n  dir: {PROBES_MINI}\n  allow_unverified: true\n"
        "  crows-pairs:\n    per_attribute: 2\neval:\n  per_stratum: 2\n"
    )
    path = workdir / "probes.yaml"
    path.write_text(_study_text(mini_dir, body), encoding="utf-8")
    result = invoke(["run", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    wino = load_benchmark("winogender", PROBES_MINI, allow_unverified=True).items
    crows = load_benchmark("crows-pairs", PROBES_MINI, allow_unverified=True).items
    n_crows = len(ProbeSelection(per_attribute=2).apply(crows))
    assert 0 < n_crows < len(crows)
    assert (
        f"likelihood probes, items x 2 models: winogender {len(wino)}, crows-pairs {n_crows}"
        in result.output
    )
    assert (
        "stages: eval-base -> eval-base-winogender -> eval-base-crows-pairs -> prefs -> align "
        "-> eval-aligned -> eval-aligned-winogender -> eval-aligned-crows-pairs -> compare"
        in result.output
    )
