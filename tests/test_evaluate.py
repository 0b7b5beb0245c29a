"""Tests of the evaluator: packed scoring, tokenisation boundary, permutations, files, CLI.

Default tests use a tiny random-weight Llama with a byte-level BPE tokenizer
trained on a few sentences, saved to a temporary folder (no downloads).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


from spillover.data import CATEGORIES, BBQItem  # noqa: E402
from spillover.errors import ConfigError  # noqa: E402
from spillover.evaluate import EvalConfig, evaluate_model, summarize_predictions  # noqa: E402
from spillover.evaluate.hf import HFChoiceScorer, score_naive  # noqa: E402
from spillover.evaluate.run import load_for_eval, normalised  # noqa: E402
from spillover.evaluate.scoring import (  # noqa: E402
    ChoiceEncoder,
    ChoiceRequest,
    ChoiceScores,
    EncodedOption,
    ScorerStats,
    split_pair,
)
from spillover.evaluate.shards import shard_dir  # noqa: E402
from spillover.models import load_model  # noqa: E402
from spillover.predictions.parquet import read_metadata, read_predictions_table  # noqa: E402
from spillover.predictions.schema import PREDICTION_COLUMNS, Prediction  # noqa: E402
from spillover.prompts import permutations, render  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"

CORPUS = [
    "The doctor and the nurse were talking about the schedule.",
    "Q: Who was late to work?\nA: The doctor. Cannot be determined. Not enough info.",
    "A grandfather and his grandson were at the park; the old man was tired!",
    "Who is bad at math? (the woman) 'unknown' -- $5, 100% sure...",
    "My neighbor, who is Muslim, and another neighbor, who is Christian, met.",
    "Answer with the letter of the correct option. A. B. C. Question:",
]

NAMES = [
    "The doctor",
    "The nurse",
    "Can't be determined",
    "the old man",
    "(the woman)",
    "!Not known",
]


def _item(i: int, category: str = "Age", context: str = "ambig") -> BBQItem:
    a = NAMES[i % len(NAMES)]
    b = NAMES[(i + 1) % len(NAMES)]
    unknown = "Cannot be determined" if i % 2 else "Not enough info"
    answers = [a, b, unknown]
    unk = i % 3
    answers[2], answers[unk] = answers[unk], answers[2]
    groups = ["g1", "g2", "g3"]
    groups[unk] = "unknown"
    label = unk if context == "ambig" else (unk + 1) % 3
    target = None if i % 5 == 4 else (unk + 2) % 3
    return BBQItem(
        category=category,
        example_id=i,
        question_index=i % 4 + 1,
        context_condition=context,  # type: ignore[arg-type]
        question_polarity="neg" if i % 2 else "nonneg",
        context=CORPUS[i % 3] + (" They met again." if i % 2 else ""),
        question="Who was late to work?" if i % 2 else "Who is bad at math?",
        answers=(answers[0], answers[1], answers[2]),
        answer_groups=(groups[0], groups[1], groups[2]),
        label=label,
        unknown_loc=unk,
        target_loc=target,
        label_type="name" if i % 2 else "label",
        stereotyped_groups=("old",),
        subcategory=None,
        flags=() if target is not None else ("target_loc_na",),
    )


ITEMS = [
    _item(i, c, x)
    for i, (c, x) in enumerate(
        [(CATEGORIES[k % 3], "ambig" if k % 2 else "disambig") for k in range(12)]
    )
]

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_model(folder: Path, *, chat_template: bool = True, seed: int = 0) -> Path:
    """A random-weight 2-layer Llama and a byte-level BPE tokenizer, saved to ``folder``."""
    from tiny_models import make_tiny

    return make_tiny(
        folder,
        chat=chat_template,
        corpus=CORPUS * 3,
        vocab_size=420,
        chat_template=CHAT_TEMPLATE,
        initializer_range=0.3,
        seed=seed,
    )


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> Any:
    return load_model(str(tiny_dir), device="cpu")


def _bbq_record(it: BBQItem) -> dict[str, Any]:
    return {
        "example_id": it.example_id,
        "question_index": str(it.question_index),
        "question_polarity": it.question_polarity,
        "context_condition": it.context_condition,
        "category": it.category,
        "answer_info": {f"ans{k}": [it.answers[k], it.answer_groups[k]] for k in range(3)},
        "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"]},
        "context": it.context,
        "question": it.question,
        "ans0": it.answers[0],
        "ans1": it.answers[1],
        "ans2": it.answers[2],
        "label": it.label,
    }


@pytest.fixture(scope="module")
def mini_bbq(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BBQ-shaped folder with a few items of 3 categories (loaded with --allow-unverified)."""
    root = tmp_path_factory.mktemp("bbq")
    meta = ["category,example_id,target_loc,label_type"]
    for cat in CATEGORIES[:3]:
        its = [_item(i, cat, "ambig" if i % 2 else "disambig") for i in range(10)]
        lines = [json.dumps(_bbq_record(it)) for it in its]
        (root / f"{cat}.jsonl").write_text("\n".join(lines) + "\n")
        for it in its:
            tl = "NA" if it.target_loc is None else str(it.target_loc)
            meta.append(f"{cat},{it.example_id},{tl},{it.label_type}")
    (root / "additional_metadata.csv").write_text("\n".join(meta) + "\n")
    return root


# --------------------------------------------------------------------------- engine


def _requests(
    items: Sequence[BBQItem], fmt: str = "lm-eval", tok: Any = None
) -> list[ChoiceRequest]:
    out = []
    for it in items:
        r = render(it, fmt, tokenizer=tok)
        out.append(ChoiceRequest(r.prompt, r.continuations))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scoring_equals_naive_per_option(tiny_dir: Path, attn: str) -> None:
    lm = load_model(str(tiny_dir), device="cpu", attn_implementation=attn)
    reqs = _requests(ITEMS)
    reqs.append(ChoiceRequest("Who? A:  ", ("x", " !!", "(the woman)")))  # trailing spaces
    # a small budget forces several batches, padding and length bucketing
    scorer = HFChoiceScorer(lm.model, lm.tokenizer, batch_tokens=150, max_row_tokens=60)
    got = scorer.score(reqs)
    assert scorer.stats.batches > 2
    encoded = scorer.encode(reqs)
    want = score_naive(lm.model, [(o.context, o.continuation) for opts in encoded for o in opts])
    flat = [v for s in got for v in s.logprobs]
    assert len(flat) == len(want)
    assert max(abs(a - b) for a, b in zip(flat, want, strict=True)) < 1e-4
    assert [n for s in got for n in s.n_tokens] == [
        len(o.continuation) for opts in encoded for o in opts
    ]
    # multi-token continuations and distinct scores: the test is not vacuous
    assert any(n > 1 for s in got for n in s.n_tokens)
    assert len({round(v, 3) for v in flat}) > len(flat) // 2
    # shared prompts and prefixes are computed once
    naive_tokens = sum(len(o.context) + len(o.continuation) - 1 for opts in encoded for o in opts)
    assert scorer.stats.forward_tokens < naive_tokens / 2


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cpu_scoring_attention_and_row_width_change_no_score(tiny_dir: Path, attn: str) -> None:
    """On a CPU the scorer uses eager attention and narrow rows (faster, docs/benchmarks.md);
    the scores equal the model's own attention with wide rows, and its setting comes back."""
    lm = load_model(str(tiny_dir), device="cpu", attn_implementation=attn)
    reqs = _requests(ITEMS)
    cpu = HFChoiceScorer(lm.model, lm.tokenizer)
    assert (cpu.attention, cpu.max_row_tokens) == ("eager", 96)
    got = [v for s in cpu.score(reqs) for v in s.logprobs]
    assert lm.model.config._attn_implementation == attn  # restored
    own = HFChoiceScorer(lm.model, lm.tokenizer, attention=attn, max_row_tokens=256)
    want = [v for s in own.score(reqs) for v in s.logprobs]
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < 1e-5
    with pytest.raises(ConfigError, match="`attention`='flash'"):
        HFChoiceScorer(lm.model, lm.tokenizer, attention="flash")


def _fresh_compile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **patch: Any) -> Any:
    """No compiled code from earlier tests: a compile inside this context builds its kernels."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    return inductor_config.patch({"fx_graph_cache": False, **patch})


def test_compiled_bf16_pass_scores_like_eager_and_leaves_the_model_as_it_was(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = load_model(str(tiny_dir), device="cpu")
    reqs = _requests(ITEMS)
    eager = HFChoiceScorer(lm.model, lm.tokenizer, batch_tokens=96)
    compiled = HFChoiceScorer(lm.model, lm.tokenizer, batch_tokens=96, compile=True)
    enc = eager.encode(reqs)
    want = [v for s in eager.score_encoded(enc, bf16=True) for v in s.logprobs]
    with _fresh_compile(monkeypatch, tmp_path):
        got = [v for s in compiled.score_encoded(enc, bf16=True) for v in s.logprobs]
    assert compiled.stats.compiled_batches == compiled.stats.batches > 2
    assert eager.stats.compiled_batches == 0
    assert all(layer._compiled_call_impl is None for layer in lm.model.model.layers)
    # the float32 pass (the rescoring of close calls) is never compiled: exactly the eager one
    exact = [v for s in compiled.score_encoded(enc) for v in s.logprobs]
    assert exact == [v for s in eager.score_encoded(enc) for v in s.logprobs]
    # both bf16 passes compute the same thing and differ from float32 by rounding alike
    err_eager = max(abs(a - b) for a, b in zip(want, exact, strict=True))
    err_compiled = max(abs(a - b) for a, b in zip(got, exact, strict=True))
    assert 0 < err_compiled < max(2 * err_eager, 0.05)
    assert compiled.stats.compiled_batches < compiled.stats.batches


def test_a_compile_that_fails_falls_back_to_eager_with_a_warning(
    tiny_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lm = load_model(str(tiny_dir), device="cpu")
    reqs = _requests(ITEMS)
    eager = HFChoiceScorer(lm.model, lm.tokenizer, batch_tokens=256)
    scorer = HFChoiceScorer(lm.model, lm.tokenizer, batch_tokens=256, compile=True)
    # a C++ compiler that does not exist: inductor's real build fails
    no_cxx = {"cpp.cxx": (None, str(tmp_path / "no-such-c++"))}
    with (
        _fresh_compile(monkeypatch, tmp_path, **no_cxx),
        caplog.at_level("WARNING", logger="spillover.evaluate.hf"),
    ):
        got = scorer.score(reqs, rescore=lambda i, s: False)
    assert "torch.compile failed" in caplog.text and "SPILLOVER_COMPILE=0" in caplog.text
    assert scorer.compile is False and scorer.stats.compiled_batches == 0
    want = eager.score(reqs, rescore=lambda i, s: False)
    assert got == want
    assert all(layer._compiled_call_impl is None for layer in lm.model.model.layers)


def test_compile_is_asked_for_through_the_environment_only(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spillover.evaluate.hf import compile_requested

    monkeypatch.delenv("SPILLOVER_COMPILE", raising=False)
    assert compile_requested() is False
    monkeypatch.setenv("SPILLOVER_COMPILE", "0")
    assert compile_requested() is False
    monkeypatch.setenv("SPILLOVER_COMPILE", "1")
    assert compile_requested() is True
    monkeypatch.setenv("SPILLOVER_COMPILE", "yes")
    with pytest.raises(ConfigError, match=r"\$SPILLOVER_COMPILE='yes'; expected 0, 1 or unset"):
        compile_requested()
    # evaluate_model reads it before any work
    with pytest.raises(ConfigError, match="SPILLOVER_COMPILE"):
        evaluate_model(load_model(str(tiny_dir), device="cpu"), ITEMS, EvalConfig())


def test_options_with_different_contexts_are_scored_apart(tiny: Any) -> None:
    tok = tiny.tokenizer
    a = tok("The doctor and the nurse", add_special_tokens=False)["input_ids"]
    b = tok("A grandfather and", add_special_tokens=False)["input_ids"]
    c = tok(" the old man was tired", add_special_tokens=False)["input_ids"]
    enc = [
        [
            EncodedOption(tuple(a), tuple(c)),
            EncodedOption(tuple(b), tuple(c)),
            EncodedOption(tuple(a), tuple(c[:2])),
        ]
    ]
    scorer = HFChoiceScorer(tiny.model, tok, batch_tokens=64)
    got = scorer.score_encoded(enc)[0].logprobs
    want = score_naive(tiny.model, [(o.context, o.continuation) for o in enc[0]])
    assert scorer.stats.split_requests == 1
    assert max(abs(x - y) for x, y in zip(got, want, strict=True)) < 1e-4


def _lm_eval_split(tok: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's causal split, written out independently."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


TRICKY = [
    ("Q: Who?\nA:", " The doctor"),
    ("Q: Who?\nA: ", "The doctor"),  # trailing space moves into the continuation
    ("Q: Who?\nA:  \n", "x"),  # trailing whitespace of several kinds
    ("Q: Who?\nA:", "!Not known"),  # continuation starts with punctuation
    ("Q: Who?\nA:", "(the woman)"),
    ("Q: Who?\nA", ": 'unknown'"),
    ("It cost $5", "00"),  # digits that may merge across the boundary
]


@pytest.mark.parametrize(("context", "continuation"), TRICKY)
def test_boundary_matches_lm_eval_rule(tiny: Any, context: str, continuation: str) -> None:
    scorer = HFChoiceScorer(tiny.model, tiny.tokenizer)
    (opt,) = scorer.encode([ChoiceRequest(context, (continuation,))])[0]
    ctx, cont = _lm_eval_split(tiny.tokenizer, context, continuation)
    if cont:
        assert (list(opt.context), list(opt.continuation)) == (ctx, cont)
    else:  # lm-eval would score nothing: we fall back to the joint encoding
        assert opt.merged and opt.continuation


def test_split_pair_rules() -> None:
    # clean boundary
    assert split_pair([1, 2, 3, 4], [1, 2, 3]) == EncodedOption((1, 2, 3), (4,), False)
    # merged boundary: lm-eval keeps its own context encoding ...
    assert split_pair([1, 2, 9, 4], [1, 2, 3]) == EncodedOption((1, 2, 3), (4,), True)
    # ... 'whole' scores the joint encoding after the shared prefix
    assert split_pair([1, 2, 9, 4], [1, 2, 3], "whole") == EncodedOption((1, 2), (9, 4), True)
    # lm-eval's continuation would be empty: fall back to the joint encoding
    assert split_pair([1, 2, 9], [1, 2, 3]) == EncodedOption((1, 2), (9,), True)


# --------------------------------------------------------------------------- predictions


class DisplayedFirst:
    """A scorer that always prefers displayed position 0; scores encode the text length."""

    supports_bf16 = False

    def __init__(self) -> None:
        self.stats = ScorerStats()

    def score(
        self,
        requests: Sequence[ChoiceRequest],
        progress: Callable[[int], None] | None = None,
        *,
        rescore: Any = None,
    ) -> list[ChoiceScores]:
        out = []
        for r in requests:
            lps = tuple(
                -float(len(c)) - (0.0 if j == 0 else 1000.0) for j, c in enumerate(r.continuations)
            )
            out.append(ChoiceScores(lps, tuple(len(c) for c in r.continuations)))
        if progress is not None:
            progress(len(requests))
        return out


@pytest.mark.parametrize("mode", ["none", "cyclic", "all"])
def test_permutations_map_back_to_original_indices(tiny: Any, mode: str) -> None:
    cfg = EvalConfig(precision="model", permutations=mode)
    preds = evaluate_model(tiny, ITEMS[:4], cfg, scorer=DisplayedFirst())
    orders = permutations(mode)
    assert len(preds) == 4 * len(orders)
    for p in preds:
        order = tuple(int(ch) for ch in p.permutation)
        assert order in orders
        assert p.pred_index == order[0]
        assert p.displayed_pred == 0
        item = next(it for it in ITEMS if it.key == (p.category, p.example_id))
        # scores belong to the ORIGINAL answers whatever the displayed order
        for k in range(3):
            penalty = 0.0 if order[0] == k else 1000.0
            assert getattr(p, f"score_{k}") == -float(len(" " + item.answers[k])) - penalty
        assert p.correct == (p.pred_index == item.label)
        assert p.unknown == (p.pred_index == item.unknown_loc)
        assert p.biased == (None if item.target_loc is None else p.pred_index == item.target_loc)
    rows = summarize_predictions(preds)
    assert all(r["position_0"] == 1.0 for r in rows)
    if mode != "none":
        pooled = rows[-1]
        assert pooled["permutation"] == "all"
        assert pooled["consistency"] == 0.0  # position bias: the answer changes with the order


def test_length_norms() -> None:
    s = ChoiceScores((-6.0, -4.0, -5.0), (3, 1, 5))
    conts = (" abcdef", " ab", " é")
    assert normalised(s, conts, "none") == [-6.0, -4.0, -5.0]
    assert normalised(s, conts, "token") == [-2.0, -4.0, -1.0]
    assert normalised(s, conts, "char") == [-1.0, -2.0, -5.0]
    assert normalised(s, conts, "byte") == [-1.0, -2.0, -2.5]
    with pytest.raises(ConfigError):
        normalised(s, conts, "words")


def test_evaluate_writes_sorted_file_with_metadata(tiny: Any, tmp_path: Path) -> None:
    out = tmp_path / "preds.parquet"
    cfg = EvalConfig(precision="model", permutations="cyclic", chunk_items=5, batch_tokens=256)
    shuffled = list(reversed(ITEMS))
    preds = evaluate_model(tiny, shuffled, cfg, out=out, provenance={"bbq": {"warnings": ["w"]}})
    assert out.is_file() and not shard_dir(out).exists()
    df = read_predictions_table(out)
    assert list(df.columns) == list(PREDICTION_COLUMNS)
    assert len(df) == len(ITEMS) * 3
    rank = {c: i for i, c in enumerate(CATEGORIES)}
    keys = [
        (rank[c], e, p) for c, e, p in zip(df.category, df.example_id, df.permutation, strict=True)
    ]
    assert keys == sorted(keys)
    assert df["target_loc"].isna().sum() == 3 * sum(it.target_loc is None for it in ITEMS)
    assert df["biased"].isna().sum() == df["target_loc"].isna().sum()
    assert [p.to_dict() for p in preds] == df.astype(object).where(df.notna(), None).to_dict(
        "records"
    )
    meta = read_metadata(out)
    assert meta["config"]["permutations"] == "cyclic"
    assert meta["model"]["model_id"] == str(tiny.spec.model_id)
    assert meta["bbq"]["warnings"] == ["w"]
    assert meta["n_rows"] == len(df)
    # same items in any order, other chunking: same predictions
    again = evaluate_model(
        tiny, ITEMS, EvalConfig(precision="model", permutations="cyclic", chunk_items=100)
    )
    for a, b in zip(preds, again, strict=True):
        assert (a.category, a.example_id, a.permutation, a.pred_index) == (
            b.category,
            b.example_id,
            b.permutation,
            b.pred_index,
        )
        assert abs(a.score_0 - b.score_0) < 1e-4


def test_resume_refuses_a_different_config(tiny: Any, tmp_path: Path) -> None:
    out = tmp_path / "p.parquet"
    folder = shard_dir(out)
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": 1, "config": {"x": 1}}))
    with pytest.raises(ConfigError, match="different configuration"):
        evaluate_model(tiny, ITEMS[:2], EvalConfig(precision="model"), out=out)


class _StopAfter(Exception):
    pass


def _interrupted(
    tiny: Any, items: Sequence[BBQItem], cfg: EvalConfig, out: Path, rows: int
) -> None:
    """Run an evaluation that stops (by its progress callback) once ``rows`` rows are done."""

    def stop(done: int, total: int) -> None:
        if done >= rows:
            raise _StopAfter

    with pytest.raises(_StopAfter):
        evaluate_model(tiny, items, cfg, out=out, progress=stop)


@pytest.mark.parametrize("fault", ["other chunk", "other run", "edited rows", "garbage"])
def test_resume_redoes_a_shard_it_cannot_verify(tiny: Any, tmp_path: Path, fault: str) -> None:
    """A shard replaced by another valid shard, or edited, is scored again, never merged."""
    cfg = EvalConfig(precision="model", chunk_items=2)
    items = ITEMS[:6]
    want = [(p.category, p.example_id, p.pred_index) for p in evaluate_model(tiny, items, cfg)]
    out = tmp_path / "p.parquet"
    _interrupted(tiny, items, cfg, out, rows=5)  # stops in the third chunk: two shards written
    folder = shard_dir(out)
    first, second = folder / "00000.parquet", folder / "00001.parquet"
    assert first.is_file() and second.is_file()
    if fault == "other chunk":  # a valid shard of this run, in the wrong place
        first.write_bytes(second.read_bytes())
    elif fault == "other run":  # a valid shard of a run over other items, same config
        other = tmp_path / "other.parquet"
        _interrupted(tiny, ITEMS[6:12], cfg, other, rows=3)
        first.write_bytes((shard_dir(other) / "00000.parquet").read_bytes())
    elif fault == "edited rows":  # the right metadata, another item's rows
        import pyarrow.parquet as pq

        table = pq.read_table(first)
        ids = table.column("example_id").to_pylist()
        ids[0] = ids[1]
        col = table.schema.get_field_index("example_id")
        table = table.set_column(col, "example_id", pa_array(ids, table.schema.field(col).type))
        pq.write_table(table, first)
    else:
        first.write_bytes(b"PAR1 not a parquet file")
    preds = evaluate_model(tiny, items, cfg, out=out)
    assert [(p.category, p.example_id, p.pred_index) for p in preds] == want
    df = read_predictions_table(out)
    keys = list(zip(df["category"], df["example_id"], strict=True))
    assert len(keys) == len(set(keys)) == len(items)  # no duplicate, none missing
    assert not folder.exists()


def pa_array(values: list[Any], type_: Any) -> Any:
    import pyarrow as pa

    return pa.array(values, type=type_)


def test_adapter_changes_predictions_and_equals_merged(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    torch.manual_seed(1)
    lora = LoraConfig(
        r=4,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(base, lora)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.5)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (merged_dir / f).write_bytes((tiny_dir / f).read_bytes())

    # per-token means: summed log-probs of a random model mostly reward short answers
    cfg = EvalConfig(precision="model", permutations="cyclic", length_norm="token")
    plain = evaluate_model(load_model(str(tiny_dir), device="cpu"), ITEMS, cfg)
    adapted_lm = load_model(str(tiny_dir), adapter=adapter_dir, device="cpu")
    assert type(adapted_lm.model).__name__.startswith("PeftModel")
    adapted = evaluate_model(adapted_lm, ITEMS, cfg)
    merged = evaluate_model(load_model(str(merged_dir), device="cpu"), ITEMS, cfg)
    assert adapted[0].adapter is not None

    def scores(ps: list[Prediction]) -> list[float]:
        return [s for p in ps for s in (p.score_0, p.score_1, p.score_2)]

    assert max(abs(a - b) for a, b in zip(scores(adapted), scores(plain), strict=True)) > 0.1
    assert [p.pred_index for p in adapted] != [p.pred_index for p in plain]
    assert max(abs(a - b) for a, b in zip(scores(adapted), scores(merged), strict=True)) < 1e-3
    assert [p.pred_index for p in adapted] == [p.pred_index for p in merged]

    # the evaluation stage loads the adapter merged: a plain model, the same predictions,
    # and the provenance says both which adapter and that it was merged
    loaded, scorer = load_for_eval(str(tiny_dir), cfg, adapter=adapter_dir, device="cpu")
    assert scorer is None and not hasattr(loaded.model, "peft_config")
    assert not any(m.training for m in loaded.model.modules())  # still in eval mode
    assert loaded.provenance()["adapter_merged"] is True
    assert loaded.provenance()["adapter"] == str(adapter_dir.resolve())
    via_stage = evaluate_model(loaded, ITEMS, cfg)
    assert max(abs(a - b) for a, b in zip(scores(via_stage), scores(adapted), strict=True)) < 1e-3
    assert [p.pred_index for p in via_stage] == [p.pred_index for p in adapted]
    assert via_stage[0].adapter == adapted[0].adapter
    assert adapted_lm.provenance()["adapter_merged"] is False


def test_letters_chat_scores_the_letter(tiny: Any) -> None:
    # 'whole': the letter alone is the assistant's first token
    preds = evaluate_model(
        tiny,
        ITEMS[:3],
        EvalConfig(precision="model", prompt_format="letters-chat", boundary="whole"),
    )
    assert all((p.n_tokens_0, p.n_tokens_1, p.n_tokens_2) == (1, 1, 1) for p in preds)
    # 'lm-eval': the template's trailing newline moves into every continuation
    scorer = HFChoiceScorer(tiny.model, tiny.tokenizer)
    r = render(ITEMS[0], "letters-chat", tokenizer=tiny.tokenizer)
    assert r.prompt.endswith("\n")
    opts = scorer.encode([ChoiceRequest(r.prompt, r.continuations)])[0]
    assert [tiny.tokenizer.decode(o.continuation) for o in opts] == ["\nA", "\nB", "\nC"]


# --------------------------------------------------------------------------- CLI


def _invoke(args: list[str]) -> Any:
    from cli_runner import invoke

    return invoke(["eval", *args])


def test_cli_writes_predictions(tiny_dir: Path, mini_bbq: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.parquet"
    res = _invoke(
        [
            "--model",
            str(tiny_dir),
            "--bbq-dir",
            str(mini_bbq),
            "--allow-unverified",
            "--categories",
            "age,disability",
            "--contexts",
            "ambig",
            "--all",
            "--permutations",
            "cyclic",
            "--out",
            str(out),
        ]
    )
    assert res.exit_code == 0, res.output
    df = read_predictions_table(out)
    assert set(df.category) == {"Age", "Disability_status"}
    assert set(df.context_condition) == {"ambig"}
    assert len(df) == 2 * 5 * 3
    meta = read_metadata(out)
    assert meta["bbq"]["verified"] is False and meta["bbq"]["warnings"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--prompt-format", "yaml", "--all"], "--prompt-format='yaml'"),
        (["--per-stratum", "2", "--items", "ITEMS"], "exactly one of"),
        (["--all", "--model", "MISSING"], "no such folder"),
        (["--all", "--adapter", "NOADAPTER"], "adapter_config.json"),
        (["--all", "--prompt-format", "letters-chat", "--model", "NOCHAT"], "chat template"),
    ],
)
def test_cli_bad_input_one_line_no_output(
    tiny_dir: Path, mini_bbq: Path, tmp_path: Path, extra: list[str], needle: str
) -> None:
    items = tmp_path / "items.csv"
    items.write_text("category,example_id\nAge,1\n")
    (tmp_path / "noadapter").mkdir()
    nochat = tmp_path / "nochat"
    if "NOCHAT" in extra:
        build_tiny_model(nochat, chat_template=False)
    subst = {
        "ITEMS": str(items),
        "MISSING": str(tmp_path / "does" / "not" / "exist"),
        "NOADAPTER": str(tmp_path / "noadapter"),
        "NOCHAT": str(nochat),
    }
    extra = [subst.get(a, a) for a in extra]
    args = ["--model", str(tiny_dir)] if "--model" not in extra else []
    out = tmp_path / "bad.parquet"
    res = _invoke(
        [
            *args,
            "--bbq-dir",
            str(mini_bbq),
            "--allow-unverified",
            "--categories",
            "age",
            *extra,
            "--out",
            str(out),
        ]
    )
    assert res.exit_code == 1
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert "Traceback" not in res.output
    tail = err[err.index("error:") :].strip()
    assert "\n" not in tail and needle in tail  # one line, the last one
    assert not out.exists() and not shard_dir(out).exists()


_CHILD = textwrap.dedent(
    """
    import sys, time
    import spillover.evaluate.run as ev  # the module that writes the shards
    from spillover.cli import app

    if sys.argv[1] == "slow":
        real = ev.write_shard
        def slow(*a, **k):
            real(*a, **k)
            time.sleep(0.5)
        ev.write_shard = slow
    app(sys.argv[2:])
    """
)


def test_resume_after_sigkill_is_byte_identical(
    tiny_dir: Path, mini_bbq: Path, tmp_path: Path
) -> None:
    base = [
        "eval",
        "--model",
        str(tiny_dir),
        "--bbq-dir",
        str(mini_bbq),
        "--allow-unverified",
        "--categories",
        "age,disability,gender",
        "--all",
        "--permutations",
        "cyclic",
        "--chunk-items",
        "3",
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    ref = tmp_path / "ref.parquet"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "fast", *base, "--out", str(ref)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "resumed.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, "slow", *base, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = shard_dir(out)
    deadline = time.monotonic() + 90
    while not list(folder.glob("*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before a shard appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = sorted(folder.glob("*.parquet"))
    assert 1 <= len(shards) < 10  # 30 items / 3 per shard: killed part-way
    assert not out.exists()
    first = shards[0].read_bytes()
    again = subprocess.run(
        [sys.executable, "-c", _CHILD, "fast", *base, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert not folder.exists()
    assert out.read_bytes() == ref.read_bytes()
    assert first  # the killed run's shard was reused, not an empty file


# --------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_forward_and_lm_eval_boundary() -> None:
    lm = load_model("smollm2-135m", device="cpu")
    scorer = HFChoiceScorer(lm.model, lm.tokenizer)
    for context, continuation in TRICKY:
        (opt,) = scorer.encode([ChoiceRequest(context, (continuation,))])[0]
        ctx, cont = _lm_eval_split(lm.tokenizer, context, continuation)
        assert (list(opt.context), list(opt.continuation)) == (ctx, cont)
    preds = evaluate_model(lm, ITEMS[:2], EvalConfig(precision="model"))
    assert all(p.score_0 < 0 and p.score_1 < 0 and p.score_2 < 0 for p in preds)
    got = scorer.score(_requests(ITEMS[:2]))
    enc = scorer.encode(_requests(ITEMS[:2]))
    want = score_naive(lm.model, [(o.context, o.continuation) for opts in enc for o in opts])
    flat = [v for s in got for v in s.logprobs]
    assert max(abs(a - b) for a, b in zip(flat, want, strict=True)) < 1e-3


@pytest.mark.fulldata
def test_full_bbq_prompts_render_and_tokenise(tiny: Any, full_bbq: Any) -> None:
    from spillover.data import select_items

    data = full_bbq
    picked = select_items(data.items, per_stratum=2, seed=0)
    assert len({it.category for it in picked}) == 11
    preds = evaluate_model(tiny, picked, EvalConfig(precision="model", permutations="cyclic"))
    assert len(preds) == 3 * len(picked)


def test_cli_verify_margin_bounds_the_rescored_share(
    tiny_dir: Path, mini_bbq: Path, tmp_path: Path
) -> None:
    """--verify-margin 0 keeps every bf16 decision; a huge margin rescores every item in
    float32, which must then reproduce --precision model exactly."""
    base = [
        "--model", str(tiny_dir), "--bbq-dir", str(mini_bbq), "--allow-unverified",
        "--categories", "age,disability", "--all",
    ]  # fmt: skip
    outs = {}
    for name, extra in {
        "none": ["--precision", "bf16-verified", "--verify-margin", "0"],
        "all": ["--precision", "bf16-verified", "--verify-margin", "1e9"],
        "fp32": ["--precision", "model"],
    }.items():
        outs[name] = tmp_path / f"{name}.parquet"
        res = _invoke([*base, *extra, "--out", str(outs[name])])
        assert res.exit_code == 0, res.output
    n = len(read_predictions_table(outs["fp32"]))
    verified = {k: read_metadata(v)["scorer_stats"]["verified_requests"] for k, v in outs.items()}
    assert verified == {"none": 0, "all": n, "fp32": 0}
    assert read_metadata(outs["all"])["config"]["verify_margin"] == 1e9
    exact, rescored = read_predictions_table(outs["fp32"]), read_predictions_table(outs["all"])
    score_cols = ["score_0", "score_1", "score_2"]
    assert (exact[score_cols] - rescored[score_cols]).abs().to_numpy().max() < 1e-5
    assert list(exact.pred_index) == list(rescored.pred_index)


def test_cli_items_file_and_limit(tiny_dir: Path, mini_bbq: Path, tmp_path: Path) -> None:
    items = tmp_path / "items.csv"
    items.write_text("category,example_id\ndisability,3\nAge,1\nAge,2\n")
    out = tmp_path / "items.parquet"
    res = _invoke(
        ["--model", str(tiny_dir), "--bbq-dir", str(mini_bbq), "--allow-unverified",
         "--items", str(items), "--limit", "2", "--out", str(out)]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    df = read_predictions_table(out)
    assert list(zip(df.category, df.example_id, strict=True)) == [("Age", 1), ("Age", 2)]


def test_two_process_evaluation_merges_to_the_single_process_file(
    tiny_dir: Path, mini_dir: Path, tmp_path: Path
) -> None:
    """`torchrun`/`accelerate launch` with 2 CPU processes: same rows as one process."""
    import shutil

    import pandas as pd

    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    args = [
        "-m", "spillover", "eval", "--model", str(tiny_dir), "--bbq-dir", str(mini_dir),
        "--allow-unverified", "--per-stratum", "3", "--chunk-items", "5", "--device", "cpu",
        "--precision", "model",
    ]  # fmt: skip
    single, merged = tmp_path / "single.parquet", tmp_path / "merged.parquet"
    subprocess.run([sys.executable, *args, "--out", str(single)], check=True, capture_output=True)
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", *args, "--out", str(merged)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged the predictions of 2 processes" in proc.stdout
    assert not list(tmp_path.glob("merged.parquet.part*"))
    a, b = read_predictions_table(single), read_predictions_table(merged)
    score_cols = ["score_0", "score_1", "score_2"]
    pd.testing.assert_frame_equal(a.drop(columns=score_cols), b.drop(columns=score_cols))
    assert (a[score_cols] - b[score_cols]).abs().to_numpy().max() < 1e-4
    meta = read_metadata(merged)
    assert meta["processes"] == 2 and meta["n_items"] == len(a)
    assert meta["items_sha256"] == read_metadata(single)["items_sha256"]


def test_bf16_verified_predictions_equal_full_precision(tiny: Any) -> None:
    """bf16 autocast with full-precision rescoring of close calls: same predictions as fp32."""
    items = ITEMS * 1
    exact = evaluate_model(tiny, items, EvalConfig(precision="model", permutations="cyclic"))
    scorer = HFChoiceScorer(tiny.model, tiny.tokenizer)
    fast = evaluate_model(
        tiny,
        items,
        EvalConfig(precision="bf16-verified", permutations="cyclic", verify_margin=0.5),
        scorer=scorer,
    )
    assert [p.pred_index for p in fast] == [p.pred_index for p in exact]
    # bf16 really ran: scores differ from fp32 somewhere, and close calls were rescored
    diffs = [abs(a.score_0 - b.score_0) for a, b in zip(fast, exact, strict=True)]
    assert max(diffs) > 0
    # an unbounded margin rescores every request: full-precision scores throughout
    every = HFChoiceScorer(tiny.model, tiny.tokenizer)
    again = evaluate_model(
        tiny,
        items,
        EvalConfig(precision="bf16-verified", permutations="cyclic", verify_margin=1e9),
        scorer=every,
    )
    assert every.stats.verified_requests == len(exact)
    assert max(abs(a.score_1 - b.score_1) for a, b in zip(again, exact, strict=True)) < 1e-4
    # a zero margin rescores nothing
    none = HFChoiceScorer(tiny.model, tiny.tokenizer)
    evaluate_model(
        tiny, items, EvalConfig(precision="bf16-verified", verify_margin=0.0), scorer=none
    )
    assert none.stats.verified_requests == 0
    with pytest.raises(ConfigError, match="`precision`='fp8'"):
        EvalConfig(precision="fp8").validate()


def test_progress_advances_per_batch_with_the_total_from_the_start(
    tiny: Any, tmp_path: Path
) -> None:
    """One chunk holds every item, small batches: the callback hears the total before any
    work, then a growing count after each batch, not once per chunk."""
    calls: list[tuple[int, int]] = []
    cfg = EvalConfig(precision="model", permutations="cyclic", chunk_items=1000, batch_tokens=64)
    evaluate_model(
        tiny, ITEMS, cfg, out=tmp_path / "p.parquet", progress=lambda d, t: calls.append((d, t))
    )
    rows = 3 * len(ITEMS)
    assert calls[0] == (0, rows)  # the total before the first batch is scored
    assert {t for _, t in calls} == {rows}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == rows
    assert len(set(done)) > 3  # one chunk, several batches: several steps
    # a resumed run reports the rows of every shard it reads back, in order
    again: list[tuple[int, int]] = []
    small = EvalConfig(precision="model", chunk_items=4)
    out = tmp_path / "r.parquet"
    _interrupted(tiny, ITEMS, small, out, rows=5)
    evaluate_model(tiny, ITEMS, small, out=out, progress=lambda d, t: again.append((d, t)))
    assert again[0] == (0, len(ITEMS)) and again[-1] == (len(ITEMS), len(ITEMS))
    assert [d for d, _ in again] == sorted(d for d, _ in again)


def test_bench_model_work_counts_parameters_and_positions(
    tiny: Any, tiny_dir: Path, tmp_path: Path
) -> None:
    """bench/eval_throughput.py's work count (what bounds the float32 speed-up against
    lm-eval): the parameter split equals the tiny config's hand count, ours' positions are
    the scorer's own counter, lm-eval's equal our encoder's context + continuation lengths."""
    import importlib.util

    import pyarrow.parquet as pq
    from transformers import AutoConfig, AutoTokenizer

    spec = importlib.util.spec_from_file_location(
        "eval_throughput", Path(__file__).resolve().parents[1] / "bench" / "eval_throughput.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    evaluate_model(tiny, ITEMS, EvalConfig(precision="model"), out=tmp_path / "ours.parquet")
    with open(tmp_path / "items.jsonl", "w") as fh:
        for it in ITEMS:
            doc = {"context": it.context, "question": it.question, "choices": list(it.answers)}
            fh.write(json.dumps(doc) + "\n")
    w1 = bench.model_work(tmp_path, str(tiny_dir), 1)
    w4 = bench.model_work(tmp_path, str(tiny_dir), 4)

    # hidden 32, MLP 64, 2 layers, 4 heads of 8, 2 KV heads; untied head over the vocabulary
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32  # q, o; k, v; MLP; 2 norms
    vocab = AutoConfig.from_pretrained(tiny_dir).vocab_size
    assert w1["body_params"] == 2 * per_layer + 32  # + the final norm
    assert w1["head_params"] == vocab * 32
    assert w1["items"] == len(ITEMS)

    meta = read_metadata(tmp_path / "ours.parquet")
    assert w1["ours_positions"] == meta["scorer_stats"]["forward_tokens"]
    table = pq.read_table(tmp_path / "ours.parquet").to_pylist()
    assert w1["ours_head_positions"] == sum(r[f"n_tokens_{j}"] for r in table for j in range(3))

    encoder = ChoiceEncoder(AutoTokenizer.from_pretrained(tiny_dir))
    requests = [
        ChoiceRequest(f"{it.context}\n\nQ: {it.question}\nA:", tuple(" " + a for a in it.answers))
        for it in ITEMS
    ]
    lm_eval = sum(
        len(o.context) + len(o.continuation) - 1 for opts in encoder.encode(requests) for o in opts
    )
    assert w1["lm_eval_unpadded"] == w1["lm_eval_positions"] == lm_eval  # batches of 1: no padding
    assert w4["lm_eval_unpadded"] == lm_eval < w4["lm_eval_positions"]
    # one prompt per item with its answers: fewer positions than lm-eval's, padding included
    assert w1["ours_positions"] < lm_eval
    assert any("work ratio" in line for line in bench.work_lines(w4))
