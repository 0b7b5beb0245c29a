"""Throughput and agreement of ``spillover eval`` against lm-evaluation-harness.

Both systems score the same seeded stratified BBQ sample (every category x
context) with the same model, prompt (``"{context}\\n\\nQ: {question}\\nA:"``)
and the three BBQ answers as choices. Each runs as a whole subprocess (model
load included) and is timed from start to exit; peak RSS comes from the
child's own ``wait4`` resource usage. lm-evaluation-harness reads a generated
task YAML (``--include_path``) over a local JSONL of the chosen items and logs
per-sample log-likelihoods (``--log_samples``), which are compared with ours.

Example::

    python bench/eval_throughput.py --per-stratum 23 \\
        --lm-eval-python /path/to/lmeval-venv/bin/python --bf16

Needs BBQ (``--bbq-dir`` or ``$SPILLOVER_BBQ_DIR``) and an ``lm_eval``
installation (default: the ``lm_eval`` package importable by
``--lm-eval-python``, itself defaulting to ``python`` on PATH).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RUNNER = "import sys\nfrom spillover.cli import main\nsys.argv[1:1] = ['eval']\nmain()\n"

TASK_YAML = """\
task: spillover_bbq_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\n\\nQ: {{{{question}}}}\\nA:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def run_timed(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float]:
    """Run a command to completion; return (wall seconds, peak RSS MiB) of that child."""
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"command failed ({code}): {' '.join(cmd[:6])} ...")
    return wall, usage.ru_maxrss / 1024.0


def compare(ours_file: Path, lm_eval_out: Path) -> list[str]:
    """Prediction agreement and score gaps between our file and lm-eval's logged samples."""
    import pyarrow.parquet as pq

    ours = pq.read_table(ours_file).to_pylist()
    sample_files = glob.glob(str(lm_eval_out / "**" / "samples_*.jsonl"), recursive=True)
    if len(sample_files) != 1:
        raise SystemExit(f"expected one lm-eval samples file, found {sample_files}")
    theirs: dict[tuple[str, int], list[float]] = {}
    for line in Path(sample_files[0]).read_text().splitlines():
        s = json.loads(line)
        lls = [float(r[0]) for r in s["filtered_resps"]]
        theirs[(s["doc"]["category"], int(s["doc"]["example_id"]))] = lls
    same = 0
    max_gap = 0.0
    diffs: list[str] = []
    for row in ours:
        key = (row["category"], row["example_id"])
        lls = theirs[key]
        mine = [row["score_0"], row["score_1"], row["score_2"]]
        max_gap = max(max_gap, *(abs(a - b) for a, b in zip(mine, lls, strict=True)))
        lm_pred = max(range(3), key=lambda j: (lls[j], -j))
        if lm_pred == row["pred_index"]:
            same += 1
        else:
            srt = sorted(lls, reverse=True)
            diffs.append(
                f"  {key[0]}/{key[1]}: ours={row['pred_index']} lm-eval={lm_pred} "
                f"ours={[round(x, 4) for x in mine]} lm-eval={[round(x, 4) for x in lls]} "
                f"lm-eval top-2 gap={srt[0] - srt[1]:.2e}"
            )
    n = len(ours)
    if len(theirs) != n:
        raise SystemExit(f"lm-eval scored {len(theirs)} items, we scored {n}")
    return [
        f"identical predictions: {same}/{n} ({100 * same / n:.2f} %)",
        f"max |log-likelihood difference| over all options: {max_gap:.2e}",
        f"differing items: {len(diffs)}",
        *diffs,
    ]


def _batch_size(value: str) -> int | None:
    """lm-eval's ``--batch_size`` as a number (None for ``auto``: padding then not counted)."""
    return int(value) if value.isdigit() else None


def model_work(work: Path, folder: str, batch_size: int | None) -> dict[str, int]:
    """The arithmetic each system asks of the model, from token counts (no timing).

    Ours: the token positions its packed rows ran through the model (``forward_tokens`` of the
    predictions file ``work/ours.parquet``, padding included) and the LM head on scored
    positions only (one per answer token). lm-eval (``hf``, 0.4.x ``loglikelihood``) on the
    items of ``work/items.jsonl``: every choice as its own sequence, ``context + " " + choice``
    encoded whole and its last token dropped, batches of ``batch_size`` sorted by length and
    right-padded to their longest (padding not counted for ``auto``), the LM head on every
    position. FLOPs are 2 x parameters per position for the decoder body (embedding excluded)
    and 2 x vocab x hidden per LM-head position; attention scores are left out (rows and
    sequences are under 300 tokens, where they are a few per cent). When both systems run
    their matrix products at the same rate, the ratio bounds the whole-process speed-up.
    """
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spillover.predictions.parquet import read_metadata

    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    body = total - embed.numel() - (0 if head is embed else head.numel())

    ours_file = work / "ours.parquet"
    cols = pq.read_table(ours_file, columns=["n_tokens_0", "n_tokens_1", "n_tokens_2"])
    lengths: list[int] = []
    for line in (work / "items.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = f"{doc['context']}\n\nQ: {doc['question']}\nA:"
        for choice in doc["choices"]:
            whole = tok.encode(context + " " + choice, add_special_tokens=False)
            lengths.append(len(whole) - 1)
    lengths.sort(reverse=True)
    step = batch_size or 1
    return {
        "items": len(lengths) // 3,
        "body_params": body,
        "head_params": head.numel(),
        "ours_positions": int(read_metadata(ours_file)["scorer_stats"]["forward_tokens"]),
        "ours_head_positions": sum(sum(c.to_pylist()) for c in cols.columns),
        "lm_eval_positions": sum(
            max(lengths[i : i + step]) * len(lengths[i : i + step])
            for i in range(0, len(lengths), step)
        ),
        "lm_eval_unpadded": sum(lengths),
    }


def work_lines(w: dict[str, int]) -> list[str]:
    """:func:`model_work` as a table, with the GFLOP ratio."""
    body, head, n = 2 * w["body_params"], 2 * w["head_params"], w["items"]
    ours = (w["ours_positions"] * body + w["ours_head_positions"] * head) / 1e9
    lm = w["lm_eval_positions"] * (body + head) / 1e9
    return [
        f"model work ({w['body_params'] / 1e6:.1f} M body parameters, LM head "
        f"{w['head_params'] / 1e6:.1f} M; attention scores left out):",
        f"{'system':<10} {'positions':>10} {'LM head':>10} {'GFLOP':>8} {'GFLOP/item':>11}",
        f"{'spillover':<10} {w['ours_positions']:10d} {w['ours_head_positions']:10d} "
        f"{ours:8.0f} {ours / n:11.2f}",
        f"{'lm-eval':<10} {w['lm_eval_positions']:10d} {w['lm_eval_positions']:10d} "
        f"{lm:8.0f} {lm / n:11.2f}  (unpadded {w['lm_eval_unpadded']})",
        f"work ratio (lm-eval / spillover GFLOP): {lm / ours:.2f}x",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    ap.add_argument("--per-stratum", type=int, default=23, help="items per category x context")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--lm-eval-python", default="python", help="python that can import lm_eval")
    ap.add_argument("--lm-eval-batch-size", default="16")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each system (best kept)")
    ap.add_argument("--bf16", action="store_true", help="also run ours in bfloat16, compare")
    ap.add_argument(
        "--warmup",
        action="store_true",
        help="run ours once untimed first (fills the compiled-kernel cache; its time is printed)",
    )
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder here")
    ap.add_argument(
        "--compare-only",
        type=Path,
        default=None,
        help="only compare a kept work folder (ours.parquet, lm_eval_out/)",
    )
    args = ap.parse_args()
    if args.compare_only is not None:
        sys.path.insert(0, str(ROOT / "src"))
        from spillover.models import EMBEDDED_ALIAS, prepare_embedded

        folder = str(prepare_embedded()) if args.model == EMBEDDED_ALIAS else args.model
        out = compare(args.compare_only / "ours.parquet", args.compare_only / "lm_eval_out")
        out += work_lines(
            model_work(args.compare_only, folder, _batch_size(args.lm_eval_batch_size))
        )
        print("\n".join(out))
        return
    if not args.bbq_dir:
        raise SystemExit("give --bbq-dir or set SPILLOVER_BBQ_DIR")

    sys.path.insert(0, str(ROOT / "src"))
    import pyarrow.parquet as pq

    from spillover.data import load_bbq, select_items
    from spillover.evaluate.run import sort_items
    from spillover.models import EMBEDDED_ALIAS, prepare_embedded

    data = load_bbq(args.bbq_dir)
    items = sort_items(select_items(data.items, per_stratum=args.per_stratum, seed=args.seed))
    cats = {it.category for it in items}
    ctxs = {(it.category, it.context_condition) for it in items}
    folder = str(prepare_embedded()) if args.model == EMBEDDED_ALIAS else args.model

    work = Path(tempfile.mkdtemp(prefix="spillover-bench-"))
    try:
        docs = work / "items.jsonl"
        with open(docs, "w") as fh:
            for it in items:
                rec = {
                    "category": it.category,
                    "example_id": it.example_id,
                    "context": it.context,
                    "question": it.question,
                    "choices": list(it.answers),
                    "label": it.label,
                }
                fh.write(json.dumps(rec) + "\n")
        keys = work / "items.csv"
        keys.write_text(
            "category,example_id\n" + "".join(f"{it.category},{it.example_id}\n" for it in items)
        )
        tasks = work / "tasks"
        tasks.mkdir()
        (tasks / "spillover_bbq_bench.yaml").write_text(TASK_YAML.format(data=docs))

        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        ours_out = work / "ours.parquet"
        ours_cmd = [
            sys.executable, "-c", RUNNER,
            "--model", args.model, "--bbq-dir", args.bbq_dir, "--items", str(keys),
            "--batch-tokens", str(args.batch_tokens), "--device", "cpu",
            "--out", str(ours_out),
        ]  # fmt: skip
        lm_cmd = [
            args.lm_eval_python, "-m", "lm_eval",
            "--model", "hf",
            "--model_args", f"pretrained={folder},dtype=float32",
            "--tasks", "spillover_bbq_bench", "--include_path", str(tasks),
            "--device", "cpu", "--batch_size", str(args.lm_eval_batch_size),
            "--output_path", str(work / "lm_eval_out"), "--log_samples",
        ]  # fmt: skip
        lm_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}

        n = len(items)
        print(f"items: {n} ({len(cats)} categories, {len(ctxs)} category x context strata)")
        print(f"model: {args.model}")
        print(f"load: {os.getloadavg()[0]:.2f} (1-min average before the runs)")
        runs_ours: list[tuple[float, float]] = []
        runs_lm: list[tuple[float, float]] = []
        if args.warmup:
            t_warm, _ = run_timed(ours_cmd, env, work / "ours.log")
            print(f"warm-up run of spillover (not counted): {t_warm:.1f} s", flush=True)
        for rep in range(args.repeat):  # alternate, so both see the same machine load
            if rep:
                shutil.rmtree(work / "lm_eval_out", ignore_errors=True)
            runs_ours.append(run_timed(ours_cmd, env, work / "ours.log"))
            runs_lm.append(run_timed(lm_cmd, lm_env, work / "lm_eval.log"))
            print(
                f"run {rep + 1}: spillover {runs_ours[-1][0]:.1f} s, lm-eval {runs_lm[-1][0]:.1f} s "
                f"(load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
        t_ours, rss_ours = min(runs_ours)
        t_lm, rss_lm = min(runs_lm)

        ours = pq.read_table(ours_out).to_pylist()
        agreement = compare(ours_out, work / "lm_eval_out")
        if args.repeat > 1:
            print(f"best of {args.repeat} runs each:")
        print(f"{'system':<10} {'wall s':>8} {'items/s':>8} {'peak RSS MiB':>13}")
        print(f"{'spillover':<10} {t_ours:8.1f} {n / t_ours:8.2f} {rss_ours:13.0f}")
        print(f"{'lm-eval':<10} {t_lm:8.1f} {n / t_lm:8.2f} {rss_lm:13.0f}")
        print(f"speed-up (items/s ratio, whole process): {t_lm / t_ours:.2f}x")
        m = re.search(
            r"model load\s+([\d.]+)s,\s+scoring\s+([\d.]+)s", (work / "ours.log").read_text()
        )
        if m:
            print(f"spillover inside its run: model load {m[1]} s, scoring {m[2]} s")
        print("\n".join(agreement))
        work_done = model_work(work, folder, _batch_size(args.lm_eval_batch_size))
        print("\n".join(work_lines(work_done)))

        if args.bf16:
            bf_out = work / "ours_bf16.parquet"
            bf_cmd = [*ours_cmd[:-1], str(bf_out), "--dtype", "bfloat16"]
            t_bf, rss_bf = run_timed(bf_cmd, env, work / "ours_bf16.log")
            bf = {(r["category"], r["example_id"]): r for r in pq.read_table(bf_out).to_pylist()}
            agree = sum(
                bf[(r["category"], r["example_id"])]["pred_index"] == r["pred_index"] for r in ours
            )
            print(
                f"spillover bf16: {t_bf:.1f} s, {n / t_bf:.2f} items/s, {rss_bf:.0f} MiB; "
                f"predictions identical to fp32: {agree}/{n} ({100 * agree / n:.2f} %)"
            )
    finally:
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
