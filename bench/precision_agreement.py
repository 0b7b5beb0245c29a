"""How far bfloat16 autocast scores are from float32 ones, and what ``verify_margin`` buys.

``--precision bf16-verified`` runs the decoder under bfloat16 autocast and rescores in
float32 every request whose top-two margin is below ``verify_margin``. This script
measures what that rests on, on a seeded stratified BBQ sample: every request is scored
twice by the same packed scorer, once under autocast and once in float32, and it reports

* how many decisions plain autocast changes;
* the error of every pairwise score difference (the quantity a decision depends on),
  overall and by the pair's number of continuation tokens;
* for several margins: the share of requests that would be rescored, the decisions that
  would still differ from float32 (those kept from the bf16 pass with a wrong winner), and
  the largest ratio error / margin among kept pairs (below 1 means no kept decision came
  close to flipping).

Example::

    python bench/precision_agreement.py --per-stratum 150 --seed 7

Needs BBQ (``--bbq-dir`` or ``$SPILLOVER_BBQ_DIR``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MARGINS = (0.2, 0.25, 0.3, 0.4, 0.5)
TOKEN_BANDS = ((2, 3), (4, 6), (7, 10), (11, 15), (16, 10_000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    ap.add_argument("--per-stratum", type=int, default=150, help="items per category x context")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-format", default="lm-eval")
    ap.add_argument(
        "--compile", action="store_true", help="also the compiled bf16 pass (torch.compile)"
    )
    args = ap.parse_args()
    if not args.bbq_dir:
        raise SystemExit("give --bbq-dir or set SPILLOVER_BBQ_DIR")

    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np

    from spillover.data import load_bbq, select_items
    from spillover.evaluate import EvalConfig
    from spillover.evaluate.hf import HFChoiceScorer
    from spillover.evaluate.run import render_all, sort_items
    from spillover.evaluate.scoring import ChoiceRequest
    from spillover.models import load_model

    data = load_bbq(args.bbq_dir)
    items = sort_items(select_items(data.items, per_stratum=args.per_stratum, seed=args.seed))
    loaded = load_model(args.model, device="cpu", dtype="float32")
    rendered = render_all(items, EvalConfig(prompt_format=args.prompt_format), loaded.tokenizer)
    requests = [ChoiceRequest(r.prompt, r.continuations) for r in rendered]
    scorer = HFChoiceScorer(loaded.model, loaded.tokenizer)
    encoded = scorer.encode(requests)
    modes = ["bf16-autocast", "float32"] + (["bf16-compiled"] if args.compile else [])
    runs = {}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for mode in modes:
        pass_scorer = scorer
        if mode == "bf16-compiled":
            pass_scorer = HFChoiceScorer(loaded.model, loaded.tokenizer, compile=True)
            t0 = time.perf_counter()
            pass_scorer.score_encoded(encoded[:8], bf16=True)  # compiles
            print(f"compile (first batch): {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        scores = pass_scorer.score_encoded(encoded, bf16=mode != "float32")
        runs[mode] = np.array([s.logprobs for s in scores])
        print(
            f"{mode}: {len(requests)} requests scored in {time.perf_counter() - t0:.1f} s "
            f"(load {os.getloadavg()[0]:.2f})"
        )
    ntok = np.array([[len(o.continuation) for o in opts] for opts in encoded])
    print(
        f"\nitems: {len(requests)} ({args.model}, prompt format {args.prompt_format}, "
        f"seed {args.seed})"
    )
    for mode in modes:
        if mode != "float32":
            print(f"\n== {mode} against float32")
            report(runs[mode], runs["float32"], ntok)


def report(bf: Any, fp: Any, ntok: Any) -> None:
    """Decision changes, pairwise error distribution and margins of one bf16 pass."""
    import numpy as np

    n = len(bf)
    flips = int(np.sum(bf.argmax(1) != fp.argmax(1)))
    print(f"decisions changed by the plain bf16 pass: {flips}/{n} ({100 * flips / n:.2f} %)")

    errs, sizes = [], []
    for i in range(n):
        for j, k in itertools.combinations(range(bf.shape[1]), 2):
            errs.append(abs((bf[i, j] - bf[i, k]) - (fp[i, j] - fp[i, k])))
            sizes.append(ntok[i, j] + ntok[i, k])
    e, s = np.array(errs), np.array(sizes)
    pct = "  ".join(f"p{q}={np.percentile(e, q):.3f}" for q in (50, 90, 99, 99.9))
    print(f"error of pairwise score differences (nats), {len(e)} pairs: {pct}  max={e.max():.3f}")
    print(f"{'pair tokens':>12} {'pairs':>6} {'p99':>7} {'max':>7}")
    for lo, hi in TOKEN_BANDS:
        sel = e[(s >= lo) & (s <= hi)]
        if len(sel):
            band = f"{lo}-{hi}" if hi < 10_000 else f">={lo}"
            print(f"{band:>12} {len(sel):6d} {np.percentile(sel, 99):7.3f} {sel.max():7.3f}")

    print(f"\n{'margin':>6} {'rescored':>9} {'differ':>7} {'max err/margin kept':>20}")
    top2 = np.sort(bf, axis=1)
    gap = top2[:, -1] - top2[:, -2]
    for m in MARGINS:
        kept = gap >= m
        differ = int(np.sum(kept & (bf.argmax(1) != fp.argmax(1))))
        worst = 0.0
        for i in np.flatnonzero(kept):
            w = int(bf[i].argmax())
            for k in range(bf.shape[1]):
                if k != w:
                    err = abs((bf[i, w] - bf[i, k]) - (fp[i, w] - fp[i, k]))
                    worst = max(worst, err / (bf[i, w] - bf[i, k]))
        print(f"{m:6.2f} {100 * (1 - kept.mean()):8.1f}% {differ:7d} {worst:20.3f}")


if __name__ == "__main__":
    main()
