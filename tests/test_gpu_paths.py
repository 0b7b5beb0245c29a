"""The GPU stages' paths that can run on a CPU: warm-up, presets under a launch, the 4-bit
device map, the error boundary, the vLLM engine's release, sharded loading, adapter dtypes
and the shared-folder check of multi-node runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spillover.align import AlignConfig


def test_the_warm_up_is_a_share_of_the_steps_with_either_transformers() -> None:
    from spillover.align.trainer import warmup_args

    # transformers 4.x: an integer warmup_steps would read 0.1 as a step count
    assert warmup_args(0.1, frozenset({"warmup_ratio", "warmup_steps"})) == {"warmup_ratio": 0.1}
    # transformers 5: no warmup_ratio; a warmup_steps below 1 is the share
    assert warmup_args(0.1, frozenset({"warmup_steps"})) == {"warmup_steps": 0.1}


def test_the_installed_transformers_warms_up_a_tenth_of_the_steps(tmp_path: Path) -> None:
    from spillover.align.trainer import trl_config

    cfg = AlignConfig(
        model="m", output_dir=str(tmp_path / "a"), warmup_ratio=0.1, max_steps=40, device="cpu"
    )
    args = trl_config(cfg, tmp_path / "ckpt", device="cpu", max_length=64)
    assert args.get_warmup_steps(40) == 4
