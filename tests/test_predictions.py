"""The predictions contract: one schema, one set of readers, used by evaluation, statistics
and the report alike."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from cli_runner import invoke
from spillover.predictions import BBQ, Prediction, position_frame, read_predictions
from spillover.predictions.schema import KINDS, PREDICTION_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
LOGS = FIXTURES / "lm_eval"


def test_the_schema_is_the_record_and_the_docs_table() -> None:
    """The BBQ kind's columns are the fields of `Prediction`, in order, with the Arrow type and
    nullability of each field's annotation; docs/predictions.md documents exactly those."""
    fields = dataclasses.fields(Prediction)
    assert tuple(BBQ.columns) == PREDICTION_COLUMNS == tuple(f.name for f in fields)
    schema = BBQ.arrow_schema()
    for f in fields:
        nullable = str(f.type).endswith("| None")
        assert schema.field(f.name).nullable is nullable, f.name
    assert (
        schema.field("score_0").type == pa.float64() and schema.field("correct").type == pa.bool_()
    )
    assert set(KINDS) == {"bbq", "crows-pairs", "stereoset", "winobias", "winogender"}
    assert KINDS["bbq"] is BBQ and BBQ.key == ("category", "example_id")
    assert KINDS["stereoset"].required == ("item_id", "score_0", "score_1", "score_2")
    doc = (ROOT / "docs" / "predictions.md").read_text(encoding="utf-8")
    table = doc.split("## File schema", 1)[1].split("\n\n")[2]
    documented: list[str] = []
    for row in table.splitlines()[2:]:
        cell = row.split("|")[1]
        documented += re.findall(r"`([a-z_0-9]+)`", cell)
    assert documented == list(PREDICTION_COLUMNS)


def _legacy_file(path: Path) -> Path:
    """Three answer orders with the identity written the old way, as the number 0, and no
    `displayed_pred` column (CSV: the ids read back as numbers)."""
    rows = []
    for perm, pred in (("0", 2), ("120", 2), ("201", 0)):
        rows.append(
            {
                "category": "Age",
                "example_id": 0,
                "pred_index": pred,
                "label": 2,
                "permutation": perm,
            }
        )
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_every_answer_order_of_a_legacy_file_reads_as_compare_reads_it(tmp_path: Path) -> None:
    path = _legacy_file(tmp_path / "legacy.csv")
    one = read_predictions(path)  # the identity, as compare keeps it
    assert one["permutation"].tolist() == ["012"] and one.attrs["notes"]
    every = read_predictions(path, all_permutations=True)
    assert every["permutation"].tolist() == ["012", "120", "201"]
    frame, lacking = position_frame(every)
    assert lacking == [] and frame is not None
    # answer 2 shown at position 2 in 012, position 1 in 120; answer 0 at position 1 in 201
    assert frame["displayed_pred"].tolist() == [2, 1, 1]
    assert frame["correct"].tolist() == [True, True, False]
    with pytest.raises(Exception, match="not both"):
        read_predictions(path, permutation="120", all_permutations=True)


def test_position_frame_says_what_a_file_lacks(tmp_path: Path) -> None:
    path = tmp_path / "bare.csv"
    pd.DataFrame({"category": ["Age"], "example_id": [0], "pred_index": [1]}).to_csv(
        path, index=False
    )
    frame, lacking = position_frame(read_predictions(path, all_permutations=True))
    assert frame is None and lacking == ["correct"]


def test_the_report_reads_lm_eval_logs_as_compare_does(tmp_path: Path) -> None:
    """A folder made by hand from lm-evaluation-harness logs: compare reads them, and the
    report reads the same files through the same reader (no second parser): its position
    view sees one answer order (lm-eval scores BBQ's own), not an unreadable file."""
    folder = tmp_path / "lmeval"
    folder.mkdir()
    for role in ("base", "aligned"):
        shutil.copy(LOGS / f"bbq3_local_{role}.jsonl", folder / f"{role}.jsonl")
    mini = str(FIXTURES / "bbq_mini")
    res = invoke(
        ["compare", str(folder / "base.jsonl"), str(folder / "aligned.jsonl"), "--bbq-dir", mini,
         "--allow-unverified", "--bootstrap", "0", "--json", str(folder / "comparison.json")]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    res = invoke(["report", str(folder), "--formats", "md"])
    assert res.exit_code == 0, res.output
    md = (folder / "report.md").read_text(encoding="utf-8")
    assert "Predictions hold a single answer order: position view skipped." in md
    assert "could not be read" not in md


# --------------------------------------------------------------------------- likelihood probes


def _items_frame() -> pd.DataFrame:
    from spillover.data.probes import PROBE_FRAME_COLUMNS

    rows = [
        ("stereoset", f"dev/intrasentence/{i}", "Gender_identity", "gender", f"t{i % 2}", "dev",
         "intrasentence", None, None, 3)
        for i in range(4)
    ]  # fmt: skip
    return pd.DataFrame(rows, columns=list(PROBE_FRAME_COLUMNS))


def test_a_probe_file_of_any_system_reads_and_joins(tmp_path: Path) -> None:
    """item_id plus a score per option is enough; the benchmark is named by the file's
    `benchmark` column (or the caller); per-token decisions use n_tokens when given."""
    from spillover.predictions import join_with_items

    path = tmp_path / "ss.csv"
    pd.DataFrame(
        {
            "benchmark": ["stereoset"] * 2,
            "item_id": ["dev/intrasentence/0", "dev/intrasentence/1"],
            "score_0": [-6.0, -1.0],
            "score_1": [-4.0, -2.0],
            "score_2": [-9.0, -3.0],
            "n_tokens_0": [6, 1],
            "n_tokens_1": [2, 1],
            "n_tokens_2": [3, 1],
        }
    ).to_csv(path, index=False)
    df = read_predictions(path)
    assert (
        df.attrs["benchmark"] == "stereoset" and df["item_id"].tolist()[0] == "dev/intrasentence/0"
    )
    joined = join_with_items(df, _items_frame())
    assert joined["cluster"].tolist() == ["t0", "t1"]
    # per token: option 0 (-1.0) beats option 1 (-2.0) although its sum is lower
    assert joined["decision_0"].tolist() == [-1.0, -1.0] and joined["pred_index"].tolist() == [0, 0]
    bare = tmp_path / "bare.jsonl"
    bare.write_text(
        '{"item_id": "dev/intrasentence/3", "score_0": -1, "score_1": -2, "score_2": -3}\n'
    )
    joined = join_with_items(read_predictions(bare, benchmark="StereoSet"), _items_frame())
    assert any("taken as per-token" in n for n in joined.attrs["notes"])


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("item_id,score_0,score_1\n1,-1,-2\n", r"does not say which benchmark; pass --benchmark"),
        (
            "benchmark,item_id,score_0\nwinogender,1,-1\n",
            r":1: missing column\(s\) 'score_1' in header",
        ),
        (
            "benchmark,item_id,score_0,score_1\nwinogender,1,-1,nan\n",
            r":2: field 'score_1'=nan; expected a log-probability",
        ),
        (
            "benchmark,item_id,score_0,score_1\nwinogender,1,-1,-2\nwinogender,1,-1,-2\n",
            r":3: duplicate item_id='1' \(first at line 2\)",
        ),
        (
            "benchmark,item_id,score_0,score_1\nwinogendr,1,-1,-2\n",
            r"column 'benchmark': unknown benchmark 'winogendr' \(did you mean 'winogender'\?\)",
        ),
        (
            "benchmark,item_id,score_0,score_1,n_tokens_0\nwinogender,1,-1,-2,3\n",
            r"has n_tokens_0 but not n_tokens_1",
        ),
    ],
)
def test_bad_probe_files_fail_in_one_line(tmp_path: Path, text: str, pattern: str) -> None:
    from spillover.errors import DataError

    path = tmp_path / "p.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=pattern) as info:
        read_predictions(path)
    assert "\n" not in str(info.value)


def test_a_probe_prediction_of_an_unknown_item_names_its_line(tmp_path: Path) -> None:
    from spillover.errors import DataError
    from spillover.predictions import join_with_items

    path = tmp_path / "p.csv"
    path.write_text(
        "benchmark,item_id,score_0,score_1,score_2\n"
        "stereoset,dev/intrasentence/0,-1,-2,-3\nstereoset,nope,-1,-2,-3\n",
        encoding="utf-8",
    )
    with pytest.raises(
        DataError,
        match=r"p\.csv:3: 1 prediction\(s\) name items that are not in StereoSet \(e\.g\. nope\)",
    ):
        join_with_items(read_predictions(path), _items_frame())


# --------------------------------------------------------------------------- commands on probe files

PROBES_MINI = FIXTURES / "probes_mini"


def _crows_file(path: Path, flip: int = 0) -> pd.DataFrame:
    """Predictions of a made-up system on the mini CrowS-Pairs: the more stereotypical
    sentence preferred on every item but the first ``flip`` ones."""
    from spillover.data import load_benchmark

    items = load_benchmark("crows-pairs", PROBES_MINI, allow_unverified=True).items
    rows = [
        {"benchmark": "crows-pairs", "item_id": it.item_id, "score_0": -1.0 if i >= flip else -3.0,
         "score_1": -2.0}
        for i, it in enumerate(items)
    ]  # fmt: skip
    df = pd.DataFrame(rows)
    df.to_csv(path, index=False)
    return df


def test_metrics_and_compare_read_a_probe_file_as_they_read_bbq(tmp_path: Path) -> None:
    """`spillover metrics` gives the benchmark's own metric names (pct_stereotype by
    attribute and overall, lm-eval's definition x100); `compare` pairs two such files."""

    base = _crows_file(tmp_path / "base.csv")
    _crows_file(tmp_path / "aligned.csv", flip=5)
    common = ["--data-dir", str(PROBES_MINI), "--allow-unverified"]
    res = invoke(
        ["metrics", str(tmp_path / "base.csv"), *common, "--json", str(tmp_path / "m.json")]
    )
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "m.json").read_text())
    assert out["benchmark"] == "crows-pairs"
    overall = next(r for r in out["strata"] if r["level"] == "overall")
    assert overall["pct_stereotype"] == 100.0 and overall["likelihood_diff"] == 1.0
    assert overall["n"] == len(base)
    assert any("Blodgett" in w for w in out["warnings"])
    res = invoke(["compare", str(tmp_path / "base.csv"), str(tmp_path / "aligned.csv"), *common,
                  "--bootstrap", "0", "--json", str(tmp_path / "c.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    comp = json.loads((tmp_path / "c.json").read_text())
    top = next(r for r in comp["strata"] if r["level"] == "overall")
    assert top["b"] == 5 and top["c"] == 0  # five items moved off the stereotype
    assert top["delta_metric"] == pytest.approx(-100 * 5 / len(base))
    split = {"heldout_templates": {"Gender_identity": [1]}, "config": {"targets": ["gender"]}}
    (tmp_path / "split.json").write_text(json.dumps(split))
    res = invoke(["compare", str(tmp_path / "base.csv"), str(tmp_path / "aligned.csv"), *common,
                  "--heldout-from", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 1 and "--heldout-from reads BBQ's held-out scenarios" in res.output
