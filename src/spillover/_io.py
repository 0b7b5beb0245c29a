"""Small helpers shared by every stage: atomic writes, folder replacement, hashing, strict JSON."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import numbers
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20


def _cannot_write(target: Path, exc: OSError) -> Exception:
    from .errors import ConfigError

    if target.is_dir():
        reason = "it is a folder; give a file path"
    elif any(p.exists() and not p.is_dir() for p in target.parents):
        reason = "a part of the path is a file, not a folder"
    else:
        reason = exc.strerror or str(exc)
    return ConfigError(f"{target}: cannot write the file ({reason}); choose another path")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` on success.

    Readers never see a half-written file: on any exception the temporary file
    is removed and ``path`` is left as it was. A path that cannot be written (its
    folder cannot be made, it is a folder, the disk refuses) raises a one-line
    :class:`~spillover.errors.ConfigError` naming ``path``.
    """
    target = Path(path)
    if target.exists() and not target.is_file() and not target.is_dir():
        from .errors import ConfigError

        # renaming over a device or a FIFO would replace it (as root: /dev/null itself)
        raise ConfigError(f"{target}: exists and is not a regular file; choose another path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # a short prefix: the temporary name must fit where the target's name fits
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{target.name[:100]}.", suffix=".tmp", dir=target.parent
        )
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    tmp = Path(tmp_name)
    try:
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give outputs the usual umask-based mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise _cannot_write(target, exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_open(path, "w") as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def sha256_lf(data: bytes) -> str:
    """SHA-256 of ``data`` after normalising CRLF line endings to LF.

    BBQ is pinned by the digests of its LF files; some redistributions ship the
    same bytes with CRLF endings, which this normalisation makes comparable.
    """
    return hashlib.sha256(data.replace(b"\r\n", b"\n")).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Plain SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


OWNER_MARKER = ".spillover-owned"
"""File spillover writes into every folder it builds and may later replace (pairs, adapters).

``--overwrite`` replaces a folder only when this marker is in it, so a mistyped
``--out`` can never delete a folder spillover did not make."""


def check_output_dir(target: Path, kind: str, *, overwrite: bool) -> None:
    """Refuse an output folder that spillover may not write or replace.

    Allowed: a path that does not exist, an empty folder, or (with ``overwrite``) a
    folder holding :data:`OWNER_MARKER` of the same ``kind``. Refused, with the path
    and how to proceed: a file, a non-empty folder without ``overwrite``, a folder
    spillover did not make, the working directory or one of its parents.

    Raises:
        ConfigError: the folder may not be used.
    """
    from .errors import ConfigError

    if not target.exists() and not target.is_symlink():
        return
    if not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder; choose another --out")
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ConfigError(
            f"{target}: is the working directory or one of its parents; "
            "choose a new folder for --out"
        )
    if not any(target.iterdir()):
        return
    if not overwrite:
        raise ConfigError(f"{target}: already exists; choose another --out or pass --overwrite")
    marker = target / OWNER_MARKER
    try:
        owner = json.loads(marker.read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        owner = None
    if owner != kind:
        what = "a folder spillover did not make" if owner is None else f"a spillover {owner} folder"
        raise ConfigError(
            f"{target}: --overwrite replaces only a {kind} folder made by spillover, and this "
            f"is {what} (no {OWNER_MARKER} marker of kind {kind!r}); choose another --out, or "
            "remove the folder yourself if it may go"
        )


def mark_owned(folder: Path, kind: str) -> None:
    """Write :data:`OWNER_MARKER` (``{"kind": kind}``) into a folder spillover built."""
    atomic_write_json(folder / OWNER_MARKER, {"kind": kind})


def replace_dir(src: Path, target: Path, kind: str | None = None) -> None:
    """Rename folder ``src`` onto ``target``; an existing ``target`` is swapped out, then removed.

    Readers see either the old folder or the new one, never a mix. With ``kind``, the
    folder is first marked as spillover's (:func:`mark_owned`), so that a later
    ``--overwrite`` may replace it.
    """
    if kind is not None:
        mark_owned(src, kind)
    if not target.exists():
        os.replace(src, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    old.rmdir()
    os.replace(target, old)
    try:
        os.replace(src, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def scratch_dir(target: Path) -> Path:
    """A new scratch folder beside ``target`` (``.<name>.tmp*``), after removing the scratch
    folders an interrupted earlier writer left there (:func:`remove_stale`).

    Raises:
        ConfigError: the folder beside ``target`` cannot be created or written.
    """
    from .errors import ConfigError

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.parent, f".{target.name}.tmp")
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    except OSError as exc:
        raise ConfigError(
            f"{target}: cannot write there ({exc.strerror or exc}); choose another --out"
        ) from None


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove leftover temporary folders ``parent/<prefix>*`` of an interrupted writer.

    Only names spillover gives its scratch folders (a leading dot and the target's
    name) are matched, so nothing a user made is touched. Returns what was removed.
    """
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    for p in sorted(parent.glob(f"{glob.escape(prefix)}*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def json_safe(obj: Any, *, other: Callable[[Any], Any] | None = None) -> Any:
    """``obj`` as strict JSON data.

    Mappings become dicts with string keys; lists, tuples and sets become lists; numpy
    scalars and arrays become Python values; NaN, infinities and pandas' missing values
    become None. Anything else is returned as is, or passed to ``other`` (e.g. ``str``).
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v, other=other) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [json_safe(v, other=other) for v in obj]
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return json_safe(obj.tolist(), other=other)
    if isinstance(obj, bool):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    if type(obj).__name__ in ("NAType", "NaTType"):  # pandas' missing values
        return None
    return other(obj) if other is not None else obj


SHARED_MARKER_PREFIX = ".spillover-shared-"
"""Name prefix of the marker file :func:`check_shared_dir` writes (and removes)."""


def check_shared_dir(folder: Path, state: Any, *, what: str, wait: float = 15.0) -> None:
    """Check that every process of a multi-process launch sees ``folder`` as one folder.

    Several processes (and, across machines, several filesystems) must meet in one folder
    where a training or an evaluation is split: the first process decides what is resumed
    and writes what the others read (datasets cached by TRL, checkpoints, the gathered
    adapter, the predictions' part files). On machines that do not share that folder the
    others would read nothing, or their own stale copy. The first process writes a marker
    named by a fresh token it sends to all; every process looks for it (for up to ``wait``
    seconds: network filesystems may cache a missing name for a few seconds), and all of
    them learn which machines did not see it. One process: nothing to check.

    Args:
        folder: The folder (created where missing).
        state: accelerate's ``PartialState`` of the launch.
        what: What is kept there, for the message.

    Raises:
        ConfigError: on every process, naming the machines that do not see the marker.
    """
    if state.num_processes <= 1:
        return
    import socket
    import time
    import uuid

    from accelerate.utils import broadcast_object_list, gather_object

    from .errors import ConfigError

    token: list[str | None] = [uuid.uuid4().hex if state.is_main_process else None]
    broadcast_object_list(token, from_process=0)
    marker = folder / f"{SHARED_MARKER_PREFIX}{token[0]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if state.is_main_process:
            marker.write_text(str(token[0]), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{folder}: cannot write there ({exc.strerror or exc})") from None
    state.wait_for_everyone()
    deadline = time.monotonic() + wait
    while True:
        try:
            seen = marker.read_text(encoding="utf-8") == token[0]
        except OSError:
            seen = False
        if seen or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    verdicts = gather_object([(socket.gethostname(), seen)])
    state.wait_for_everyone()
    if state.is_main_process:
        marker.unlink(missing_ok=True)
    blind = sorted({host for host, ok in verdicts if not ok})
    if blind:
        raise ConfigError(
            f"{folder}: not one folder for every process of this launch (the processes on "
            f"{', '.join(blind)} do not see the file the first process wrote there); "
            f"{what} must be on a filesystem all machines share (NFS, Lustre, ...): "
            "choose such an --out"
        )
