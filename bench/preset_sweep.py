"""Sweep of the embedded default's alignment: which training point makes SmolLM2-135M learn?

Each point is the default study (``spillover run`` without a config) with other ``align``
values (or another prompt format), run through :func:`spillover.runs.run_study` on the
target's items only (``eval.categories: [Gender_identity]``: the 200 held-out gender items
the default run would sample, 100 per context), with seed 1 (its own sample and held-out
scenarios; the default run, seed 0, then checks the chosen point on a split it was not
chosen on). Points of one prompt format share one base evaluation (its completed stage
folder is copied, so the run skips it).

The criterion, fixed before the sweep ran:

* the alignment learns: the trainer's last evaluation on held-out pairs has loss at most
  ln 2 - 0.05 (0.6431) and reward accuracy at least 0.65;
* it moves the target on held-out scenarios in the intended direction: the mean over the
  two contexts of the held-out gender accuracy change is above 0;
* the collapse guard stays silent (no answer kind or position above 90 %, the
  disambiguated "unknown" rate up by less than 20 points);
* among the points that meet all three, the largest mean held-out gender accuracy change;
  a rise of over-abstention below the guard is allowed (the report says so).

First, per prompt format, whether the base model answers "unknown" at all in ambiguous
contexts (the share of "unknown" answers on the ambiguous target items) is printed.

    python bench/preset_sweep.py --bbq-dir BBQ_DIR --out SWEEP_DIR [--points 0 3 ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from spillover.models import cpu_name
from spillover.runs import RunConfig, run_study

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POINTS: list[dict[str, Any]] = [
    {},  # the preset as it stands: lr 1e-4, beta 0.1, 40 steps of 8 pairs, r 16
    {"learning_rate": 5e-4},
    {"learning_rate": 5e-4, "rpo_alpha": 1.0},
    {"learning_rate": 1e-3},
    {"learning_rate": 5e-4, "beta": 0.05},
    {"learning_rate": 5e-4, "beta": 0.3},
    {"learning_rate": 5e-4, "max_steps": 20},
    {"learning_rate": 5e-4, "batch_size": 4, "max_steps": 80},
    {"learning_rate": 5e-4, "lora_r": 32, "lora_alpha": 64},
    {"learning_rate": 5e-4, "target_modules": ["q_proj", "v_proj"]},
    {"learning_rate": 5e-4, "strategy": "stereotype"},
    {"learning_rate": 5e-4, "prompt_format": "letters"},
    {"learning_rate": 5e-4, "prompt_format": "letters-chat"},
]
"""Every point of the sweep: ``align`` overrides, plus ``strategy`` (prefs) and
``prompt_format`` (eval and pairs) where a point changes them. Steps and batch vary within
the default run's time budget (600 s with the likelihood probes): half the steps, or the
same pairs in twice as many steps of half the batch; more training does not fit it."""

LOSS_CAP = math.log(2) - 0.05
ACC_MIN = 0.65
UNKNOWN_RISE = 0.20


def study(point: dict[str, Any], seed: int, bbq_dir: str) -> dict[str, Any]:
    """The run config of one point (keys left out take the default study's values)."""
    align = {k: v for k, v in point.items() if k not in ("strategy", "prompt_format")}
    data: dict[str, Any] = {
        "seed": seed,
        "bbq": {"dir": bbq_dir},
        "eval": {"categories": ["Gender_identity"]},
        "align": align,
    }
    if "prompt_format" in point:
        data["eval"]["prompt_format"] = point["prompt_format"]
    if "strategy" in point:
        data["prefs"] = {"strategy": point["strategy"]}
    return data


def measure(run_dir: Path) -> dict[str, Any]:
    """The held-out training curve's end, the held-out target change, the answer mix."""
    history = json.loads((run_dir / "align/log_history.json").read_text())
    history = history if isinstance(history, list) else history.get("log_history", history)
    evals = [h for h in history if "eval_loss" in h]
    target = json.loads((run_dir / "stats/heldout_target.json").read_text())
    rows = {
        s["context_condition"]: s
        for s in target["comparison"]["strata"]
        if s["category"] == "all" and s.get("question_polarity") is None
    }
    mix = target["answer_mix"]
    out: dict[str, Any] = {
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_acc": evals[-1].get("eval_rewards/accuracies") if evals else None,
        "eval_margin": evals[-1].get("eval_rewards/margins") if evals else None,
        "n_heldout": target["n_items"],
        "collapsed": bool(mix["collapsed"]),
        "unknown_ambig_base": rows["ambig"]["unknown_rate_base"],
        "unknown_dis_base": mix["base"]["disambig_unknown_rate"],
        "unknown_dis_aligned": mix["aligned"]["disambig_unknown_rate"],
    }
    for ctx in ("ambig", "disambig"):
        out[f"acc_{ctx}_base"] = rows[ctx]["acc_base"]
        out[f"acc_{ctx}_aligned"] = rows[ctx]["acc_aligned"]
        out[f"d_{ctx}"] = rows[ctx]["delta_accuracy"]
    out["mean_d"] = (out["d_ambig"] + out["d_disambig"]) / 2
    out["d_unknown_dis"] = out["unknown_dis_aligned"] - out["unknown_dis_base"]
    out["learns"] = (
        out["eval_loss"] is not None
        and out["eval_loss"] <= LOSS_CAP
        and (out["eval_acc"] or 0.0) >= ACC_MIN
    )
    out["moves"] = out["mean_d"] > 0
    out["silent"] = not out["collapsed"] and out["d_unknown_dis"] < UNKNOWN_RISE
    out["meets"] = out["learns"] and out["moves"] and out["silent"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--points", type=int, nargs="*", help="indices of POINTS to run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {cpu_name()}, {os.cpu_count()} cores", flush=True)
    chosen = args.points if args.points else range(len(POINTS))
    results_file = args.out / "sweep.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else []
    done = {r["point"] for r in results}
    shared: dict[str, Path] = {}
    for i in chosen:
        point = POINTS[i]
        fmt = point.get("prompt_format", "lm-eval")
        run_dir = args.out / f"point{i}"
        if i in done:
            shared.setdefault(fmt, run_dir / "eval/base")
            continue
        cfg = RunConfig.from_mapping(study(point, args.seed, args.bbq_dir))
        if fmt in shared and not (run_dir / "eval/base").exists():
            # a run directory (its config first), whose base evaluation the run then skips
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            shutil.copytree(shared[fmt], run_dir / "eval/base")
        load = os.getloadavg()
        t0 = time.perf_counter()
        run_study(cfg, run_dir)
        seconds = time.perf_counter() - t0
        shared.setdefault(fmt, run_dir / "eval/base")
        m = measure(run_dir)
        results.append({"point": i, "settings": point, **m, "seconds": seconds, "load": load[0]})
        results_file.write_text(json.dumps(results, indent=2))
        print(
            f"point {i} {point}: eval loss {m['eval_loss']:.4f} acc {m['eval_acc']:.2f}; "
            f"held-out gender d_ambig {100 * m['d_ambig']:+.1f} d_disambig "
            f"{100 * m['d_disambig']:+.1f} (n {m['n_heldout']}); base ambig unknown "
            f"{100 * m['unknown_ambig_base']:.0f} %; disambig unknown "
            f"{100 * m['unknown_dis_base']:.0f} -> {100 * m['unknown_dis_aligned']:.0f} %; "
            f"meets {m['meets']}; {seconds:.0f} s; load before {load[0]:.2f}",
            flush=True,
        )
    table(results)


def table(results: list[dict[str, Any]]) -> None:
    """The sweep's table (Markdown) and the chosen point."""
    print(
        "\n| point | settings | held-out loss | reward acc | Δacc ambig | Δacc disambig | "
        "unknown disambig | guard | meets | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: r["point"]):
        settings = ", ".join(f"{k} {v}" for k, v in r["settings"].items()) or "preset"
        print(
            f"| {r['point']} | {settings} | {r['eval_loss']:.4f} | {r['eval_acc']:.2f} "
            f"| {100 * r['d_ambig']:+.1f} | {100 * r['d_disambig']:+.1f} "
            f"| {100 * r['unknown_dis_base']:.0f} → {100 * r['unknown_dis_aligned']:.0f} % "
            f"| {'fired' if r['collapsed'] else 'silent'} | {'yes' if r['meets'] else 'no'} "
            f"| {r['seconds']:.0f} |"
        )
    meeting = [r for r in results if r["meets"]]
    if meeting:
        best = max(meeting, key=lambda r: r["mean_d"])
        print(f"\nchosen: point {best['point']} ({best['settings']})")
    else:
        print("\nno point meets the criterion")


if __name__ == "__main__":
    main()
