"""Scoring with a LoRA adapter merged into the weights against the adapter applied as loaded.

``spillover eval --adapter`` merges the adapter before scoring. This script scores the same
seeded stratified BBQ sample with the same adapter both ways (one scorer each, the same
token sequences), in the bf16 pass and in float32, and prints each pass's time, the largest
float32 log-likelihood difference and how many predictions agree.

Example (the adapter of a finished default study)::

    python bench/adapter_merge.py --adapter runs/default/align/adapter --per-stratum 23

Needs BBQ (``--bbq-dir`` or ``$SPILLOVER_BBQ_DIR``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-stratum", type=int, default=23)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.bbq_dir:
        raise SystemExit("give --bbq-dir or set SPILLOVER_BBQ_DIR")

    sys.path.insert(0, str(ROOT / "src"))
    from spillover.data import load_bbq, select_items
    from spillover.evaluate import EvalConfig
    from spillover.evaluate.hf import HFChoiceScorer
    from spillover.evaluate.run import render_all, sort_items
    from spillover.evaluate.scoring import ChoiceRequest
    from spillover.models import load_model

    data = load_bbq(args.bbq_dir)
    items = sort_items(select_items(data.items, per_stratum=args.per_stratum, seed=args.seed))
    print(f"items: {len(items)}; load average before: {os.getloadavg()[0]:.2f}")
    results = {}
    for merged in (False, True):
        loaded = load_model(args.model, adapter=args.adapter, device="cpu", merge_adapter=merged)
        rendered = render_all(items, EvalConfig(), loaded.tokenizer)
        requests = [ChoiceRequest(r.prompt, r.continuations) for r in rendered]
        scorer = HFChoiceScorer(loaded.model, loaded.tokenizer)
        encoded = scorer.encode(requests)
        scorer.score_encoded(encoded[:8], bf16=True)  # warm-up
        name = "merged" if merged else "as loaded"
        for bf16 in (True, False):
            t0 = time.perf_counter()
            scores = scorer.score_encoded(encoded, bf16=bf16)
            dt = time.perf_counter() - t0
            print(
                f"{name:>9} {'bf16' if bf16 else 'float32':>7}: {dt:6.1f} s "
                f"(load {os.getloadavg()[0]:.2f})"
            )
            results[merged, bf16] = scores
    a, b = results[False, False], results[True, False]
    diff = max(
        abs(x - y)
        for p, q in zip(a, b, strict=True)
        for x, y in zip(p.logprobs, q.logprobs, strict=True)
    )

    def argmax(s: list) -> list[int]:
        return [max(range(len(x.logprobs)), key=x.logprobs.__getitem__) for x in s]

    same = sum(x == y for x, y in zip(argmax(a), argmax(b), strict=True))
    print(
        f"float32 merged vs as loaded: max |log-likelihood difference| {diff:.2e}, "
        f"same prediction {same}/{len(a)}"
    )


if __name__ == "__main__":
    main()
