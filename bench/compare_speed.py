"""Time ``spillover compare`` end to end on two full-size (58,492-row) prediction files.

The script writes two seeded prediction files over the real BBQ keys, then runs the
compare command in a fresh Python process (interpreter start, imports, BBQ loading and
verification, reading both files, the join, all tests, intervals, 1,000 bootstrap
replicates and writing JSON and CSV), and reports its wall time and peak RSS. A
second, in-process pass times the phases separately.

Usage::

    python bench/compare_speed.py --bbq-dir PATH/TO/BBQ [--format jsonl] [--bootstrap 1000]

``--bbq-dir`` defaults to ``$SPILLOVER_BBQ_DIR``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_RUNNER = """
import sys
from spillover.cli import main
sys.argv[1:1] = ["compare"]
main()
"""


def make_predictions(items, seed: int) -> tuple[object, object]:
    """Base: right 60% of the time, else a random wrong option; aligned: 15% changed."""
    rng = np.random.default_rng(seed)
    n = len(items)
    label = items["label"].to_numpy()
    wrong = (label + rng.integers(1, 3, n)) % 3
    base = np.where(rng.random(n) < 0.6, label, wrong)
    changed = rng.random(n) < 0.15
    aligned = np.where(changed, rng.integers(0, 3, n), base)
    keys = items[["category", "example_id"]]
    return keys.assign(pred_index=base), keys.assign(pred_index=aligned)


def write(df, path: Path) -> None:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    ap.add_argument("--format", choices=("jsonl", "csv", "parquet"), default="jsonl")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--cluster", choices=("scenario", "template", "item"), default="scenario")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.bbq_dir:
        ap.error("pass --bbq-dir or set SPILLOVER_BBQ_DIR")

    from spillover.data import load_bbq

    items = load_bbq(args.bbq_dir).frame()
    base, aligned = make_predictions(items, args.seed)
    with tempfile.TemporaryDirectory(prefix="spillover-bench-") as tmp:
        root = Path(tmp)
        bp, ap_ = root / f"base.{args.format}", root / f"aligned.{args.format}"
        write(base, bp)
        write(aligned, ap_)
        cmd = [
            sys.executable, "-c", _RUNNER, str(bp), str(ap_), "--bbq-dir", args.bbq_dir,
            "--bootstrap", str(args.bootstrap), "--seed", str(args.seed),
            "--cluster", args.cluster, "--json", str(root / "c.json"),
            "--csv", str(root / "c.csv"),
        ]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            return proc.returncode
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

        # phases, in this process (imports already warm except scipy/statsmodels)
        from spillover.predictions.bbq import join_with_bbq
        from spillover.predictions.read import read_predictions
        from spillover.stats import CompareConfig, compare_runs

        t = {"start": time.perf_counter()}
        bbq = load_bbq(args.bbq_dir)
        t["load + verify BBQ"] = time.perf_counter()
        pb, pa = read_predictions(bp), read_predictions(ap_)
        t["read both files"] = time.perf_counter()
        jb, ja = join_with_bbq(pb, bbq), join_with_bbq(pa, bbq)
        t["join with BBQ"] = time.perf_counter()
        cfg = CompareConfig(bootstrap=args.bootstrap, seed=args.seed, cluster=args.cluster)
        result = compare_runs(jb, ja, cfg)
        t[f"compare ({args.bootstrap} bootstrap replicates)"] = time.perf_counter()

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPU(s), {platform.machine()}, "
        f"load average {load}"
    )
    print(f"items per file: {len(base)}; format: {args.format}; cluster: {args.cluster}")
    print(f"end to end (fresh process, CLI): {wall:.2f} s wall, peak RSS {peak_kib / 1024:.0f} MiB")
    names = list(t)
    print("phases (in process):")
    for prev, name in itertools.pairwise(names):
        print(f"  {name:<40} {t[name] - t[prev]:6.2f} s")
    print(f"strata: {len(result.strata)}, flags: {len(result.flags)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
