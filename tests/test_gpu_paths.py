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


@pytest.fixture
def one_process_group(tmp_path: Path) -> Any:
    """A real (one-process, gloo) process group, as under `accelerate launch`."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield dist
    finally:
        dist.destroy_process_group()


FSDP_EFFICIENT = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
    "ACCELERATE_MIXED_PRECISION": "no",
}


def _train_cfg(model: Path, out: Path, **kw: Any) -> AlignConfig:
    base: dict[str, Any] = {"max_steps": 1, "batch_size": 2, "lora_r": 4, "bf16": False}
    base.update(kw)
    return AlignConfig(
        model=str(model), output_dir=str(out), device="cpu", target_modules=("q_proj",), **base
    )


def test_fsdp_efficient_loading_leaves_the_other_processes_weights_on_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_process_group: Any
) -> None:
    """With fsdp_cpu_ram_efficient_loading, transformers 4.56-4.57 leave the weights of every
    process but the first on `meta` (5.x reads them on every process); the loader must not
    move them (`.to(device)` fails on meta: "Cannot copy out of meta tensor") and FSDP sends
    the first process's weights to the others."""
    import torch
    import transformers

    from spillover.align.train import load_for_training
    from tiny_models import make_tiny

    model_dir = make_tiny(tmp_path / "tiny")
    for key, value in FSDP_EFFICIENT.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LOCAL_RANK", "1")  # another process of the machine
    cfg = _train_cfg(model_dir, tmp_path / "a", dtype="float32")
    model, _, _ = load_for_training(cfg, "cpu")  # the installed transformers' own way
    assert {p.device.type for p in model.parameters()} <= {"meta", "cpu"}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def on_meta(*args: Any, **kwargs: Any) -> Any:  # what transformers 4.x gives that process
        config = transformers.AutoConfig.from_pretrained(args[0])
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", on_meta)
    model, _, _ = load_for_training(cfg, "cpu")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", real)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")  # unsharded: moved to the device as before
    model, _, _ = load_for_training(cfg, "cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_sharded_training_arguments_come_before_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ZeRO-3 the training arguments make transformers' DeepSpeed config live, which
    makes from_pretrained load under zero.Init; unsharded, none are made early."""
    from spillover.align.trainer import sharded_training_args

    cfg = _train_cfg(Path("m"), tmp_path / "a")
    assert sharded_training_args(cfg, tmp_path / "c", "cpu") is None
    pytest.importorskip("deepspeed")
    from transformers.integrations import is_deepspeed_zero3_enabled

    for key, value in {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_MIXED_PRECISION": "no",
    }.items():
        monkeypatch.setenv(key, value)
    assert not is_deepspeed_zero3_enabled()
    args = sharded_training_args(cfg, tmp_path / "c", "cpu")
    assert args is not None and is_deepspeed_zero3_enabled()
    del args
    import gc

    gc.collect()
    assert not is_deepspeed_zero3_enabled()  # a weak reference: alive only with the args


def test_adapters_take_the_base_dtype_under_fsdp(tmp_path: Path) -> None:
    """TRL's frozen reference adapter (PEFT's default autocast: float32 on a bf16 base) would
    sit beside the bf16 base in FSDP1's FlatParameters: "Must flatten tensors with uniform
    dtype". Under FSDP the frozen LoRA weights take the base dtype (the trainable ones keep
    float32 updates), under ZeRO-3 all of them; unsharded, nothing changes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from spillover.align.sharding import Launch, uniform_adapter_dtype
    from tiny_models import make_tiny

    base = AutoModelForCausalLM.from_pretrained(make_tiny(tmp_path / "t"), dtype=torch.bfloat16)
    lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    model.add_adapter("ref", lora)  # what TRL does for a resumed adapter

    def lora_dtypes() -> set[torch.dtype]:
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

    def dtypes(adapter: str) -> set[torch.dtype]:
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n and adapter in n}

    assert lora_dtypes() == {torch.float32}
    assert uniform_adapter_dtype(model, Launch()) == 0
    assert uniform_adapter_dtype(model, Launch(kind="fsdp")) == 4  # ref's A and B, 2 layers
    assert dtypes(".ref.") == {torch.bfloat16} and dtypes(".default.") == {torch.float32}
    assert uniform_adapter_dtype(model, Launch(kind="deepspeed", zero_stage=3)) == 4
    assert lora_dtypes() == {torch.bfloat16}


SHARED_CHECK = """\
import sys
from pathlib import Path

from accelerate import PartialState

from spillover._io import check_shared_dir
from spillover.errors import ConfigError

state = PartialState(cpu=True)
base = Path(sys.argv[1])
# "same": one folder for all; else each process its own, as on machines without a shared disk
folder = base if sys.argv[2] == "same" else base / f"machine{state.process_index}"
try:
    check_shared_dir(folder, state, what="the adapter folder", wait=1.0)
    line = f"rank {state.process_index}: shared"
except ConfigError as exc:
    line = f"rank {state.process_index}: error: {exc}"
# one file per process: two processes printing to one pipe may interleave their lines
Path(sys.argv[3], f"rank{state.process_index}.txt").write_text(line)
"""


def test_every_process_of_a_launch_must_see_one_folder(tmp_path: Path) -> None:
    """Two gloo processes: a folder both see passes (and its marker is removed); folders that
    differ (machines without a shared filesystem) fail on both processes, in one line."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(SHARED_CHECK)
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    outs = {}
    for mode in ("same", "apart"):
        folder = tmp_path / mode
        results = tmp_path / f"{mode}-results"
        results.mkdir()
        for _ in range(2):
            proc = subprocess.run(
                [*launch, str(script), str(folder), mode, str(results)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            # gloo's rendezvous now and then aborts a process before the script runs
            # ("terminate called without an active exception"): that launch is made again
            if proc.returncode == 0 or any(results.iterdir()):
                break
            if "terminate called without an active exception" not in proc.stderr:
                break
        assert proc.returncode == 0, proc.stderr[:3000]
        outs[mode] = sorted(p.read_text() for p in results.iterdir())
    assert outs["same"] == ["rank 0: shared", "rank 1: shared"]
    assert not list((tmp_path / "same").iterdir())  # the marker is gone
    assert len(outs["apart"]) == 2
    for line in outs["apart"]:
        assert "not one folder for every process of this launch" in line
        assert "the adapter folder must be on a filesystem all machines share" in line


def test_the_shipped_launch_configs_hard_code_no_process_counts() -> None:
    """accelerate refuses a config without num_processes unless --num_processes is given, so
    no launch silently assumes 8 GPUs; the multi-node config takes the machines' count and
    rank from the launch line (the environment), and says so."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    names = sorted(p.name for p in folder.glob("*.yaml"))
    assert "multi_node_zero3.yaml" in names
    for name in names:
        raw = yaml.safe_load((folder / name).read_text())
        assert "num_processes" not in raw, name
        assert load_config_from_file(str(folder / name)).num_processes == -1, name
    text = (folder / "multi_node_zero3.yaml").read_text()
    raw = yaml.safe_load(text)
    assert not {"num_machines", "machine_rank", "main_process_ip"} & set(raw)
    for flag in ('--num_machines "$NNODES"', '--machine_rank "$NODE_RANK"', "--main_process_ip"):
        assert flag in text
