"""Scoring the likelihood-probe benchmarks with the shared scorer, on a tiny random model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spillover.data import ProbeItem, ProbeSelection
from spillover.errors import ConfigError
from spillover.evaluate import EvalConfig
from spillover.evaluate.hf import HFChoiceScorer, score_naive
from spillover.evaluate.probes import (
    decision_scores,
    evaluate_probe_items,
    probe_prediction,
    score_probes,
)
from spillover.evaluate.scoring import ChoiceScores
from spillover.models import load_model
from spillover.predictions import KINDS
from spillover.predictions.parquet import read_metadata, read_table
from tiny_models import make_tiny

WORDS = ["the", "man", "woman", "nurse", "doctor", "engineer", "secretary", "who", "was", "late"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_model(
        str(make_tiny(tmp_path_factory.mktemp("tiny"), initializer_range=0.3)), device="cpu"
    )


def _crows(i: int) -> ProbeItem:
    a, b = WORDS[i % len(WORDS)], WORDS[(i + 3) % len(WORDS)]
    return ProbeItem(
        benchmark="crows-pairs", item_id=str(i), attribute="Gender_identity", bias_type="gender",
        cluster=f"a{i % 3}", split="all", group="stereo", context="",
        options=(f"the {a} was late.", f"the {b} was late."), roles=("more", "less"),
    )  # fmt: skip


def _stereoset(i: int) -> ProbeItem:
    return ProbeItem(
        benchmark="stereoset", item_id=f"dev/intrasentence/{i}", attribute="Profession",
        bias_type="profession", cluster="nurse", split="dev", group="intrasentence",
        context="", options=("the nurse was a woman.", "the nurse was a man.", "the nurse was 7."),
        roles=("stereotype", "anti-stereotype", "unrelated"),
    )  # fmt: skip


def _winogender(i: int) -> ProbeItem:
    return ProbeItem(
        benchmark="winogender", item_id=f"nurse.doctor.{i % 2}.female", attribute="Gender_identity",
        bias_type="gender", cluster="nurse", split="all", group="female",
        context="the nurse met the doctor who was late. ‘She’ refers to the",
        options=(" nurse", " doctor"), roles=("occupation", "participant"), label=i % 2,
    )  # fmt: skip


def test_an_empty_context_scores_the_whole_sentence_after_bos(tiny: Any) -> None:
    """CrowS-Pairs as lm-evaluation-harness scores it: every sentence token after the
    prefix token (BOS, else EOS), summed; checked against one unpadded forward each."""
    items = [_crows(i) for i in range(5)]
    scorer = HFChoiceScorer(tiny.model, tiny.tokenizer)
    preds = score_probes(scorer, items, EvalConfig(precision="model"), model_info={"model": "t"})
    tok = tiny.tokenizer
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    for it, p in zip(items, preds, strict=True):
        want = score_naive(tiny.model, [((prefix,), tok(s)["input_ids"]) for s in it.options])
        assert p.score_0 == pytest.approx(want[0], abs=1e-4)
        assert p.score_1 == pytest.approx(want[1], abs=1e-4)
        assert p.n_tokens_0 == len(tok(it.options[0])["input_ids"])
        assert p.pred_index == (0 if p.score_0 >= p.score_1 else 1)
        assert p.score_2 is None and p.n_tokens_2 is None and p.normalisation == "sum"


def test_stereoset_options_are_compared_per_token() -> None:
    """The summed log-probability favours the short option; StereoSet's per-token mean
    (its causal-LM scorer) decides, and the stored scores stay the sums."""
    scores = ChoiceScores(logprobs=(-6.0, -4.0, -9.0), n_tokens=(6, 2, 3))
    assert decision_scores(scores, "mean") == [-1.0, -2.0, -3.0]
    pred = probe_prediction(_stereoset(0), scores, {"model": "m", "model_id": "m"})
    assert pred.pred_index == 0 and pred.score_1 == -4.0 and pred.n_tokens_2 == 3
    tie = probe_prediction(_crows(0), ChoiceScores((-2.0, -2.0), (1, 1)), {})
    assert tie.pred_index == 0  # ties go to the earlier option


def test_a_probe_evaluation_resumes_from_its_shards(tiny: Any, tmp_path: Path) -> None:
    """Chunks are shards: an evaluation stopped after its first chunk and run again
    rescores nothing it finished and ends with the same file as an uninterrupted run."""
    items = [_winogender(i) for i in range(2)] + [
        ProbeItem(
            **{**_winogender(0).to_dict(), "item_id": f"x{i}", "options": (" nurse", " doctor")}
        )  # type: ignore[arg-type]
        for i in range(4)
    ]
    cfg = EvalConfig(precision="model", chunk_items=2)
    whole = tmp_path / "whole.parquet"
    evaluate_probe_items(
        tiny, items, cfg, out=whole, scorer=HFChoiceScorer(tiny.model, tiny.tokenizer)
    )

    @dataclass
    class Stop(Exception):
        pass

    class Stopping(HFChoiceScorer):
        calls = 0

        def score(self, requests: Any, progress: Any = None, *, rescore: Any = None) -> Any:
            Stopping.calls += 1
            if Stopping.calls == 2:
                raise Stop()
            return super().score(requests, progress, rescore=rescore)

    out = tmp_path / "resumed.parquet"
    with pytest.raises(Stop):
        evaluate_probe_items(tiny, items, cfg, out=out, scorer=Stopping(tiny.model, tiny.tokenizer))
    assert sorted(p.name for p in (tmp_path / "resumed.parquet.shards").glob("*.parquet")) == [
        "00000.parquet"
    ]
    counting = HFChoiceScorer(tiny.model, tiny.tokenizer)
    rows, _ = evaluate_probe_items(tiny, items, cfg, out=out, scorer=counting)
    assert rows == 6 and counting.stats.requests == 4  # the first chunk was read back
    a, b = read_table(whole)[0], read_table(out)[0]
    assert a.equals(b) and a.schema == KINDS["winogender"].arrow_schema()
    meta = read_metadata(out)
    assert meta["benchmark"] == "winogender" and meta["n_items"] == 6
    assert not (tmp_path / "resumed.parquet.shards").exists()


def test_bf16_verified_rescores_every_close_pair(tiny: Any) -> None:
    """A StereoSet item counts as a close call when ANY two options are close, not only
    the top two (each pairwise comparison enters its metrics)."""
    items = [_stereoset(0)]
    exact = score_probes(
        HFChoiceScorer(tiny.model, tiny.tokenizer),
        items,
        EvalConfig(precision="model"),
        model_info={},
    )
    verified_scorer = HFChoiceScorer(tiny.model, tiny.tokenizer)
    verified = score_probes(
        verified_scorer,
        items,
        EvalConfig(precision="bf16-verified", verify_margin=1e9),
        model_info={},
    )
    assert verified_scorer.stats.verified_requests == 1
    assert math.isclose(verified[0].score_0, exact[0].score_0, abs_tol=1e-5)


def test_probe_selection_filters_and_samples_whole_units() -> None:
    pairs = []
    for i in range(6):
        for side in ("pro", "anti"):
            pairs.append(
                ProbeItem(
                    benchmark="winobias",
                    item_id=f"dev/type1/{i}/{side}",
                    attribute="Gender_identity",
                    bias_type="gender",
                    cluster="nurse",
                    split="dev",
                    group=f"type1/{side}",
                    context="c",
                    options=(" a", " b"),
                    roles=("first occupation", "second occupation"),
                    label=0,
                    pair=f"dev/type1/{i}",
                )
            )
    picked = ProbeSelection(per_attribute=2, seed=3).apply(pairs)
    assert len(picked) == 4 and len({it.pair for it in picked}) == 2  # both sides of each pair
    # the sample depends on the seed and the ids only, not on the input order
    again = ProbeSelection(per_attribute=2, seed=3).apply(list(reversed(pairs)))
    assert {it.item_id for it in again} == {it.item_id for it in picked}
    assert all(it.group == "type1/pro" for it in ProbeSelection(groups="type1/pro").apply(pairs))
    with pytest.raises(
        ConfigError,
        match=r"`groups`: 'type3/pro' not in this benchmark; expected some of type1/anti, type1/pro",
    ):
        ProbeSelection(groups=("type3/pro",)).apply(pairs)
    with pytest.raises(ConfigError, match=r"`per_attribute`=0; expected a positive integer"):
        ProbeSelection(per_attribute=0)
    assert ProbeSelection(attributes="gender").attributes == ("Gender_identity",)


# --------------------------------------------------------------------------- lm-eval equivalence

LOGS = Path(__file__).parent / "fixtures" / "lm_eval"
PROBES_MINI = Path(__file__).parent / "fixtures" / "probes_mini"


@pytest.mark.parametrize("role, seed", [("base", 0), ("aligned", 1)])
def test_crows_pairs_scores_equal_lm_evals_own(tmp_path: Path, role: str, seed: int) -> None:
    """lm-evaluation-harness's crows_pairs_english task, run on the mini CrowS-Pairs file
    (the committed log, made by tests/fixtures/lm_eval/make_lm_eval_samples.py with the
    same tiny model), against spillover's scores: every sentence's log-likelihood equal,
    the same outcome on every pair whose gap exceeds 1e-3, and pct_stereotype per bias
    type and overall equal to lm-eval's per-sample metric averaged."""
    import json

    import pandas as pd

    from spillover.data import load_benchmark
    from spillover.predictions import join_with_items
    from spillover.stats.probes import probe_metrics

    folder = make_tiny(tmp_path / "tiny", seed=seed, initializer_range=1.0)
    model = load_model(str(folder), device="cpu", dtype="float32")
    data = load_benchmark("crows-pairs", PROBES_MINI, allow_unverified=True)
    preds = score_probes(
        HFChoiceScorer(model.model, model.tokenizer), data.items, EvalConfig(precision="model"),
        model_info={"model": "tiny", "model_id": "tiny"},
    )  # fmt: skip
    by_text = {it.options: p for it, p in zip(data.items, preds, strict=True)}
    samples = [json.loads(x) for x in (LOGS / f"crows_local_{role}.jsonl").read_text().splitlines()]
    assert len(samples) == len(data.items)
    rows = []
    for s in samples:
        p = by_text[(s["doc"]["sent_more"], s["doc"]["sent_less"])]
        lls = [float(r[0][0]) for r in s["resps"]]
        assert [p.score_0, p.score_1] == pytest.approx(lls, rel=1e-6)  # float32 sums
        if abs(lls[0] - lls[1]) > 1e-3:
            assert (p.score_0 > p.score_1) == (s["pct_stereotype"] == 1.0)
        rows.append((s["doc"]["bias_type"], s["pct_stereotype"]))
    frame = pd.DataFrame([p.to_dict() for p in preds])
    frame.attrs.update(source="ours", benchmark="crows-pairs")
    metrics = probe_metrics(join_with_items(frame, data.frame()))
    theirs = pd.DataFrame(rows, columns=["bias_type", "pct"])
    attribute = {k: v for k, v in data.frame()[["bias_type", "attribute"]].itertuples(index=False)}
    for bias_type, group in theirs.groupby("bias_type"):
        row = metrics[
            (metrics["attribute"] == attribute[bias_type]) & (metrics["level"] != "overall")
        ]
        assert row["pct_stereotype"].iloc[0] == pytest.approx(100 * group["pct"].mean())
    overall = metrics[metrics["level"] == "overall"]
    assert overall["pct_stereotype"].iloc[0] == pytest.approx(100 * theirs["pct"].mean())
