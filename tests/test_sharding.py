"""Sharded launches: what `accelerate launch` says, what is refused, how the adapter is saved."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_runner import invoke
from spillover.align import train_adapter
from spillover.align.sharding import (
    Launch,
    check_launch,
    full_state_dict_for_saving,
    launch_bf16,
    launch_from_env,
    missing_adapter_files,
)
from spillover.errors import ConfigError, ModelError
from test_align import cfg_for, logged_losses, lora_weights, one_process_reference, tiny_pairs
from tiny_models import make_tiny

ZERO3 = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_MIXED_PRECISION": "bf16",
}
FSDP = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false",
    "ACCELERATE_MIXED_PRECISION": "bf16",
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def test_the_launch_is_read_from_accelerates_environment() -> None:
    z3 = launch_from_env(ZERO3)
    assert (z3.kind, z3.zero_stage, z3.sharded, z3.zero3) == ("deepspeed", 3, True, True)
    z2 = launch_from_env({**ZERO3, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert (z2.sharded, z2.zero3, z2.describe()) == (False, False, "DeepSpeed ZeRO-2")
    fsdp = launch_from_env(FSDP)
    assert (fsdp.kind, fsdp.sharded, fsdp.fsdp_state_dict_type) == (
        "fsdp",
        True,
        "SHARDED_STATE_DICT",
    )
    assert fsdp.mixed_precision == "bf16" and not fsdp.fsdp_cpu_ram_efficient_loading
    plain = launch_from_env({"ACCELERATE_MIXED_PRECISION": "no"})
    assert (plain.kind, plain.sharded, plain.mixed_precision) == ("single", False, "no")
    assert launch_from_env({}) == Launch()
    # accelerate trains an FSDP config launched with --cpu as plain data parallelism
    cpu = launch_from_env({**FSDP, "ACCELERATE_USE_CPU": "True"})
    assert (cpu.kind, cpu.sharded, cpu.describe()) == ("single", False, "one process")
    check_launch(cpu, merge=True, load_in_4bit=False, bf16=None)
    assert launch_from_env({**FSDP, "ACCELERATE_USE_CPU": "False"}).sharded


@pytest.mark.parametrize(
    ("env", "kwargs", "expect"),
    [
        (FSDP, {"merge": True}, "`merge`=True under FSDP"),
        (ZERO3, {"merge": True}, "`merge`=True under DeepSpeed ZeRO-3"),
        (FSDP, {"load_in_4bit": True}, "`load_in_4bit`=True under FSDP"),
        (ZERO3, {"load_in_4bit": True}, "`load_in_4bit`=True under DeepSpeed ZeRO-3"),
        (ZERO3, {"bf16": False}, "`bf16`=False but the launch config's mixed_precision is bf16"),
        (
            {**FSDP, "ACCELERATE_MIXED_PRECISION": "no"},
            {"bf16": True},
            "mixed_precision is 'no'",
        ),
    ],
)
def test_what_a_launch_cannot_honour_is_refused(
    env: dict[str, str], kwargs: dict[str, object], expect: str
) -> None:
    args = {"merge": False, "load_in_4bit": False, "bf16": None, **kwargs}
    with pytest.raises(ConfigError) as info:
        check_launch(launch_from_env(env), **args)  # type: ignore[arg-type]
    assert expect in str(info.value)
    assert "\n" not in str(info.value)


def test_what_a_launch_allows_passes() -> None:
    z2 = launch_from_env({**ZERO3, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    check_launch(z2, merge=True, load_in_4bit=True, bf16=True)  # ZeRO-2 does not shard weights
    check_launch(launch_from_env(FSDP), merge=False, load_in_4bit=False, bf16=True)
    check_launch(launch_from_env(ZERO3), merge=False, load_in_4bit=False, bf16=None)


def test_the_launch_configs_mixed_precision_decides_an_unset_bf16() -> None:
    assert launch_bf16(None, launch_from_env(ZERO3)) is True
    assert (
        launch_bf16(None, launch_from_env({**ZERO3, "ACCELERATE_MIXED_PRECISION": "no"})) is False
    )
    assert launch_bf16(None, Launch()) is None
    assert launch_bf16(False, Launch(mixed_precision="no")) is False


def test_the_shipped_fsdp_config_is_not_refused() -> None:
    """It loads the weights on the first process only (one host copy per machine); FSDP
    then sends them to the others (sync_module_states)."""
    import yaml

    cfg = yaml.safe_load(Path("configs/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    assert cfg["fsdp_cpu_ram_efficient_loading"] is True
    assert cfg["fsdp_sync_module_states"] is True
    env = {
        "ACCELERATE_USE_FSDP": "true",
        "FSDP_CPU_RAM_EFFICIENT_LOADING": str(cfg["fsdp_cpu_ram_efficient_loading"]).lower(),
    }
    check_launch(launch_from_env(env), merge=False, load_in_4bit=False, bf16=None)


def test_fsdp_saving_switches_accelerates_plugin_to_a_full_state_dict() -> None:
    """`Trainer.save_model` under FSDP writes nothing unless the state dict type is full."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(state_dict_type="SHARDED_STATE_DICT")
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)

    class _State:
        fsdp_plugin = plugin

    class _Accelerator:
        state = _State()

    class _Trainer:
        accelerator = _Accelerator()

    full_state_dict_for_saving(_Trainer(), Launch())  # not FSDP: untouched
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    full_state_dict_for_saving(_Trainer(), launch_from_env(FSDP))
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def test_a_training_whose_save_writes_no_adapter_fails_and_leaves_nothing(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FSDP's silent failure mode (save_model writes nothing) is caught, not renamed into place."""
    import transformers

    real = transformers.Trainer.save_model

    def save_nothing(self, output_dir=None, _internal_call=False):  # type: ignore[no-untyped-def]
        if _internal_call:  # checkpoints still save
            return real(self, output_dir, _internal_call=True)
        return None

    monkeypatch.setattr(transformers.Trainer, "save_model", save_nothing)
    out = tmp_path / "adapter"
    with pytest.raises(ModelError, match=r"adapter_config\.json, adapter_model\.safetensors"):
        train_adapter(tiny_pairs(), cfg_for(tiny_dir, out, "dpo", max_steps=1))
    # no adapter folder, no scratch; the checkpoints stay to resume from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.checkpoints"]
    assert missing_adapter_files(tmp_path) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_a_resumed_adapter_keeps_the_base_dtype_under_zero3(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT autocasts a loaded adapter to float32 on a bf16 base; under ZeRO-3 that mix fails
    at the first optimizer step, so the adapter is loaded in the base's dtype there."""
    from spillover.align.train import load_for_training

    first = tmp_path / "first"
    train_adapter(tiny_pairs(), cfg_for(tiny_dir, first, "dpo", max_steps=1))
    cfg = cfg_for(tiny_dir, tmp_path / "o", "dpo", dtype="bfloat16", adapter=str(first))

    def lora_dtypes() -> set[torch.dtype]:
        model, _, _ = load_for_training(cfg, "cpu")
        return {p.dtype for n, p in model.named_parameters() if "lora_" in n}

    assert lora_dtypes() == {torch.float32}  # PEFT's default on one process
    for key, value in ZERO3.items():
        monkeypatch.setenv(key, value)
    assert lora_dtypes() == {torch.bfloat16}
    assert lora_weights(first)  # the adapter it started from is untouched


def test_the_cli_refuses_merge_under_a_sharded_launch_in_one_line(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    tiny_pairs().to_parquet(pairs / "train.parquet")
    (pairs / "split.json").write_text(json.dumps({"heldout_templates": {}}))
    for key, value in FSDP.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "adapter"
    res = invoke(
        ["align", "--model", str(tiny_dir), "--pairs", str(pairs), "--merge", "--device",
         "cpu", "--out", str(out)]
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "`merge`=True under FSDP" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()


def test_the_compact_lm_head_stays_off_sharded_and_non_cpu_weights() -> None:
    from spillover.align.packing import _sharded

    weight = torch.nn.Parameter(torch.zeros(4, 3))
    assert not _sharded(weight)
    weight.ds_id = 7  # type: ignore[attr-defined]  # how DeepSpeed ZeRO-3 marks a partition
    assert _sharded(weight)
    assert _sharded(torch.nn.Parameter(torch.zeros(0)))  # a ZeRO-3 shard's local data


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ZERO3_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: true
"""
"""configs/accelerate/deepspeed_zero3.yaml for two CPU processes (no bf16 on this CPU)."""
ENGINE_PROBE = """\
import sys

import spillover.align.train as train
from spillover.cli import main

real = train._run_training
real_load = train.load_for_training


def load(*args, **kwargs):
    model, tok, prov = real_load(*args, **kwargs)
    weight = next(p for n, p in model.named_parameters() if "lora_" not in n)
    print(f"loaded partitioned: {hasattr(weight, 'ds_id')}")
    return model, tok, prov


def run(trainer, *args, **kwargs):
    out = real(trainer, *args, **kwargs)
    weight = next(trainer.model.parameters())
    print(f"engine: {type(trainer.model_wrapped).__name__}, partitioned: {hasattr(weight, 'ds_id')}")
    return out


train._run_training = run
train.load_for_training = load
sys.argv = ["spillover", *sys.argv[1:]]
main()
"""
"""`spillover align`, printing whether the weights were ZeRO-3 partitions as soon as they
were loaded (``zero.Init``: no process holds a whole copy), and after training what wraps
the model and whether its parameters are partitions (DeepSpeed marks those with ``ds_id``)."""


@pytest.mark.skipif(
    not HAS_DEEPSPEED,
    reason="deepspeed is not installed (pip install --no-build-isolation deepspeed; on a "
    "machine without CUDA it runs on DeepSpeed's CPU accelerator)",
)
def test_two_process_zero3_training_saves_the_whole_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch` with a ZeRO-3 config, 2 CPU processes x batch 2: the parameters are
    really partitioned (DeepSpeed's engine), the saved adapter has the full LoRA shapes,
    loads, and equals one process with batch 4."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common, one = one_process_reference(tiny_dir, tmp_path)
    two = tmp_path / "two"
    config = tmp_path / "zero3_cpu.yaml"
    config.write_text(ZERO3_CPU_CONFIG)
    probe = tmp_path / "probe.py"
    probe.write_text(ENGINE_PROBE)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    proc = subprocess.run(
        [*launch, str(probe), *common[2:], "--batch-size", "2", "--out", str(two)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter ->") == 1  # the main process reports
    assert proc.stdout.count("engine: DeepSpeedEngine, partitioned: True") == 2, proc.stdout
    # partitioned as they were read: the training arguments came before the load
    assert proc.stdout.count("loaded partitioned: True") == 2, proc.stdout
    assert missing_adapter_files(two) == []
    a, b = lora_weights(one), lora_weights(two)
    assert sorted(a) == sorted(b)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 0.01  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    losses = [logged_losses(d) for d in (one, two)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    loaded = PeftModel.from_pretrained(base, str(two))
    state = loaded.state_dict()
    key = next(k for k in state if "lora_B" in k)
    assert torch.equal(state[key], b[key.replace(".default", "")])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "one",
        "pairs",
        "probe.py",
        "two",
        "zero3_cpu.yaml",
    ]  # no scratch folder left
