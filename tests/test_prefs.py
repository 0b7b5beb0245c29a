"""Preference pairs: strategies, scenario hold-out, files, CLI errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from cli_runner import invoke
from full_bbq import FULL_BBQ_DIR
from spillover.align import PrefsConfig, build_pairs
from spillover.align.prefs import (
    PAIR_COLUMNS,
    heldout_templates,
    read_pairs,
    split_scenarios,
    split_targets,
    write_pairs,
)
from spillover.data import BBQItem, ProbeItem
from spillover.data.select import on_heldout
from spillover.errors import ConfigError, DataError

FULL_BBQ = os.fspath(FULL_BBQ_DIR) if FULL_BBQ_DIR else None  # env, else the cache


def _item(cat: str, eid: int, tmpl: int, ctx: str, label: int, target: int | None) -> BBQItem:
    return BBQItem(
        category=cat,
        example_id=eid,
        question_index=tmpl,
        context_condition=ctx,  # type: ignore[arg-type]
        question_polarity="neg" if eid % 2 else "nonneg",  # type: ignore[arg-type]
        context=f"A man and a woman met ({cat} {tmpl}).",
        question="Who was late?",
        answers=("The man", "Unknown", "The woman"),
        answer_groups=("man", "unknown", "woman"),
        label=label,
        unknown_loc=1,
        target_loc=target,
        label_type="label",
        stereotyped_groups=("F",),
        subcategory=None,
        flags=() if target is not None else ("target_loc_na",),
    )


def small_items() -> list[BBQItem]:
    """Two categories x 10 templates; ambig (unknown correct) and disambig items."""
    items: list[BBQItem] = []
    eid = 0
    for cat in ("Gender_identity", "Age"):
        for tmpl in range(1, 11):
            items.append(_item(cat, eid, tmpl, "ambig", 1, 2))  # biased answer wrong
            items.append(_item(cat, eid + 1, tmpl, "disambig", 0, 2))  # biased answer wrong
            items.append(_item(cat, eid + 2, tmpl, "disambig", 2, 2))  # biased answer correct
            items.append(_item(cat, eid + 3, tmpl, "ambig", 1, None))  # no biased answer
            eid += 4
    return items


def test_balanced_strategy_chooses_and_rejects_unknown_equally() -> None:
    ps = build_pairs(small_items(), PrefsConfig(targets=("gender",), heldout_frac=0.0))
    assert ps.config.strategy == "balanced"
    by_id: dict[int, list[tuple[str, str, str]]] = {}
    for p in ps.train:
        by_id.setdefault(p.example_id, []).append((p.chosen, p.rejected, p.rejected_kind))
    # ambig: unknown over the biased answer
    assert by_id[0] == [(" Unknown", " The woman", "biased")]
    # disambig: the correct answer over unknown and over the wrong group, whichever is biased
    assert sorted(by_id[1]) == [
        (" The man", " The woman", "biased"),
        (" The man", " Unknown", "unknown"),
    ]
    assert sorted(by_id[2]) == [
        (" The woman", " The man", "other"),
        (" The woman", " Unknown", "unknown"),
    ]
    # ambig without a known biased answer: kept, over one group (seeded)
    assert len(by_id[3]) == 1 and by_id[3][0][0] == " Unknown" and by_id[3][0][2] == "other"
    assert ps.counts["skipped_no_target"] == 0
    # 20 ambig items choose unknown once, 20 disambig items reject it once
    assert ps.counts["chosen_kind"]["train"]["unknown"] == 20
    assert ps.counts["rejected_kind"]["train"]["unknown"] == 20
    again = build_pairs(small_items(), PrefsConfig(targets=("gender",), heldout_frac=0.0))
    assert again.train == ps.train


def test_stereotype_strategy_rejects_biased_or_other() -> None:
    ps = build_pairs(
        small_items(), PrefsConfig(targets=("gender",), strategy="stereotype", heldout_frac=0.0)
    )
    assert {p.category for p in ps.train} == {"Gender_identity"}
    by_id = {p.example_id: p for p in ps.train}
    # ambig, biased wrong: chosen unknown, rejected the biased "The woman"
    assert (by_id[0].chosen, by_id[0].rejected, by_id[0].rejected_kind) == (
        " Unknown",
        " The woman",
        "biased",
    )
    # disambig, biased answer correct: reject the other group, never "unknown"
    assert (by_id[2].chosen, by_id[2].rejected, by_id[2].rejected_kind) == (
        " The woman",
        " The man",
        "other",
    )
    assert 3 not in by_id  # target_loc NA: skipped and counted
    assert ps.counts["skipped_no_target"] == 10
    assert len(ps.train) == 30
    assert all(p.prompt.endswith("\nA:") for p in ps.train)


def test_all_wrong_makes_one_pair_per_wrong_answer() -> None:
    ps = build_pairs(
        small_items(), PrefsConfig(targets=("gender",), strategy="all-wrong", heldout_frac=0)
    )
    assert len(ps.train) == 40 * 2
    kinds = {(p.example_id, p.rejected_kind) for p in ps.train}
    assert (0, "biased") in kinds and (0, "other") in kinds
    assert (1, "biased") in kinds and (1, "unknown") in kinds
    assert (3, "other") in kinds  # NA target: both groups are "other"
    assert all(p.chosen != p.rejected for p in ps.train)


def test_heldout_scenarios_never_in_training() -> None:
    cfg = PrefsConfig(targets=("gender", "age"), heldout_frac=0.2, seed=3)
    ps = build_pairs(small_items(), cfg)
    for cat in ("Gender_identity", "Age"):
        held = set(ps.heldout_templates[cat])
        assert len(held) == 2
        assert not held & {p.question_index for p in ps.train if p.category == cat}
        assert {p.question_index for p in ps.heldout if p.category == cat} == held
    again = build_pairs(small_items(), cfg)
    assert again.heldout_templates == ps.heldout_templates
    draws = {split_scenarios(small_items(), 0.2, s)["Age"] for s in range(10)}
    assert len(draws) > 1  # the seed matters


def test_write_read_roundtrip(tmp_path: Path) -> None:
    ps = build_pairs(small_items(), PrefsConfig(targets=("gender",), seed=1))
    out = write_pairs(ps, tmp_path / "pairs")
    assert sorted(p.name for p in out.iterdir()) == [
        ".spillover-owned",
        "heldout.parquet",
        "split.json",
        "train.parquet",
    ]
    df = read_pairs(out)
    assert tuple(df.columns) == PAIR_COLUMNS
    assert len(df) == len(ps.train)
    info = json.loads((out / "split.json").read_text())
    assert info["seed"] == 1 and info["counts"]["train_pairs"] == len(ps.train)
    assert heldout_templates(out) == {c: set(t) for c, t in ps.heldout_templates.items()}
    assert split_targets(out) == ("Gender_identity",)
    held = heldout_templates(out)
    kept = on_heldout(small_items(), held)
    assert kept and all(
        it.question_index in held["Gender_identity"]
        for it in kept
        if it.category == "Gender_identity"
    )
    assert {it.category for it in kept} == {it.category for it in small_items()}
    # an existing folder is left untouched
    with pytest.raises(ConfigError, match="already exists"):
        write_pairs(ps, out)
    assert len(read_pairs(out)) == len(ps.train)


def test_letters_chat_uses_chat_template(tiny_chat_tokenizer: object) -> None:
    ps = build_pairs(
        small_items(),
        PrefsConfig(targets=("gender",), prompt_format="letters-chat", heldout_frac=0),
        tokenizer=tiny_chat_tokenizer,
    )
    p = ps.train[0]
    assert p.prompt.startswith("<s><|user|>") and p.prompt.endswith("<|assistant|>")
    assert (p.chosen, p.rejected) == ("B", "C")


def test_unknown_target_and_bad_options() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'Gender_identity'"):
        PrefsConfig(targets=("gendr",))
    with pytest.raises(ConfigError, match=r"`heldout_frac`=1\.5"):
        PrefsConfig(targets=("gender",), heldout_frac=1.5)
    with pytest.raises(ConfigError, match="`contexts`='ambiguous'"):
        PrefsConfig(targets=("gender",), contexts=("ambiguous",))
    with pytest.raises(DataError, match="no BBQ items"):
        build_pairs(small_items(), PrefsConfig(targets=("religion",)))


def test_cli_unknown_target_one_line(tmp_path: Path) -> None:
    res = invoke(["prefs", "--target", "gendr", "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "did you mean 'Gender_identity'" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_cli_chat_format_without_chat_template(tmp_path: Path, tiny_plain_dir: Path) -> None:
    res = invoke(
        [
            "prefs",
            "--target",
            "gender",
            "--prompt-format",
            "letters-chat",
            "--model",
            str(tiny_plain_dir),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 1, res.output
    assert "chat template" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_twin_templates_are_held_out_together() -> None:
    """Two templates asking the same question form one scenario: both go to one side."""
    import dataclasses

    items = [dataclasses.replace(it, scenario=(it.question_index + 1) // 2) for it in small_items()]
    ps = build_pairs(items, PrefsConfig(targets=("gender",), heldout_frac=0.2, seed=0))
    held = set(ps.heldout_templates["Gender_identity"])
    assert len(ps.heldout_scenarios["Gender_identity"]) == 1 and len(held) == 2
    assert {(t + 1) // 2 for t in held} == set(ps.heldout_scenarios["Gender_identity"])
    assert not held & {p.question_index for p in ps.train}


@pytest.mark.fulldata
@pytest.mark.skipif(not FULL_BBQ, reason="full BBQ not available: set SPILLOVER_BBQ_DIR")
@pytest.mark.parametrize("seed", range(5))
def test_full_data_no_heldout_question_in_training(seed: int) -> None:
    from spillover.data import load_bbq

    data = load_bbq(FULL_BBQ, categories=["gender"])
    ps = build_pairs(data.items, PrefsConfig(targets=("gender",), seed=seed))
    by_key = {it.key: it for it in data.items}
    train_questions = {by_key[(p.category, p.example_id)].question for p in ps.train}
    held_questions = set(ps.heldout_questions["Gender_identity"])
    assert held_questions and not held_questions & train_questions
    assert {by_key[(p.category, p.example_id)].question for p in ps.heldout} == held_questions
    info = ps.split_info()
    assert info["unit"] == "scenario" and len(info["heldout_scenarios"]["Gender_identity"]) == 6


@pytest.mark.fulldata
@pytest.mark.skipif(not FULL_BBQ, reason="full BBQ not available: set SPILLOVER_BBQ_DIR")
def test_full_data_no_heldout_template_in_training(tmp_path: Path) -> None:
    res = invoke(
        [
            "prefs",
            "--target",
            "gender",
            "--target",
            "race",
            "--strategy",
            "all-wrong",
            "--bbq-dir",
            str(FULL_BBQ),
            "--seed",
            "7",
            "--out",
            str(tmp_path / "pairs"),
        ],
    )
    assert res.exit_code == 0, res.output
    train = pd.read_parquet(tmp_path / "pairs" / "train.parquet")
    held = heldout_templates(tmp_path / "pairs")
    assert set(held) == {"Gender_identity", "Race_ethnicity"}
    for cat, templates in held.items():
        assert templates
        used = set(train.loc[train.category == cat, "question_index"])
        assert used and not used & templates
    info = json.loads((tmp_path / "pairs" / "split.json").read_text())
    assert info["provenance"]["bbq"]["verified"] is True


@pytest.fixture(scope="module")
def tiny_chat_tokenizer() -> object:
    from tiny_models import make_tokenizer

    return make_tokenizer(chat=True)


@pytest.fixture(scope="module")
def tiny_plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-plain"), chat=False)


def _prefs(mini_dir: Path, out: Path | str, *extra: str) -> object:
    return invoke(
        [
            "prefs",
            "--target",
            "gender",
            "--bbq-dir",
            str(mini_dir),
            "--allow-unverified",
            "--out",
            str(out),
            *extra,
        ]
    )


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("user folder", "a folder spillover did not make"),
        ("file", "exists and is not a folder"),
        ("cwd", "working directory or one of its parents"),
        ("proc", "/proc/spillover-pairs"),
    ],
)
def test_cli_overwrite_replaces_only_its_own_folders(
    mini_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str, needle: str
) -> None:
    """`--overwrite` never deletes what spillover did not make; failures are one line."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("keep me")
    (work / "mine").mkdir()
    (work / "mine" / "results.csv").write_text("a,b\n")
    monkeypatch.chdir(work)
    out: Path | str = {"user folder": work / "mine", "file": work / "notes.txt", "cwd": "."}.get(
        case, "/proc/spillover-pairs"
    )
    before = _tree(tmp_path)
    res = _prefs(mini_dir, out, "--overwrite")
    assert res.exit_code == 1, res.output
    tail = res.output[res.output.index("error:") :].strip()
    assert needle in " ".join(tail.split()) and "Traceback" not in res.output
    assert _tree(tmp_path) == before  # nothing written, nothing deleted


def test_cli_overwrite_replaces_its_own_pairs(mini_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pairs"
    assert _prefs(mini_dir, out).exit_code == 0
    first = _tree(out)
    assert ".spillover-owned" in first
    again = _prefs(mini_dir, out)
    assert again.exit_code == 1 and "pass --overwrite" in again.output
    (tmp_path / ".pairs.tmpstale").mkdir()  # the scratch folder of a killed earlier write
    res = _prefs(mini_dir, out, "--overwrite", "--seed", "3")
    assert res.exit_code == 0, res.output
    assert _tree(out) != first and sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]


def test_pairs_files_carry_the_unverified_warning(mini_dir: Path, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from spillover.align.prefs import PAIRS_META_KEY

    out = tmp_path / "pairs"
    assert _prefs(mini_dir, out).exit_code == 0
    for name in ("train.parquet", "heldout.parquet"):
        meta = json.loads(pq.read_schema(out / name).metadata[PAIRS_META_KEY])
        assert meta["warnings"] and "UNVERIFIED" in meta["warnings"][0]
    assert "UNVERIFIED" in json.loads((out / "split.json").read_text())["warnings"][0]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"heldout_templates": [1, 2]}, "'heldout_templates'"),
        ({"heldout_templates": {"Gender_identity": ["3"]}}, "'heldout_templates.Gender_identity'"),
        ({"heldout_templates": {"Gender_identity": [True]}}, "'heldout_templates.Gender_identity'"),
        ({"config": {"targets": "gender"}}, "'config.targets'"),
    ],
)
def test_malformed_split_names_file_and_field(
    tmp_path: Path, edit: dict[str, object], field: str
) -> None:
    ps = build_pairs(small_items(), PrefsConfig(targets=("gender",), seed=1))
    out = write_pairs(ps, tmp_path / "pairs")
    info = json.loads((out / "split.json").read_text())
    info.update(edit)
    (out / "split.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=f"split.json: field {field}"):
        heldout_templates(out)
        split_targets(out)
    # the commands that read it say the same in one line
    result = invoke(["compare", "a.parquet", "b.parquet", "--heldout-from", str(out)])
    assert result.exit_code == 1 and f"field {field}" in result.output


# --------------------------------------------------------------------------- pairs from probes


def _crows(i: int, writer: str, more: str, less: str) -> ProbeItem:
    return ProbeItem(
        benchmark="crows-pairs", item_id=str(i), attribute="Gender_identity", bias_type="gender",
        cluster=writer, split="all", group="stereo", context="", options=(more, less),
        roles=("more", "less"),
    )  # fmt: skip


def test_probe_pairs_train_the_words_that_differ_and_hold_out_whole_clusters() -> None:
    from spillover.align.probe_pairs import probe_pairs, split_pair_texts

    # the differing word is trained even when it starts the sentence: the prompt is the
    # prefix token the scorer puts before a whole sentence
    assert split_pair_texts("<s>", "Mary is a nurse.", "John is a nurse.") == (
        "<s>", "Mary is a nurse.", "John is a nurse.",
    )  # fmt: skip
    assert split_pair_texts("<s>", "The nurse was a man.", "The nurse was a woman.") == (
        "<s>The nurse was a", " man.", " woman.",
    )  # fmt: skip
    items = [_crows(i, f"a{i % 5}", f"He cried {i}.", f"She cried {i}.") for i in range(20)]
    train, held, clusters, counts = probe_pairs(
        items, source="crows-pairs", targets=("Gender_identity",), strategy="stereotype",
        heldout_frac=0.2, seed=0, prefix="<s>",
    )  # fmt: skip
    assert len(clusters["Gender_identity"]) == 1  # 20 % of 5 writers
    writer = clusters["Gender_identity"][0]
    assert {p.cluster for p in held} == {writer} and writer not in {p.cluster for p in train}
    assert len(train) + len(held) == 20 and counts["heldout_scenarios"] == {"Gender_identity": 1}
    first = next(p for p in train if p.item_id == "1")
    assert (first.prompt, first.chosen, first.rejected) == ("<s>", "She cried 1.", "He cried 1.")
    again = probe_pairs(
        items, source="crows-pairs", targets=("Gender_identity",), strategy="stereotype",
        heldout_frac=0.2, seed=0, prefix="<s>",
    )  # fmt: skip
    assert again[2] == clusters  # the draw depends on the seed and the cluster ids only


def test_prefs_from_crows_pairs_on_the_command_line(tmp_path: Path) -> None:
    """`spillover prefs --source crows-pairs`: pairs of the target's items after the
    model's prefix token, whole writers held out, split.json saying so."""
    import json

    from cli_runner import invoke
    from tiny_models import make_tiny

    model = make_tiny(tmp_path / "tiny")
    mini = Path(__file__).parent / "fixtures" / "probes_mini"
    out = tmp_path / "pairs"
    res = invoke(
        ["prefs", "--target", "race", "--source", "crows-pairs", "--model", str(model),
         "--data-dir", str(mini), "--allow-unverified", "--out", str(out)]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    split = json.loads((out / "split.json").read_text())
    assert split["unit"] == "cluster" and split["source"] == "crows-pairs"
    held = set(split["heldout_clusters"]["Race_ethnicity"])
    train = pd.read_parquet(out / "train.parquet")
    assert held and not held & set(train["cluster"])
    assert (train["prompt"].str.startswith("<s>")).all()  # the tiny tokenizer's BOS
    assert set(train["rejected_kind"]) == {"stereotype"}
    res = invoke(["prefs", "--target", "race", "--source", "crows-pairs", "--data-dir",
                  str(mini), "--allow-unverified", "--out", str(tmp_path / "p2")])  # fmt: skip
    assert res.exit_code == 1 and "start with the model's BOS token; give the model" in res.output
