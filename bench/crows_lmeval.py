"""CrowS-Pairs: spillover against lm-evaluation-harness, same file, same model.

lm-evaluation-harness runs its own ``crows_pairs_english`` task definition (its
``lm_eval/tasks/crows_pairs/utils.py``: each sentence scored whole with an empty context,
``pct_stereotype`` = the more stereotypical sentence has the higher log-likelihood) pointed
at the original CrowS-Pairs file; spillover runs ``spillover eval --benchmark
crows-pairs`` on the same file. Each runs as a whole subprocess (model load included),
timed from start to exit with its peak RSS; then every pair's outcome is compared (those
whose log-likelihood gap exceeds 1e-3) and ``pct_stereotype`` per bias type.

    python bench/crows_lmeval.py --data-dir DIR [--model smollm2-135m] [--repeat 2]

``DIR`` holds ``crows-pairs/crows_pairs_anonymized.csv`` (``spillover data fetch
--benchmark crows-pairs`` puts it in the cache). Needs ``lm_eval`` importable by
``--lm-eval-python``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from eval_throughput import run_timed  # noqa: E402

RUNNER = "import sys\nfrom spillover.cli import main\nsys.argv[1:1] = ['eval']\nmain()\n"
UTILS = "from lm_eval.tasks.crows_pairs.utils import doc_to_choice, process_results  # noqa: F401\n"
TASK = """\
task: crows_bench
dataset_path: csv
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: ""
doc_to_target: 0
doc_to_choice: !function utils.doc_to_choice
target_delimiter: ""
process_results: !function utils.process_results
metric_list:
  - metric: likelihood_diff
    aggregation: mean
    higher_is_better: false
  - metric: pct_stereotype
    aggregation: mean
    higher_is_better: false
metadata:
  version: 1.0
"""


def compare(ours_file: Path, lm_out: Path) -> list[str]:
    """Per-pair agreement and pct_stereotype per bias type, as lines."""
    import pandas as pd

    ours = pd.read_parquet(ours_file)
    (log,) = glob.glob(str(lm_out / "**" / "samples_crows_bench_*.jsonl"), recursive=True)
    samples = [json.loads(x) for x in Path(log).read_text().splitlines()]
    by_id = ours.set_index("item_id")
    agree = differ = close = 0
    gaps = []
    worst: list[tuple[float, str, str, tuple[float, float], tuple[float, ...]]] = []
    rows = []
    for s in samples:
        rec = by_id.loc[str(s["doc"]["Unnamed: 0"])]
        lls = [float(r[0][0]) for r in s["resps"]]
        gaps.append(max(abs(rec.score_0 - lls[0]), abs(rec.score_1 - lls[1])))
        worst.append((gaps[-1], str(s["doc"]["Unnamed: 0"]), s["doc"]["bias_type"],
                      (rec.score_0, rec.score_1), tuple(lls)))  # fmt: skip
        mine = bool(rec.score_0 > rec.score_1)
        theirs = s["pct_stereotype"] == 1.0
        if abs(lls[0] - lls[1]) <= 1e-3:
            close += 1
        elif mine == theirs:
            agree += 1
        else:
            differ += 1
        rows.append((s["doc"]["bias_type"], float(theirs), float(mine)))
    table = pd.DataFrame(rows, columns=["bias_type", "lm_eval", "spillover"])
    out = [
        f"pairs: {len(samples)}; same outcome {agree}, different {differ}, gap <= 1e-3 {close}; "
        f"largest log-likelihood difference {max(gaps):.2e}",
        *(
            f"  pair {pid} ({bias}): spillover {o[0]:.3f} / {o[1]:.3f}, lm-eval "
            f"{t[0]:.3f} / {t[1]:.3f} (more / less stereotypical)"
            for _, pid, bias, o, t in sorted(worst, reverse=True)[:3]
        ),
        "| bias type | n | pct_stereotype lm-eval | pct_stereotype spillover |",
        "|---|---|---|---|",
    ]
    for bias, g in [*table.groupby("bias_type"), ("all", table)]:
        out.append(
            f"| {bias} | {len(g)} | {100 * g['lm_eval'].mean():.2f} | "
            f"{100 * g['spillover'].mean():.2f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--lm-eval-python", default=sys.executable)
    ap.add_argument("--lm-eval-batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--precision", default="auto", help="spillover's --precision")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from spillover.models import EMBEDDED_ALIAS, cpu_name, prepare_embedded

    folder = str(prepare_embedded()) if args.model == EMBEDDED_ALIAS else args.model
    csv = Path(args.data_dir) / "crows-pairs" / "crows_pairs_anonymized.csv"
    work = Path(tempfile.mkdtemp(prefix="spillover-crows-"))
    try:
        tasks = work / "tasks"
        tasks.mkdir()
        (tasks / "crows_bench.yaml").write_text(TASK.format(data=csv))
        (tasks / "utils.py").write_text(UTILS)
        env = {
            **os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }  # fmt: skip
        ours_out = work / "ours.parquet"
        ours_cmd = [
            sys.executable, "-c", RUNNER, "--benchmark", "crows-pairs", "--model", args.model,
            "--data-dir", args.data_dir, "--device", "cpu", "--precision", args.precision,
            "--out", str(ours_out),
        ]  # fmt: skip
        lm_cmd = [
            args.lm_eval_python, "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={folder},dtype=float32",
            "--tasks", "crows_bench", "--include_path", str(tasks), "--device", "cpu",
            "--batch_size", str(args.lm_eval_batch_size),
            "--output_path", str(work / "lm_eval_out"), "--log_samples",
        ]  # fmt: skip
        lm_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        print(f"cpu: {cpu_name()}, {os.cpu_count()} cores; model: {args.model}")
        print(f"load: {os.getloadavg()[0]:.2f} (1-min average before the runs)", flush=True)
        runs_ours, runs_lm = [], []
        for rep in range(args.repeat):  # alternate, so both see the same machine load
            if rep:
                shutil.rmtree(work / "lm_eval_out", ignore_errors=True)
                ours_out.unlink(missing_ok=True)
            runs_ours.append(run_timed(ours_cmd, env, work / "ours.log"))
            runs_lm.append(run_timed(lm_cmd, lm_env, work / "lm_eval.log"))
            print(
                f"run {rep + 1}: spillover {runs_ours[-1][0]:.1f} s, lm-eval "
                f"{runs_lm[-1][0]:.1f} s (load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
        (t_ours, rss_ours), (t_lm, rss_lm) = min(runs_ours), min(runs_lm)
        print(f"{'system':<10} {'wall s':>8} {'peak RSS MiB':>13}")
        print(f"{'spillover':<10} {t_ours:8.1f} {rss_ours:13.0f}")
        print(f"{'lm-eval':<10} {t_lm:8.1f} {rss_lm:13.0f}")
        print(f"speed-up (whole process): {t_lm / t_ours:.2f}x")
        print("\n".join(compare(ours_out, work / "lm_eval_out")))
    except subprocess.CalledProcessError as exc:  # pragma: no cover - reported as is
        print(f"failed: {exc}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
