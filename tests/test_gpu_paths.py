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


OOM_TEXT = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
    "of which 1.06 GiB is free."
)


def _oom(*args: Any, **kwargs: Any) -> Any:
    import torch

    raise torch.OutOfMemoryError(OOM_TEXT)


def test_a_gpu_out_of_memory_is_one_line_naming_the_settings(
    mini_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's OutOfMemoryError is a RuntimeError: before, it ended in a traceback."""
    import spillover.evaluate.run as run
    from cli_runner import invoke
    from tiny_models import make_tiny

    monkeypatch.setattr(run, "load_for_eval", _oom)
    model = make_tiny(tmp_path / "tiny")
    res = invoke(
        ["eval", "--model", model, "--bbq-dir", mini_dir, "--allow-unverified", "--all",
         "--out", tmp_path / "p.parquet"]
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    tail = res.output[res.output.index("error:") :].strip()
    assert "\n" not in tail
    assert tail.startswith("error: the GPU ran out of memory (CUDA out of memory. Tried")
    for knob in ("--batch-size", "--grad-accum", "--batch-tokens", "--gpu-memory-utilization"):
        assert knob in tail


def test_other_errors_keep_their_traceback() -> None:
    from spillover.cli._common import accelerator_error

    assert accelerator_error(RuntimeError("a bug")) is None
    assert accelerator_error(ValueError("CUDA out of memory")) is None  # only torch's class


FAILING_RANK = """\
import atexit
import sys
import time

import spillover.evaluate.run as run
from spillover.cli import main

atexit.register(time.sleep, 600)  # a process-group teardown that never returns


def oom(*args, **kwargs):
    import torch

    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


run.run_evaluation = oom  # before any process group: there is no peer here
sys.argv = ["spillover", *sys.argv[1:]]
main()
"""


def test_a_failing_process_of_a_launch_ends_at_once(mini_dir: Path, tmp_path: Path) -> None:
    """Under a multi-process launch the failing process prints its line and exits at once,
    past a teardown that would block (NCCL's, with the other ranks waiting in a collective),
    so the launcher sees the failure and stops the others."""
    import os
    import subprocess
    import sys

    from tiny_models import make_tiny

    script = tmp_path / "rank.py"
    script.write_text(FAILING_RANK)
    model = make_tiny(tmp_path / "tiny")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    env.pop("MASTER_ADDR", None)
    args = ["eval", "--model", str(model), "--bbq-dir", str(mini_dir), "--allow-unverified",
            "--device", "cpu", "--all", "--out", str(tmp_path / "p.parquet")]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "the GPU ran out of memory" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
