"""Sweep of the smollm2-135m training preset, judged on held-out scenarios.

Each point is the default study (``spillover run`` without a config: SmolLM2-135M,
gender, DPO, 40 steps, balanced pairs, 24 items per category x context) with other
``align`` values, run through :func:`spillover.runs.run_study`. The points share one
base evaluation (its completed stage folder is copied, so the run skips it).

The selection criterion is fixed before the sweep:

* feasible: the disambiguated "unknown" rate over all 11 categories rises by at most
  10 points, and the held-out gender accuracy does not fall in either context;
* among feasible points, the largest mean held-out gender accuracy change over the two
  contexts; with no feasible point, the smallest rise of the disambiguated unknown rate.

The sweep uses seed 1 (its own sample and held-out scenarios); the default run (seed 0)
then checks the chosen point on a split it was not chosen on.

    python bench/preset_sweep.py --bbq-dir BBQ_DIR --out SWEEP_DIR
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from spillover.runs import RunConfig, run_study

POINTS: list[dict[str, Any]] = [
    {"learning_rate": 5e-4, "beta": 0.1},
    {"learning_rate": 5e-4, "beta": 0.1, "rpo_alpha": 1.0},
    {"learning_rate": 2e-4, "beta": 0.1, "rpo_alpha": 1.0},
    {"learning_rate": 1e-4, "beta": 0.1},
    {"learning_rate": 1e-4, "beta": 0.1, "rpo_alpha": 1.0},
    {"learning_rate": 2e-4, "beta": 0.5, "rpo_alpha": 1.0},
]
UNKNOWN_CAP = 0.10


def _row(strata: list[dict[str, Any]], category: str, context: str) -> dict[str, Any]:
    return next(
        s
        for s in strata
        if (s["category"], s["context_condition"]) == (category, context)
        and s.get("question_polarity") is None
        and s.get("label_type") is None
    )


def measure(run_dir: Path) -> dict[str, Any]:
    """Held-out gender accuracy changes, the disambiguated unknown rates, the guard."""
    comparison = json.loads((run_dir / "stats/comparison.json").read_text())
    target = json.loads((run_dir / "stats/heldout_target.json").read_text())
    held = target["comparison"]["strata"]
    dis = _row(comparison["strata"], "all", "disambig")
    out: dict[str, Any] = {
        "n_heldout": target["n_items"],
        "unknown_dis_base": dis["unknown_rate_base"],
        "unknown_dis_aligned": dis["unknown_rate_aligned"],
        "collapsed": target["answer_mix"]["collapsed"],
    }
    for ctx in ("ambig", "disambig"):
        r = _row(held, "all", ctx)
        out[f"acc_{ctx}_base"], out[f"acc_{ctx}_aligned"] = r["acc_base"], r["acc_aligned"]
        out[f"d_{ctx}"] = r["delta_accuracy"]
    out["d_unknown_dis"] = out["unknown_dis_aligned"] - out["unknown_dis_base"]
    out["feasible"] = (
        out["d_unknown_dis"] <= UNKNOWN_CAP and min(out["d_ambig"], out["d_disambig"]) >= 0
    )
    out["mean_d"] = (out["d_ambig"] + out["d_disambig"]) / 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--points", type=int, nargs="*", help="indices of POINTS to run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = args.points if args.points else range(len(POINTS))
    results = []
    shared: Path | None = None
    for i in chosen:
        point = POINTS[i]
        # keys left out take the default study's values (RunConfig())
        study = {"seed": args.seed, "bbq": {"dir": args.bbq_dir}, "align": dict(point)}
        run_dir = args.out / f"point{i}"
        if shared is not None and not (run_dir / "eval/base").exists():
            shutil.copytree(shared, run_dir / "eval/base")
        load = os.getloadavg()
        t0 = time.perf_counter()
        run_study(RunConfig.from_mapping(study), run_dir)
        seconds = time.perf_counter() - t0
        shared = shared or run_dir / "eval/base"
        m = measure(run_dir)
        results.append({"point": i, **point, **m, "seconds": seconds})
        print(
            f"point {i} {point}: held-out gender d_ambig {100 * m['d_ambig']:+.1f} "
            f"d_disambig {100 * m['d_disambig']:+.1f} (n {m['n_heldout']}); disambig unknown "
            f"{100 * m['unknown_dis_base']:.1f} -> {100 * m['unknown_dis_aligned']:.1f} %; "
            f"collapsed {m['collapsed']}; feasible {m['feasible']}; {seconds:.0f} s; "
            f"load {load[0]:.2f}",
            flush=True,
        )
    feasible = [r for r in results if r["feasible"]]
    best = (
        max(feasible, key=lambda r: r["mean_d"])
        if feasible
        else min(results, key=lambda r: r["d_unknown_dis"])
    )
    print(
        "\n| point | lr | beta | rpo_alpha | Δacc ambig | Δacc disambig | disambig unknown | feasible |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['point']} | {r['learning_rate']:g} | {r['beta']:g} | {r.get('rpo_alpha', 0):g} "
            f"| {100 * r['d_ambig']:+.1f} | {100 * r['d_disambig']:+.1f} "
            f"| {100 * r['unknown_dis_base']:.1f} -> {100 * r['unknown_dis_aligned']:.1f} "
            f"| {'yes' if r['feasible'] else 'no'} |"
        )
    print(f"\nchosen: point {best['point']} ({'feasible' if feasible else 'no point feasible'})")
    (args.out / "sweep.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
