"""lm-evaluation-harness sample logs as prediction files.

The real logs in ``fixtures/lm_eval/`` were written by lm-eval 0.4.13 itself
(``make_lm_eval_samples.py``): the stock 12-choice ``bbq`` task and a 3-choice task on the
mini BBQ, for two tiny random Llamas ("base", "aligned"). Each is checked against a
recomputation by hand from its ``filtered_resps``, and ``compare`` / ``metrics`` on them
against the same predictions written as a plain CSV. Constructed samples cover the mapping
rules (unknown phrasings, ties, order, spelling) and the one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cli_runner import invoke
from spillover.errors import ConfigError, DataError
from spillover.predictions.bbq import join_with_bbq
from spillover.predictions.lmeval import LM_EVAL_UNKNOWN_PHRASINGS
from spillover.predictions.read import read_predictions

LOGS = Path(__file__).parent / "fixtures" / "lm_eval"
TASKS = ("bbq12_local", "bbq3_local")
MINI_DATA = Path(__file__).parent / "fixtures" / "bbq_mini" / "data"


def _log(task: str, model: str) -> Path:
    return LOGS / f"{task}_{model}.jsonl"


def _samples(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _unknown_loc(doc: dict[str, Any]) -> int:
    (unk,) = [i for i in range(3) if doc["answer_info"][f"ans{i}"][1] == "unknown"]
    return unk


def _by_hand(sample: dict[str, Any], norm: str = "none") -> tuple[int, list[float]]:
    """The BBQ answer lm-eval's argmax chose, and each answer's score, worked out from the
    log's own fields with the layouts written out (not with the reader's text matching)."""
    doc = sample["doc"]
    lls = np.array([float(ll) for ll, _greedy in sample["filtered_resps"]])
    conts = [sample["arguments"][f"gen_args_{j}"]["arg_1"] for j in range(len(lls))]
    unk = _unknown_loc(doc)
    if len(lls) == 12:  # lm-eval's doc_to_choice: the two other answers in order, then 10
        others = [i for i in range(3) if i != unk]
        assert conts[:2] == [f" {doc[f'ans{i}']}" for i in others]
        assert conts[2:] == [f" {p}" for p in LM_EVAL_UNKNOWN_PHRASINGS]
        to_bbq = [*others, *[unk] * 10]
    else:
        assert conts == [f" {doc[f'ans{i}']}" for i in range(3)]
        to_bbq = [0, 1, 2]
    lengths = np.array([len(c[1:]) for c in conts], dtype=float)
    decisive = lls if norm == "none" else lls / lengths
    pred = to_bbq[int(np.argmax(decisive))]
    scores = [max(ll for ll, k in zip(lls, to_bbq, strict=True) if k == i) for i in range(3)]
    return pred, scores


# --------------------------------------------------------------------------- real logs


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("model", ["base", "aligned"])
def test_real_log_equals_hand_recomputation(task: str, model: str) -> None:
    path = _log(task, model)
    df = read_predictions(path)
    assert df.attrs["format"] == "lm-eval"
    samples = _samples(path)
    assert len(df) == len(samples) == 44
    for row, sample in zip(df.itertuples(), samples, strict=True):
        pred, scores = _by_hand(sample)
        assert (row.category, row.example_id) == (
            sample["doc"]["category"],
            sample["doc"]["example_id"],
        )
        assert row.pred_index == pred
        assert [row.score_0, row.score_1, row.score_2] == scores
        # lm-eval's own per-sample acc says the same about correctness
        assert bool(sample["acc"]) == (pred == sample["doc"]["label"])
    assert df.equals(read_predictions(path, format="lm-eval"))


def test_real_12_choice_log_sends_unknown_phrasings_to_unknown_loc() -> None:
    for model in ("base", "aligned"):
        path = _log("bbq12_local", model)
        df = read_predictions(path)
        for row, sample in zip(df.itertuples(), _samples(path), strict=True):
            lls = [float(ll) for ll, _ in sample["filtered_resps"]]
            best = int(np.argmax(lls))
            unk = _unknown_loc(sample["doc"])
            assert row.unknown_loc == unk
            if best >= 2:  # one of the ten phrasings won
                assert row.pred_index == unk
            assert getattr(row, f"score_{unk}") == max(lls[2:])
        assert any("stock 12-choice BBQ layout" in n for n in df.attrs["notes"])
    # the tilt the layout brings, on these tiny models: nearly every answer is "unknown"
    df = read_predictions(_log("bbq12_local", "base"))
    assert (df["pred_index"] == df["unknown_loc"]).mean() > 0.9


@pytest.mark.parametrize("model", ["base", "aligned"])
def test_real_3_choice_log_acc_norm(model: str) -> None:
    path = _log("bbq3_local", model)
    df = read_predictions(path, length_norm="char")
    for row, sample in zip(df.itertuples(), _samples(path), strict=True):
        pred, _ = _by_hand(sample, norm="char")
        assert row.pred_index == pred
        assert bool(sample["acc_norm"]) == (pred == sample["doc"]["label"])
    assert df.attrs["notes"] == []


def _hand_csv(log: Path, out: Path) -> Path:
    rows = [
        {
            "category": s["doc"]["category"],
            "example_id": s["doc"]["example_id"],
            "pred_index": _by_hand(s)[0],
        }
        for s in _samples(log)
    ]
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


@pytest.mark.parametrize("task", TASKS)
def test_compare_on_lm_eval_logs_equals_compare_on_csv(
    task: str, mini_dir: Path, tmp_path: Path
) -> None:
    base, aligned = _log(task, "base"), _log(task, "aligned")
    common = ["--bbq-dir", mini_dir, "--allow-unverified", "--bootstrap", "200"]
    res = invoke(["compare", base, aligned, *common, "--json", tmp_path / "logs.json"])
    assert res.exit_code == 0, res.output
    csvs = [_hand_csv(p, tmp_path / f"{p.stem}.csv") for p in (base, aligned)]
    res = invoke(["compare", *csvs, *common, "--json", tmp_path / "csv.json"])
    assert res.exit_code == 0, res.output
    from_logs = json.loads((tmp_path / "logs.json").read_text())
    from_csv = json.loads((tmp_path / "csv.json").read_text())
    assert from_logs["strata"] == from_csv["strata"]
    assert from_logs["summary"] == from_csv["summary"]
    assert any(r["b"] + r["c"] > 0 for r in from_logs["strata"])  # the runs do differ
    # the explicit format reads the same
    res = invoke(
        ["compare", base, aligned, *common, "--format", "lm-eval", "--json", tmp_path / "x.json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "x.json").read_text())["strata"] == from_logs["strata"]
    if task == "bbq12_local":
        assert any("12-choice" in w for w in from_logs["warnings"])


@pytest.mark.parametrize("task", TASKS)
def test_metrics_reads_lm_eval_logs(task: str, mini_dir: Path, tmp_path: Path) -> None:
    log = _log(task, "base")
    common = ["--bbq-dir", mini_dir, "--allow-unverified"]
    res = invoke(["metrics", log, *common, "--json", tmp_path / "logs.json"])
    assert res.exit_code == 0, res.output
    res = invoke(
        ["metrics", _hand_csv(log, tmp_path / "h.csv"), *common, "--json", tmp_path / "c.json"]
    )
    assert res.exit_code == 0, res.output
    by_log = json.loads((tmp_path / "logs.json").read_text())["strata"]
    by_csv = json.loads((tmp_path / "c.json").read_text())["strata"]
    # the log carries scores, so it has the unknown mass too; everything else agrees
    assert [{k: v for k, v in r.items() if k != "unknown_mass"} for r in by_log] == by_csv
    assert all(0.0 <= r["unknown_mass"] <= 1.0 for r in by_log)


def test_wrong_format_and_norm_options(tmp_path: Path, mini_dir: Path) -> None:
    log = _log("bbq3_local", "base")
    with pytest.raises(
        DataError,
        match=r"bbq3_local_base\.jsonl:1: missing field 'category'; it is an lm-evaluation-harness sample: read the file with --format lm-eval",
    ):
        read_predictions(log, format="jsonl")
    with pytest.raises(ConfigError, match=r"`--format`='lmeval' .*did you mean 'lm-eval'"):
        read_predictions(log, format="lmeval")
    with pytest.raises(ConfigError, match=r"`--length-norm`='chars' .*did you mean 'char'"):
        read_predictions(log, length_norm="chars")
    csv = tmp_path / "p.csv"
    csv.write_text("category,example_id,pred_index\nAge,0,1\n")
    with pytest.raises(ConfigError, match=r"`--length-norm`='char' applies to lm-evaluation"):
        read_predictions(csv, length_norm="char")
    # the format overrides the suffix
    copy = tmp_path / "log.txt"
    copy.write_bytes(log.read_bytes())
    assert read_predictions(copy, format="lm-eval").equals(read_predictions(log))
    res = invoke(["metrics", log, "--bbq-dir", mini_dir, "--allow-unverified", "--format", "xml"])
    assert res.exit_code == 1
    assert "`--format`='xml' is not one of auto, parquet, csv, jsonl, lm-eval" in res.output


# --------------------------------------------------------------------------- constructed


def _bbq(category: str, example_id: int) -> dict[str, Any]:
    for line in (MINI_DATA / f"{category}.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["example_id"] == example_id:
            return dict(rec)
    raise KeyError(example_id)


def _sample(
    doc: dict[str, Any], choices: list[str], lls: list[float], doc_id: int = 0, **extra: Any
) -> dict[str, Any]:
    """A sample shaped as lm-eval writes it (arguments as gen_args, responses as strings)."""
    ctx = f"{doc['context']}\n\nQ: {doc['question']}\nA:"
    return {
        "doc_id": doc_id,
        "doc": doc,
        "target": "0",
        "arguments": {
            f"gen_args_{j}": {"arg_0": ctx, "arg_1": f" {c}"} for j, c in enumerate(choices)
        },
        "resps": [[[str(ll), "False"]] for ll in lls],
        "filtered_resps": [[str(ll), "False"] for ll in lls],
        "filter": "none",
        "metrics": ["acc"],
        **extra,
    }


def _stock(doc: dict[str, Any]) -> list[str]:
    """lm-eval's doc_to_choice for the stock bbq task."""
    answers = [doc["ans0"], doc["ans1"], doc["ans2"]]
    (unknown,) = set(answers) & set(LM_EVAL_UNKNOWN_PHRASINGS)
    answers.remove(unknown)
    return [*answers, *LM_EVAL_UNKNOWN_PHRASINGS]


def _write(tmp_path: Path, samples: list[Any], name: str = "samples_t.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(s) + "\n" for s in samples), encoding="utf-8")
    return path


def test_constructed_12_choice_mapping(tmp_path: Path) -> None:
    doc = _bbq("Gender_identity", 4)  # The woman | Cannot be determined | The man; unknown 1
    assert _stock(doc)[:2] == ["The woman", "The man"]
    cases = [
        [-9.0, -8.0, *[-20.0] * 5, -1.0, *[-20.0] * 4],  # a phrasing ("Not known") wins
        [-9.0, -2.0, *[-3.0] * 10],  # "The man" (BBQ's ans2) wins
        [-5.0, -2.0, -2.0, *[-9.0] * 9],  # "The man" ties "Unknown": the earlier choice
        [-9.0, -8.0, -7.0, -20.0, -20.0, -6.5, *[-20.0] * 6],  # BBQ's own phrasing wins
    ]
    samples = [
        _sample({**doc, "example_id": 1000 + i}, _stock(doc), lls, doc_id=i)
        for i, lls in enumerate(cases)
    ]
    assert samples[3]["arguments"]["gen_args_5"]["arg_1"] == " Cannot be determined"
    df = read_predictions(_write(tmp_path, samples))
    assert df["pred_index"].tolist() == [1, 2, 2, 1]
    assert df["unknown_loc"].tolist() == [1, 1, 1, 1]
    # the unknown option scores as the best of the ten phrasings
    assert df.loc[0, ["score_0", "score_1", "score_2"]].tolist() == [-9.0, -1.0, -8.0]
    assert df.loc[3, ["score_0", "score_1", "score_2"]].tolist() == [-9.0, -6.5, -8.0]


def test_constructed_3_choice_by_text_in_any_order_and_spelling(tmp_path: Path) -> None:
    doc = _bbq("Age", 0)  # The grandfather | The grandson | Can't be determined
    choices = ["the GRANDSON", "Cant be determined.", "The grandfather"]
    df = read_predictions(_write(tmp_path, [_sample(doc, choices, [-3.0, -2.0, -1.0])]))
    assert df.loc[0, "pred_index"] == 0
    assert df.loc[0, ["score_0", "score_1", "score_2"]].tolist() == [-1.0, -3.0, -2.0]


def test_older_layout_and_numbers(tmp_path: Path) -> None:
    """Logs before the gen_args dict held arguments as [context, continuation] lists and
    may hold numbers rather than strings."""
    doc = _bbq("Age", 0)
    rec = _sample(doc, [doc["ans0"], doc["ans1"], doc["ans2"]], [-3.0, -1.0, -2.0])
    rec["arguments"] = [[a["arg_0"], a["arg_1"]] for a in rec["arguments"].values()]
    rec["filtered_resps"] = [[-3.0, False], [-1.0, False], [-2.0, False]]
    df = read_predictions(_write(tmp_path, [rec]))
    assert df.loc[0, "pred_index"] == 1
    # without filtered_resps, the first response of each request
    del rec["filtered_resps"]
    rec["resps"] = [[["-1.0", "False"]], [["-3.0", "False"]], [["-2.0", "False"]]]
    assert read_predictions(_write(tmp_path, [rec])).loc[0, "pred_index"] == 0


def test_alias_in_doc_category(tmp_path: Path, mini_dir: Path) -> None:
    doc = {**_bbq("Gender_identity", 1), "category": "gender"}
    df = read_predictions(_write(tmp_path, [_sample(doc, _stock(doc), [-1.0] * 12)]))
    assert df.loc[0, "category"] == "Gender_identity"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda r: r["doc"].pop("category"),
            r"t\.jsonl:1: sample doc_id=0 has no BBQ identity: its 'doc' lacks 'category'",
        ),
        (
            lambda r: r.update(doc={"id": 3, "question": "?"}),
            r":1: sample doc_id=0 has no BBQ identity: its 'doc' lacks 'category' and 'example_id'",
        ),
        (
            lambda r: r["arguments"]["gen_args_3"].update(arg_1=" Maybe"),
            r":1: sample doc_id=0: choice 3 'Maybe' is neither a BBQ answer of the item .* nor an 'unknown' phrasing; expected lm-eval's stock 12-choice",
        ),
        (
            lambda r: r.update(filtered_resps=[["text"]] * 12),
            r":1: sample doc_id=0: field 'filtered_resps'\[0\]=.*not generate_until",
        ),
        (
            lambda r: r.update(filtered_resps=[["-1.0", "False"]] * 11),
            r"holds 11 responses for 12 choices",
        ),
        (
            lambda r: r.update(
                arguments={"gen_args_0": {"arg_0": "x", "arg_1": {"until": ["\n"]}}}
            ),
            r"request 0 has no text continuation .*not generate_until",
        ),
    ],
)
def test_constructed_errors_are_one_line(tmp_path: Path, change: Any, needle: str) -> None:
    doc = _bbq("Gender_identity", 1)
    rec = _sample(doc, _stock(doc), [-1.0] * 12)
    change(rec)
    path = _write(tmp_path, [rec], name="t.jsonl")
    with pytest.raises(DataError, match=needle) as info:
        read_predictions(path)
    assert "\n" not in str(info.value)


def test_a_file_of_several_tasks_is_refused(tmp_path: Path) -> None:
    d1, d2 = _bbq("Gender_identity", 1), _bbq("Gender_identity", 3)
    twelve = _sample(d1, _stock(d1), [-1.0] * 12)
    three = _sample(d2, [d2["ans0"], d2["ans1"], d2["ans2"]], [-1.0] * 3, doc_id=1)
    with pytest.raises(
        DataError,
        match=r"t\.jsonl:2: 3 choices where line 1 has the stock 12-choice layout: the file mixes tasks",
    ):
        read_predictions(_write(tmp_path, [twelve, three], name="t.jsonl"))
    again = _sample(d2, _stock(d2), [-1.0] * 12, doc_id=0)
    with pytest.raises(
        DataError,
        match=r":2: doc_id 0 appears again \(first at line 1\): the file mixes the samples of several tasks or runs",
    ):
        read_predictions(_write(tmp_path, [twelve, again], name="t.jsonl"))
    other_filter = _sample(d2, _stock(d2), [-1.0] * 12, doc_id=1)
    other_filter["filter"] = "strict-match"
    with pytest.raises(DataError, match=r":2: filter 'strict-match' where line 1 has 'none'"):
        read_predictions(_write(tmp_path, [twelve, other_filter], name="t.jsonl"))
    row = {"category": "Age", "example_id": 0, "pred_index": 1}
    with pytest.raises(DataError, match=r":2: not an lm-evaluation-harness sample"):
        read_predictions(_write(tmp_path, [twelve, row], name="t.jsonl"))


def test_a_log_made_on_other_data_is_refused_at_the_join(tmp_path: Path, mini_dir: Path) -> None:
    from spillover.data import load_bbq

    bbq = load_bbq(mini_dir, allow_unverified=True)
    doc = _bbq("Gender_identity", 3)  # label 2 (The woman); BBQ's unknown is ans1
    assert (doc["label"], _unknown_loc(doc)) == (2, 1)
    doc["ans0"], doc["ans1"] = doc["ans1"], doc["ans0"]
    info = doc["answer_info"]
    doc["answer_info"] = {"ans0": info["ans1"], "ans1": info["ans0"], "ans2": info["ans2"]}
    df = read_predictions(
        _write(tmp_path, [_sample(doc, _stock(doc), [-1.0] * 12)], name="t.jsonl")
    )
    assert df.loc[0, "unknown_loc"] == 0
    with pytest.raises(
        DataError,
        match=r"t\.jsonl: 1 prediction row\(s\) carry a 'unknown_loc' that disagrees with BBQ .*made on other data",
    ):
        join_with_bbq(df, bbq)
