"""Small helpers shared by every stage: atomic writes, folder replacement, hashing, strict JSON."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` on success.

    Readers never see a half-written file: on any exception the temporary file
    is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
        os.replace(tmp, target)
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


def replace_dir(src: Path, target: Path) -> None:
    """Rename folder ``src`` onto ``target``; an existing ``target`` is swapped out, then removed.

    Readers see either the old folder or the new one, never a mix.
    """
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
