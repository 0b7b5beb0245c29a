"""Scoring throughput of the packed scorer at 7B scale on one GPU (random weights).

Speed does not depend on weight values, so the model is built from Qwen2.5-7B's
published configuration with random bfloat16 weights, directly on the GPU (no download).
Items are real BBQ items in the ``lm-eval`` prompt format, tokenised with the SmolLM2
tokenizer (ids fit Qwen's larger vocabulary; BBQ text gives similar token counts under
either BPE). The script

1. checks correctness on ``--check-items`` items: the packed bf16 scores against one
   unpadded forward per answer (``score_naive``) in bf16 (the packing: must agree within
   ``--tolerance`` nats, else the script exits 1) and in float32 (the model cast to float32
   for the check and back, which is exact: the bf16 error, and the share of decisions
   equal to float32's among items whose float32 margin exceeds that error);
2. measures the device's dense bf16 matmul rate (8192^3 products), the reference for the
   utilisation figure;
3. tokenises ``--items`` items (timed), scores them once to warm up kernels and allocator,
   then again timed (``torch.cuda.synchronize`` around it), and prints items/s, tokens/s
   (tokens run through the model, padding included, and prompt + answer tokens scored), the
   estimated matmul TFLOP/s (2 x non-embedding parameters x tokens, plus the LM head on
   scored positions) as a share of the measured rate, and the projected time for all
   58,492 BBQ items, tokenisation included.

The machine that runs it needs torch and transformers only; prepare its inputs here::

    python bench/eval_gpu.py --export gpu-inputs --bbq-dir <bbq> --items 5000

then, on the GPU machine, from the repository root with ``gpu-inputs/`` beside it::

    python bench/eval_gpu.py --inputs gpu-inputs --items 5000

``--config tiny --device cpu`` runs the same code on a 2-layer model (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BBQ_ITEMS = 58_492

# Qwen2.5-7B(-Instruct) config.json, public values
QWEN25_7B = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def export(out: Path, bbq_dir: str | None, n_items: int, seed: int) -> None:
    """Write the items (a seeded stratified sample) and the tokenizer for the GPU machine."""
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoTokenizer

    from spillover.data import CATEGORIES, CONTEXTS, load_bbq, select_items
    from spillover.models import prepare_embedded

    data = load_bbq(bbq_dir)
    per = math.ceil(n_items / (len(CATEGORIES) * len(CONTEXTS)))
    items = select_items(data.items, per_stratum=per, seed=seed)[:n_items]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "items.jsonl", "w", encoding="utf-8") as fh:
        for it in items:
            rec = {"context": it.context, "question": it.question, "answers": list(it.answers)}
            fh.write(json.dumps(rec) + "\n")
    AutoTokenizer.from_pretrained(str(prepare_embedded())).save_pretrained(out / "tokenizer")
    print(f"wrote {len(items)} items and the tokenizer to {out}")


def matmul_tflops(torch: Any, dev: Any, dtype: Any, n: int = 8192, reps: int = 10) -> float:
    """Measured dense matmul rate of ``dev`` in ``dtype`` (n x n by n x n products)."""
    if dev.type != "cuda":
        n, reps = 1024, 3
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    a @ b  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def build_model(torch: Any, config: str, dev: Any, dtype: Any) -> Any:
    """A ``Qwen2ForCausalLM`` of ``config``'s shape (:data:`QWEN25_7B` or :data:`TINY`) with
    random ``dtype`` weights, built directly on ``dev`` (seed 0)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = QWEN25_7B if config == "qwen2.5-7b" else TINY
    cfg = Qwen2Config(**shape, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(dev):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return model


def measure(
    inputs: Path,
    *,
    items: int = 5000,
    config: str = "qwen2.5-7b",
    device: str = "cuda",
    batch_tokens: int = 32768,
    max_row_tokens: int | None = 512,
    check_items: int = 64,
    tolerance: float = 0.1,
) -> dict[str, Any]:
    """Run the check and the timing (see the module docstring), printing as it goes.

    Returns the numbers printed; ``check_passed`` False (packed scores beyond ``tolerance``)
    stops before the timing.
    """
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM  # noqa: F401  (not timed below)

    from spillover.evaluate.hf import HFChoiceScorer, score_naive
    from spillover.evaluate.scoring import ChoiceRequest

    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    lines = (inputs / "items.jsonl").read_text(encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in lines[:items]]
    requests = [
        ChoiceRequest(
            f"{r['context']}\n\nQ: {r['question']}\nA:", tuple(f" {a}" for a in r["answers"])
        )
        for r in recs
    ]
    tok = AutoTokenizer.from_pretrained(str(inputs / "tokenizer"))
    t0 = time.perf_counter()
    model = build_model(torch, config, dev, dtype)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    print(
        f"model: {config} shape, {n_params / 1e9:.2f} B parameters, {dtype}, {dev}, "
        f"built in {time.perf_counter() - t0:.1f} s"
    )
    out: dict[str, Any] = {"config": config, "device": str(dev), "dtype": str(dtype)}
    out["parameters"] = n_params
    if on_gpu:
        out["device_name"] = torch.cuda.get_device_name(dev)
        print(f"device: {out['device_name']}")

    scorer = HFChoiceScorer(model, tok, batch_tokens=batch_tokens, max_row_tokens=max_row_tokens)

    # 1. correctness against one unpadded forward per answer, same dtype and float32
    check = requests[:check_items]
    packed = scorer.score(check)
    pairs = [(o.context, o.continuation) for opts in scorer.encode(check) for o in opts]
    flat = [v for s in packed for v in s.logprobs]
    naive = score_naive(model, pairs)
    diff = max(abs(a - b) for a, b in zip(flat, naive, strict=True))
    model.float()  # bf16 -> float32 -> bf16 is exact: the timed model is unchanged
    exact = score_naive(model, pairs)
    model.to(dtype)
    err = max(abs(a - b) for a, b in zip(flat, exact, strict=True))

    def top(v: list[float]) -> tuple[int, float]:
        order = sorted(range(3), key=lambda j: -v[j])
        return order[0], v[order[0]] - v[order[1]]

    clear = same = 0
    for i, s in enumerate(packed):
        win, margin = top(exact[3 * i : 3 * i + 3])
        if margin > err:
            clear += 1
            same += top(list(s.logprobs))[0] == win
    print(
        f"check on {len(check)} items: max |packed - naive| = {diff:.3g} nats in {dtype} "
        f"(tolerance {tolerance}); max |packed - float32| = {err:.3g} nats; "
        f"decisions equal to float32 where its margin exceeds that: {same}/{clear}"
    )
    out.update(
        check_items=len(check),
        max_packed_vs_naive=diff,
        tolerance=tolerance,
        max_packed_vs_fp32=err,
        fp32_decisions_equal=same,
        fp32_decisions_clear=clear,
        check_passed=bool(diff <= tolerance),
    )
    if not out["check_passed"]:
        print("FAILED: packed scores differ from the per-answer forwards")
        return out

    # 2. the device's dense matmul rate, the reference for utilisation
    peak = matmul_tflops(torch, dev, dtype)
    side = 8192 if dev.type == "cuda" else 1024
    print(f"dense {dtype} matmul rate ({side}^3 products, measured): {peak:.1f} TFLOP/s")

    # 3. throughput (tokenisation timed too: it is part of a real evaluation)
    t0 = time.perf_counter()
    encoded = scorer.encode(requests)
    tok_secs = time.perf_counter() - t0
    scorer.score_encoded(encoded)  # warm-up: kernels, allocator, autotuning
    before = scorer.stats.forward_tokens, scorer.stats.batches
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    scorer.score_encoded(encoded)
    if on_gpu:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    fwd = scorer.stats.forward_tokens - before[0]
    batches = scorer.stats.batches - before[1]
    scored = sum(len(o.continuation) for opts in encoded for o in opts)
    useful = sum(len(opts[0].context) for opts in encoded) + scored
    flops = 2 * (n_params - embed - head) * fwd + 2 * head * scored
    tflops = flops / secs / 1e12
    n = len(requests)
    print(f"items: {n}, batches: {batches}, scoring time: {secs:.2f} s")
    print(f"items/s: {n / secs:.1f}")
    print(
        f"tokens/s: {fwd / secs:,.0f} through the model ({fwd:,} tokens incl. padding), "
        f"{useful / secs:,.0f} prompt + answer tokens ({useful:,})"
    )
    print(f"matmul rate: {tflops:.1f} TFLOP/s = {100 * tflops / peak:.0f} % of the measured rate")
    if on_gpu:
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
        print(f"peak GPU memory: {out['peak_gpu_gib']:.1f} GiB")
    print(f"tokenisation: {tok_secs:.2f} s ({n / tok_secs:.0f} items/s, one CPU process)")
    full = BBQ_ITEMS / n * (secs + tok_secs)
    print(f"projected full BBQ ({BBQ_ITEMS:,} items): {full:.0f} s, tokenisation included")
    out.update(
        items=n,
        batches=batches,
        scoring_s=secs,
        items_per_s=n / secs,
        forward_tokens_per_s=fwd / secs,
        useful_tokens_per_s=useful / secs,
        matmul_peak_tflops=peak,
        tflops=tflops,
        utilisation=tflops / peak,
        tokenisation_s=tok_secs,
        projected_full_bbq_s=full,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, default=None, help="write inputs here and stop")
    ap.add_argument("--bbq-dir", default=None)
    ap.add_argument("--inputs", type=Path, default=Path("gpu-inputs"))
    ap.add_argument("--items", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", choices=("qwen2.5-7b", "tiny"), default="qwen2.5-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--max-row-tokens", type=int, default=512)
    ap.add_argument("--check-items", type=int, default=64)
    ap.add_argument("--tolerance", type=float, default=0.1, help="packed vs naive, nats")
    args = ap.parse_args()
    if args.export is not None:
        export(args.export, args.bbq_dir, args.items, args.seed)
        return
    res = measure(
        args.inputs,
        items=args.items,
        config=args.config,
        device=args.device,
        batch_tokens=args.batch_tokens,
        max_row_tokens=args.max_row_tokens,
        check_items=args.check_items,
        tolerance=args.tolerance,
    )
    if not res["check_passed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
