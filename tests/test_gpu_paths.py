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


@pytest.mark.parametrize("model", ["mistral-7b", "llama-3.1-8b", "qwen-2.5-7b"])
def test_a_7b_preset_passes_a_plain_accelerate_launch(
    model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`accelerate launch` without a config exports mixed precision `no`; the presets' bf16
    is a default that follows it, not an explicit --bf16 that the launch would refuse."""
    import spillover.models
    from spillover.align.sharding import Launch, launch_bf16, launch_from_env
    from spillover.align.trainer import check_environment, resolve_bf16

    cfg = AlignConfig.from_preset(model, tmp_path / "a", device="cpu")
    assert cfg.bf16 is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert check_environment(cfg) == "cpu"  # refused before: "drop --bf16"
    assert launch_bf16(cfg.bf16, launch_from_env()) is False
    # without a launch, bf16 autocast is on wherever bf16 is fast (every bf16 GPU)
    monkeypatch.setattr(spillover.models, "fast_bf16", lambda device: device == "cuda")
    assert resolve_bf16(launch_bf16(cfg.bf16, Launch()), "cuda") is True
    # an explicit --bf16 against the launch is still refused
    from spillover.errors import ConfigError

    with pytest.raises(ConfigError, match="drop --bf16"):
        check_environment(AlignConfig.from_preset(model, tmp_path / "a", device="cpu", bf16=True))


def test_a_4bit_load_under_data_parallelism_goes_to_the_local_gpu() -> None:
    from spillover.align.sharding import four_bit_device_map

    # {"": "cuda"} would put every process's copy on GPU 0 (transformers maps only the bare
    # string "cuda" to the local rank); accelerate then refuses the 4-bit model
    assert four_bit_device_map("cuda", num_processes=4, local_process_index=3) == {"": 3}
    assert four_bit_device_map("cuda:0", num_processes=2, local_process_index=1) == {"": 1}
    assert four_bit_device_map("cuda", num_processes=1, local_process_index=0) == {"": "cuda"}
    assert four_bit_device_map("cuda:1", num_processes=1, local_process_index=0) == {"": "cuda:1"}
