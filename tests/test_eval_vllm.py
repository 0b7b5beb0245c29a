"""Tests of the vLLM backend that need no GPU: its log-probability bookkeeping (checked
against the packed transformers scorer on real model outputs) and its errors when vLLM is
absent. The engine call itself needs CUDA and is not run here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from spillover.errors import ModelError  # noqa: E402
from spillover.evaluate import (  # noqa: E402
    ChoiceEncoder,
    ChoiceRequest,
    HFChoiceScorer,
    continuation_logprob,
)
from spillover.models import load_model  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None

REQUESTS = [
    ChoiceRequest(
        "the man and the woman were late.\n\nQ: who was late?\nA:",
        (" the man", " the woman", " not enough information"),
    ),
    ChoiceRequest("a nurse met a doctor.\n\nQ: who was the nurse?\nA:", (" A", " B", " unknown")),
    ChoiceRequest("", (" the secretary", " the engineer", " can't be determined")),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tiny_models import make_tiny

    folder = make_tiny(tmp_path_factory.mktemp("tiny"), bos=True, initializer_range=0.3)
    return load_model(str(folder), device="cpu", dtype="float32")


def _prompt_logprobs(model: Any, seq: list[int]) -> list[dict[int, float] | None]:
    """What vLLM returns for ``prompt_logprobs=1``: per position, the prompt token's own
    log-probability and the top-1 token's (position 0 has none), from a real forward."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([seq])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    out: list[dict[int, float] | None] = [None]
    for i in range(1, len(seq)):
        row = logp[i - 1]
        top = int(row.argmax())
        out.append({top: float(row[top]), seq[i]: float(row[seq[i]])})
    return out


def test_prompt_logprobs_sum_to_the_packed_scores(tiny: Any) -> None:
    encoder = ChoiceEncoder(tiny.tokenizer)
    expected = HFChoiceScorer(tiny.model, tiny.tokenizer).score(REQUESTS)
    for opts, want in zip(encoder.encode(REQUESTS), expected, strict=True):
        for j, o in enumerate(opts):
            seq = [*o.context, *o.continuation]
            got = continuation_logprob(seq, len(o.context), _prompt_logprobs(tiny.model, seq))
            assert got == pytest.approx(want.logprobs[j], abs=1e-4)


def test_vllm_logprob_objects_are_read_by_their_logprob_field() -> None:
    class Logprob:  # the shape of vllm.logprobs.Logprob: a value and its rank
        def __init__(self, logprob: float, rank: int) -> None:
            self.logprob = logprob
            self.rank = rank

    entries = [None, {5: Logprob(-0.5, 1)}, {7: Logprob(-1.25, 3), 2: Logprob(-0.1, 1)}]
    assert continuation_logprob([1, 5, 7], 1, entries) == pytest.approx(-1.75)
    assert continuation_logprob([1, 5, 7], 2, entries) == pytest.approx(-1.25)


@pytest.mark.parametrize(
    ("seq", "ctx", "entries", "needle"),
    [
        ([1, 5, 7], 1, [None, {5: -0.5}, {2: -0.1}], "no prompt logprob for token 7 at position 2"),
        ([1, 5, 7], 1, [None, {5: -0.5}], "returned 2 prompt logprobs for 3 tokens"),
        ([1, 5, 7], 3, [None, {5: -0.5}, {7: -0.1}], "cannot score a continuation at 3:3"),
        ([1, 5, 7], 0, [None, {5: -0.5}, {7: -0.1}], "cannot score a continuation at 0:3"),
    ],
)
def test_bad_prompt_logprobs_are_named(
    seq: list[int], ctx: int, entries: list[Any], needle: str
) -> None:
    with pytest.raises(ModelError, match=needle):
        continuation_logprob(seq, ctx, entries)


def _invoke(tiny: Any, mini_dir: Path, out: Path, extra: list[str]) -> Any:
    from cli_runner import invoke

    base = ["eval", "--model", tiny.spec.location, "--bbq-dir", str(mini_dir)]
    return invoke([*base, "--allow-unverified", "--all", *extra, "--out", str(out)])


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--backend", "vllm"], "pip install 'spillover[vllm]'"),
        (
            ["--backend", "vllm", "--precision", "bf16-verified"],
            "--precision='bf16-verified' needs --backend hf",
        ),
        (
            ["--tensor-parallel-size", "2"],
            "--tensor-parallel-size=2; expected 1, or >= 1 with --backend vllm",
        ),
        (["--backend", "vllm", "--device", "cpu"], "--backend vllm runs on CUDA GPUs"),
        (["--backend", "onnx"], "--backend='onnx'; expected one of hf, vllm"),
    ],
)
def test_cli_backend_errors_are_one_line(
    tiny: Any, mini_dir: Path, tmp_path: Path, extra: list[str], needle: str
) -> None:
    out = tmp_path / "preds.parquet"
    res = _invoke(tiny, mini_dir, out, extra)
    assert res.exit_code == 1
    assert "Traceback" not in res.output
    tail = res.output[res.output.index("error:") :].strip()
    assert "\n" not in tail and needle in tail
    assert not out.exists()
