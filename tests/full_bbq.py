"""Where the full BBQ is for the tests that need it (read once, before any test runs).

``$SPILLOVER_BBQ_DIR`` when set; else the user's BBQ cache (``$SPILLOVER_CACHE/bbq`` or
``~/.cache/spillover/bbq``) when it holds all twelve files and each matches its pinned
SHA-256, checked as :func:`spillover.data.fetch_bbq` checks its cache (nothing is
downloaded); else None, and those tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

from spillover._io import sha256_lf
from spillover.data.sources import BBQ_SHA256, FileCheck, bbq_cache_dir, locate_files
from spillover.errors import DataError


def verified_cache(cache_root: Path | None = None) -> Path | None:
    """The BBQ folder under ``cache_root`` (default: the user's cache root) when all of
    BBQ's files are there and verify against the pinned digests, else None."""
    folder = bbq_cache_dir(cache_root)
    try:
        found = locate_files(folder, BBQ_SHA256)
        if len(found) < len(BBQ_SHA256):
            return None
        checks = [
            FileCheck(name, str(path), sha256_lf(path.read_bytes()), BBQ_SHA256[name])
            for name, path in found.items()
        ]
    except (OSError, DataError):
        return None
    return folder if all(c.verified for c in checks) else None


def _resolve() -> Path | None:
    explicit = os.environ.get("SPILLOVER_BBQ_DIR")
    return Path(explicit) if explicit else verified_cache()


FULL_BBQ_DIR: Path | None = _resolve()
"""The full BBQ folder, or None."""
