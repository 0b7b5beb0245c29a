"""A command's output files: every one of them is written, or none.

Each output is first written in full to a temporary file beside its target (missing
folders are made); only when every one of them is on disk are they renamed over their
targets. A failure at any step removes the temporary files and the folders made for them,
puts back any target already replaced (from a hard link to its old file, where the file
system has them) and leaves the others untouched. Text is written as UTF-8; a lone
surrogate (from a file name that is not UTF-8) is written as its ``\\udcxx`` escape.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class Output:
    """One file a command writes: the option that named it, the path and the text."""

    option: str
    path: Path
    text: str = ""


@dataclass
class _Staged:
    made_dirs: list[Path] = field(default_factory=list)
    temps: dict[Path, Path] = field(default_factory=dict)  # target -> temporary file
    # replaced target -> whether it existed, and a link to its old file (None: no link)
    replaced: dict[Path, tuple[bool, Path | None]] = field(default_factory=dict)


def _cannot(out: Output, why: str) -> ConfigError:
    return ConfigError(f"{out.option} {out.path}: {why}; choose another path for {out.option}")


def check_outputs(outputs: Sequence[Output]) -> None:
    """Refuse, before any work, output paths that cannot be written.

    Refused: a path that is a folder or another non-regular file (a device, a FIFO); a path
    under an existing file (``somefile/x.json``); a folder where no file can be made (read
    only, ``/proc``; tried with a temporary file, removed at once); two outputs naming the
    same file.

    Raises:
        ConfigError: naming the option and the path.
    """
    seen: dict[str, Output] = {}
    for out in outputs:
        key = os.path.realpath(out.path)
        if key in seen:
            raise ConfigError(
                f"{seen[key].option} and {out.option} both name {out.path}; give each its own file"
            )
        seen[key] = out
        try:
            _check_one(out)
        except OSError as exc:  # a name too long, a symlink loop, ...
            reason = exc.strerror or type(exc).__name__
            raise _cannot(out, f"cannot be written ({reason})") from None


def _check_one(out: Output) -> None:
    if out.path.is_dir():
        raise _cannot(out, "is a folder; expected a file path")
    if out.path.exists() and not out.path.is_file():
        raise _cannot(out, "exists and is not a regular file")
    parent = out.path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise _cannot(out, f"{parent} is not a folder")
    _probe(out, parent)


def _temp_prefix(out: Output) -> str:
    # a short prefix: the temporary name must fit where the target's name fits
    return f".{out.path.name[:100]}."


def _probe(out: Output, folder: Path) -> None:
    """Make and remove a temporary file in ``folder``: can the output be written there?"""
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".tmp", dir=folder)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise _cannot(out, f"cannot write in {folder} ({reason})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def write_outputs(outputs: Sequence[Output]) -> None:
    """Write every output, or none of them (see the module's docstring).

    Raises:
        ConfigError: a path that cannot be written, naming the option, the path and why;
            nothing is left behind and no existing file is changed.
    """
    check_outputs(outputs)
    staged = _Staged()
    current = outputs[0] if outputs else None
    try:
        for current in outputs:
            _stage(current, staged)
        for current in outputs:
            _commit(current.path, staged)
    except OSError as exc:
        _roll_back(staged)
        assert current is not None
        reason = exc.strerror or type(exc).__name__
        raise _cannot(current, f"cannot write ({reason})") from None
    except BaseException:
        _roll_back(staged)
        raise
    for _, backup in staged.replaced.values():
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()


def _stage(out: Output, staged: _Staged) -> None:
    parent = out.path.parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir()
        staged.made_dirs.append(folder)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.path.parent)
    tmp = Path(name)
    staged.temps[out.path] = tmp
    with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace", newline="") as fh:
        fh.write(out.text)
        fh.flush()
        os.fsync(fh.fileno())
    # mkstemp creates 0600 files; give outputs the usual umask-based mode
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _commit(target: Path, staged: _Staged) -> None:
    existed = os.path.lexists(target)
    backup: Path | None = None
    if existed:
        # a hard link keeps the old file, to put back if a later rename fails
        backup = target.with_name(f"{staged.temps[target].name}.old")
        try:
            os.link(target, backup, follow_symlinks=False)
        except OSError:
            backup = None
    os.replace(staged.temps[target], target)
    del staged.temps[target]
    staged.replaced[target] = (existed, backup)


def _roll_back(staged: _Staged) -> None:
    for tmp in staged.temps.values():
        with contextlib.suppress(OSError):
            tmp.unlink()
    for target, (existed, backup) in reversed(staged.replaced.items()):
        with contextlib.suppress(OSError):
            if backup is not None:
                os.replace(backup, target)
            elif not existed:
                target.unlink()
    for folder in reversed(staged.made_dirs):
        with contextlib.suppress(OSError):
            folder.rmdir()
