"""How much do real paired predictions cluster by BBQ scenario?

Two systems with no planted change: the BBQ authors' published UnifiedQA-11B predictions
in two prompt formats (RACE and ARC style), on the categories they published. Both are
compared with ``spillover.stats.compare_runs`` (defaults: scenario-clustered sign-flip
test, item-level mid-p McNemar beside it), and each category x context cell prints its
design effect ``DE = sum_s (d_s - n_s delta)^2 / sum_i (x_i - delta)^2``: the
scenario-level variance of the paired change over the item-level one (about 1 when the
change does not cluster by scenario).

Usage (BBQ folder with ``reference/unifiedqa/preds_*.jsonl``, as in the pinned copy)::

    python bench/real_clustering.py --bbq-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

FORMATS = ("race", "arc")


def _norm(text: str) -> str:
    return str(text).strip().lower().rstrip(".").strip()


def read_formats(folder: Path) -> dict[str, pd.DataFrame]:
    """Per format, ``category, example_id, pred_index`` of the items where both formats'
    answer strings match exactly one option (after normalising case and a final dot)."""
    rows: dict[str, list[dict[str, object]]] = {f: [] for f in FORMATS}
    for path in sorted(folder.glob("preds_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            picks = {}
            for fmt in FORMATS:
                pred = _norm(rec[f"unifiedqa-t5-11b_pred_{fmt}"])
                hits = [i for i in range(3) if _norm(rec[f"ans{i}"]) == pred]
                if len(hits) == 1:
                    picks[fmt] = hits[0]
            if len(picks) == len(FORMATS):
                for fmt, idx in picks.items():
                    rows[fmt].append(
                        {"category": rec["category"], "example_id": rec["example_id"],
                         "pred_index": idx}
                    )  # fmt: skip
    return {fmt: pd.DataFrame(r) for fmt, r in rows.items()}


def design_effect(x: np.ndarray, cluster: np.ndarray) -> float:
    """Scenario-level over item-level variance of the mean paired change."""
    from spillover.stats.clustered import cluster_totals

    d, n = cluster_totals(x, cluster)
    delta = float(x.mean())
    item = float(np.sum((x - delta) ** 2))
    return float(np.sum((d - n * delta) ** 2)) / item if item > 0 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    args = parser.parse_args()
    from spillover.data import load_bbq
    from spillover.predictions.bbq import join_with_bbq
    from spillover.stats import CompareConfig, compare_runs

    bbq = load_bbq(args.bbq_dir)
    folder = Path(bbq.root) / "reference" / "unifiedqa"
    frames = read_formats(folder)
    first, second = (join_with_bbq(frames[f], bbq) for f in FORMATS)
    result = compare_runs(first, second, CompareConfig(bootstrap=0))
    print(f"load average {os.getloadavg()}")
    print(f"UnifiedQA-11B, {FORMATS[0]} format (base) vs {FORMATS[1]} format (aligned); "
          f"{len(first)} items matched in both")  # fmt: skip
    print("| category | context | n | scenarios | b | c | item-level mid-p | sign-flip mid-p "
          "| design effect |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    joined = first.assign(
        x=(second["pred_index"].to_numpy() == second["label"].to_numpy()).astype(int)
        - (first["pred_index"].to_numpy() == first["label"].to_numpy()).astype(int)
    )
    effects = []
    for rec in result.rows:
        if rec.category == "all" or rec.context_condition == "all":
            continue
        cell = joined[
            (joined["category"] == rec.category)
            & (joined["context_condition"] == rec.context_condition)
        ]
        de = design_effect(cell["x"].to_numpy(), cell["scenario"].to_numpy())
        effects.append(de)
        print(
            f"| {rec.category} | {rec.context_condition} | {rec.n} | {rec.n_clusters} | "
            f"{rec.b} | {rec.c} | {rec.p_value_item:.2g} | {rec.p_value:.2g} | {de:.1f} |"
        )
    print(
        f"design effect: median {np.median(effects):.1f}, "
        f"range {min(effects):.1f} to {max(effects):.1f}"
    )


if __name__ == "__main__":
    main()
