"""Folder ownership and scratch-folder cleanup (``spillover._io``): what ``--overwrite`` may
replace, and what a crashed writer leaves behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spillover._io import OWNER_MARKER, check_output_dir, mark_owned, remove_stale, replace_dir
from spillover.errors import ConfigError


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(
    ("setup", "overwrite", "needle"),
    [
        ("file", True, "exists and is not a folder"),
        ("user folder", False, "already exists; choose another --out or pass --overwrite"),
        ("user folder", True, "a folder spillover did not make"),
        ("other kind", True, "this is a spillover adapter folder"),
        ("bad marker", True, "a folder spillover did not make"),
    ],
)
def test_check_output_dir_refuses(tmp_path: Path, setup: str, overwrite: bool, needle: str) -> None:
    target = tmp_path / "out"
    if setup == "file":
        target.write_text("notes")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        if setup == "other kind":
            mark_owned(target, "adapter")
        elif setup == "bad marker":
            (target / OWNER_MARKER).write_text("[not json")
    before = _listing(tmp_path)
    with pytest.raises(ConfigError) as info:
        check_output_dir(target, "pairs", overwrite=overwrite)
    assert needle in str(info.value)
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert _listing(tmp_path) == before


def test_check_output_dir_refuses_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    mark_owned(tmp_path / "a", "pairs")  # even a marked folder, when it holds the cwd
    monkeypatch.chdir(inner)
    for path in (Path("."), Path(".."), inner):
        with pytest.raises(ConfigError, match="working directory or one of its parents"):
            check_output_dir(path, "pairs", overwrite=True)


def test_check_output_dir_allows(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new", "pairs", overwrite=False)  # absent
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", "pairs", overwrite=False)  # empty
    owned = tmp_path / "owned"
    owned.mkdir()
    (owned / "train.parquet").write_text("x")
    mark_owned(owned, "pairs")
    check_output_dir(owned, "pairs", overwrite=True)  # spillover's own, same kind


def test_replace_dir_marks_the_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("new")
    target = tmp_path / "target"
    target.mkdir()
    (target / "a.txt").write_text("old")
    replace_dir(src, target, "pairs")
    assert (target / "a.txt").read_text() == "new" and (target / OWNER_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # old copy removed
    check_output_dir(target, "pairs", overwrite=True)


def test_remove_stale_touches_only_scratch_folders(tmp_path: Path) -> None:
    for name in (".adapter.tmpab12", ".adapter.tmpzz", "adapter", ".adapter.old.x", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / ".adapter.tmpfile").write_text("a file, not a scratch folder")
    link = tmp_path / ".adapter.tmplink"
    os.symlink(tmp_path / "notes", link)
    removed = remove_stale(tmp_path, ".adapter.tmp")
    assert sorted(p.name for p in removed) == [".adapter.tmpab12", ".adapter.tmpzz"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".adapter.old.x", ".adapter.tmpfile", ".adapter.tmplink", "adapter", "notes"]
    assert remove_stale(tmp_path / "missing", ".x") == []


@pytest.mark.parametrize(
    ("where", "needle"),
    [
        ("onto a folder", "it is a folder; give a file path"),
        ("beside a file", "a part of the path is a file"),
        ("under /proc", "cannot write the file"),
        ("onto a FIFO", "is not a regular file"),
    ],
)
def test_atomic_write_refuses_unwritable_paths(tmp_path: Path, where: str, needle: str) -> None:
    from spillover._io import atomic_write_text

    (tmp_path / "folder").mkdir()
    (tmp_path / "file.txt").write_text("keep")
    os.mkfifo(tmp_path / "fifo")
    path = {
        "onto a FIFO": tmp_path / "fifo",
        "onto a folder": tmp_path / "folder",
        "beside a file": tmp_path / "file.txt" / "out.json",
        "under /proc": Path("/proc/no-such/out.json"),
    }[where]
    before = _listing(tmp_path)
    with pytest.raises(ConfigError) as info:
        atomic_write_text(path, "{}")
    assert needle in str(info.value) and str(path) in str(info.value)
    assert _listing(tmp_path) == before and (tmp_path / "file.txt").read_text() == "keep"


def test_atomic_write_takes_a_name_as_long_as_the_file_system_allows(tmp_path: Path) -> None:
    from spillover._io import atomic_write_text

    path = tmp_path / ("x" * 250)
    atomic_write_text(path, "ok")
    assert path.read_text() == "ok" and _listing(tmp_path) == [path.name]
