"""Time to load and verify all of BBQ, with and without the parsed-items cache.

Each measurement runs in a fresh Python process (``spillover.data`` imported, then
``load_bbq`` timed): first with an empty cache root (hash, parse and validate every file,
then write the cache entry), then again with that cache (hash every file, read the entry).
Best of ``--repeat`` runs each.

Example::

    python bench/bbq_load.py --bbq-dir <bbq>
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import sys, time
from spillover.data import load_bbq
t = time.perf_counter()
data = load_bbq(sys.argv[1], cache_dir=sys.argv[2])
print(f"{time.perf_counter() - t:.3f} {len(data)} {data.verified}")
"""


def _run(bbq: str, cache: Path) -> tuple[float, int, bool]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, bbq, str(cache)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[0]), int(out[1]), out[2] == "True"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bbq-dir", default=os.environ.get("SPILLOVER_BBQ_DIR"))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not args.bbq_dir:
        raise SystemExit("give --bbq-dir or set SPILLOVER_BBQ_DIR")
    cold: list[float] = []
    warm: list[float] = []
    for _ in range(args.repeat):
        cache = Path(tempfile.mkdtemp(prefix="spillover-bbq-bench-"))
        try:
            seconds, n, verified = _run(args.bbq_dir, cache)
            cold.append(seconds)
            warm.append(_run(args.bbq_dir, cache)[0])
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    print(f"items: {n}, all files verified: {verified}, best of {args.repeat}")
    print(f"no parsed cache (parse + validate + write entry): {min(cold):.2f} s")
    print(f"parsed cache (hash files + read entry):           {min(warm):.2f} s")


if __name__ == "__main__":
    main()
