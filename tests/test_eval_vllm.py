"""Tests of the vLLM backend that need no GPU: its log-probability bookkeeping (checked
against the packed transformers scorer on real model outputs) and its errors when vLLM is
absent. The engine call itself needs CUDA and is not run here."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch")

from spillover.errors import ConfigError, ModelError  # noqa: E402
from spillover.evaluate.hf import HFChoiceScorer  # noqa: E402
from spillover.evaluate.scoring import ChoiceEncoder, ChoiceRequest  # noqa: E402
from spillover.evaluate.vllm import continuation_logprob, load_vllm_model  # noqa: E402
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
        (
            ["--max-model-len", "2048"],
            "--max-model-len=2048; expected unset, or a positive integer with --backend vllm",
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


class FakeLLM:
    """The part of ``vllm.LLM`` the backend uses: its keyword arguments and ``generate``
    (prompt logprobs from a real forward of the tiny model, so scores can be checked)."""

    made: ClassVar[list[FakeLLM]] = []

    def __init__(
        self, kwargs: dict[str, Any], hf_model: Any = None, fail: BaseException | None = None
    ) -> None:
        self.kwargs = kwargs
        self.hf_model = hf_model
        self.fail = fail
        self.calls: list[list[list[int]]] = []
        self.shut_down = 0
        FakeLLM.made.append(self)

    def shutdown(self) -> None:  # vLLM's LLM.shutdown (newer releases)
        self.shut_down += 1

    def generate(self, prompts: list[Any], params: Any, **kwargs: Any) -> list[Any]:
        if self.fail is not None:
            raise self.fail
        seqs = [list(p["prompt_token_ids"]) for p in prompts]
        self.calls.append(seqs)
        return [SimpleNamespace(prompt_logprobs=_prompt_logprobs(self.hf_model, s)) for s in seqs]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A stand-in ``vllm`` package: ``LLM`` records its arguments (or raises what the test
    puts in ``fake.llm_error``), ``SamplingParams``, ``TokensPrompt`` and ``LoRARequest``."""
    fake = ModuleType("vllm")
    fake.llm_error = None  # type: ignore[attr-defined]

    def make_llm(**kwargs: Any) -> Any:
        if fake.llm_error is not None:  # type: ignore[attr-defined]
            raise fake.llm_error  # type: ignore[attr-defined]
        return FakeLLM(kwargs)

    fake.LLM = make_llm  # type: ignore[attr-defined]
    fake.SamplingParams = lambda **kw: SimpleNamespace(**kw)  # type: ignore[attr-defined]
    inputs = ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict  # type: ignore[attr-defined]
    lora = ModuleType("vllm.lora")
    lora_request = ModuleType("vllm.lora.request")
    lora_request.LoRARequest = lambda *a: SimpleNamespace(args=a)  # type: ignore[attr-defined]
    for name, mod in [
        ("vllm", fake),
        ("vllm.inputs", inputs),
        ("vllm.lora", lora),
        ("vllm.lora.request", lora_request),
    ]:
        monkeypatch.setitem(sys.modules, name, mod)
    FakeLLM.made.clear()
    return fake


def _adapter(tmp_path: Path, config: Any) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    ("config", "rank"),
    [
        ({"r": 1}, 1),
        ({"r": 4}, 8),
        ({"r": 8}, 8),
        ({"r": 12}, 16),
        ({"r": 16, "rank_pattern": {"q_proj": 64, "v_proj": 4}}, 64),
        ({"r": 300}, 320),
        ({"r": 8, "rank_pattern": {"mlp": 500}}, 512),
    ],
)
def test_max_lora_rank_is_the_smallest_vllm_rank_that_holds_the_adapter(
    tiny: Any, fake_vllm: Any, tmp_path: Path, config: dict[str, Any], rank: int
) -> None:
    from spillover.evaluate.vllm import VLLM_LORA_RANKS

    assert rank in VLLM_LORA_RANKS
    folder = _adapter(tmp_path, config)
    loaded = load_vllm_model(tiny.spec.location, adapter=folder)
    assert loaded.model.kwargs["max_lora_rank"] == rank
    assert loaded.model.kwargs["enable_lora"] is True
    assert loaded.adapter == str(folder.resolve())


@pytest.mark.parametrize(
    ("config", "error", "needle"),
    [
        ({"r": 1024}, ConfigError, "adapter_config.json: LoRA rank 1024; the vllm backend"),
        (
            {"r": 8, "rank_pattern": {"q_proj": 513}},
            ConfigError,
            "adapter_config.json: LoRA rank 513;",
        ),
        ({"r": 0}, ModelError, "field 'r'=0; expected > 0"),
        ({"r": 8, "rank_pattern": {"q": "x"}}, ModelError, "field 'rank_pattern'="),
    ],
)
def test_unservable_lora_ranks_are_one_line_errors(
    tiny: Any, fake_vllm: Any, tmp_path: Path, config: Any, error: type, needle: str
) -> None:
    folder = _adapter(tmp_path, config)
    with pytest.raises(error, match=re.escape(needle)) as info:
        load_vllm_model(tiny.spec.location, adapter=folder)
    assert "\n" not in str(info.value)
    assert str(folder) in str(info.value)
    assert not FakeLLM.made


def test_max_model_len_defaults_to_4096_capped_by_the_model(tiny: Any, fake_vllm: Any) -> None:
    from spillover.evaluate.vllm import DEFAULT_MAX_MODEL_LEN

    assert DEFAULT_MAX_MODEL_LEN == 4096
    # the tiny model's max_position_embeddings is 512
    assert load_vllm_model(tiny.spec.location).model.kwargs["max_model_len"] == 512
    got = load_vllm_model(tiny.spec.location, max_model_len=2048).model.kwargs
    assert got["max_model_len"] == 2048


def test_max_model_len_reaches_the_engine_from_the_eval_config(tiny: Any, fake_vllm: Any) -> None:
    from spillover.evaluate import EvalConfig
    from spillover.evaluate.run import load_for_eval

    cfg = EvalConfig(backend="vllm", tensor_parallel_size=2, max_model_len=1024)
    loaded, scorer = load_for_eval(tiny.spec.location, cfg)
    assert loaded.model.kwargs["max_model_len"] == 1024
    assert loaded.model.kwargs["tensor_parallel_size"] == 2
    assert scorer is not None and scorer.llm is loaded.model


@pytest.mark.parametrize("value", [0, -5, True, 1.5, "4096"])
def test_max_model_len_must_be_a_positive_integer(value: Any) -> None:
    from spillover.evaluate import EvalConfig

    with pytest.raises(ConfigError, match=r"`max_model_len`=.*; expected unset, or a positive"):
        EvalConfig(backend="vllm", max_model_len=value)


def test_max_model_len_needs_the_vllm_backend() -> None:
    from spillover.evaluate import EvalConfig

    assert EvalConfig(backend="vllm", max_model_len=2048).max_model_len == 2048
    assert EvalConfig().max_model_len is None
    with pytest.raises(ConfigError, match="with `backend`: vllm"):
        EvalConfig(max_model_len=2048)


def test_run_config_takes_eval_max_model_len(tmp_path: Path) -> None:
    from spillover.runs import RunConfig

    path = tmp_path / "study.yaml"
    path.write_text("eval:\n  backend: vllm\n  max_model_len: 2048\n", encoding="utf-8")
    assert RunConfig.load(path).eval.max_model_len == 2048
    path.write_text("eval:\n  max_model_len: 2048\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"study\.yaml:2: `eval\.max_model_len`=2048; expected"):
        RunConfig.load(path)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError(
            "The model's max seq len (4096) is larger than the maximum number of tokens\n"
            "that can be stored in KV cache (2048). Try increasing `gpu_memory_utilization`\n"
            "or decreasing `max_model_len` when initializing the engine."
        ),
        RuntimeError("Engine core initialization failed. See root cause above."),
        ValueError("x" * 1000),
    ],
)
def test_engine_build_errors_are_one_line_model_errors(
    tiny: Any, fake_vllm: Any, exc: Exception
) -> None:
    fake_vllm.llm_error = exc
    with pytest.raises(ModelError) as info:
        load_vllm_model(tiny.spec.location, tensor_parallel_size=2)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 800
    assert msg.startswith(f"vLLM could not start {tiny.spec.location!r} (max_model_len 512, ")
    assert "tensor_parallel_size 2" in msg
    assert type(exc).__name__ + ": " + str(exc).split()[0][:40] in msg
    for hint in ("--max-model-len", "--tensor-parallel-size", "GPU with more free memory"):
        assert hint in msg


def test_engine_errors_while_scoring_are_one_line_model_errors(tiny: Any, fake_vllm: Any) -> None:
    from spillover.evaluate.vllm import VLLMChoiceScorer

    llm = FakeLLM({}, tiny.model, fail=RuntimeError("CUDA out of memory.\nTried to allocate"))
    scorer = VLLMChoiceScorer(llm, tiny.tokenizer)
    with pytest.raises(ModelError) as info:
        scorer.score(REQUESTS)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("vLLM failed while scoring: RuntimeError: CUDA out of memory. Tried")
    assert "--max-model-len" in msg and "--tensor-parallel-size" in msg


def test_missing_vllm_is_still_a_missing_dependency(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spillover.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(MissingDependencyError, match=re.escape("pip install 'spillover[vllm]'")):
        load_vllm_model(tiny.spec.location)


def test_identical_sequences_are_sent_to_the_engine_once(tiny: Any, fake_vllm: Any) -> None:
    """With the ``lm-eval`` format the prompt does not list the answers, so every answer order
    of an item repeats the same three sequences; the engine gets each one once and every
    order gets its scores."""
    import itertools

    from spillover.evaluate.vllm import VLLMChoiceScorer

    orders = [
        ChoiceRequest(req.prompt, tuple(opts))
        for req in REQUESTS
        for opts in itertools.permutations(req.continuations)
    ]
    want = HFChoiceScorer(tiny.model, tiny.tokenizer).score(orders)
    llm = FakeLLM({}, tiny.model)
    scorer = VLLMChoiceScorer(llm, tiny.tokenizer, chunk_requests=4)
    seen: list[int] = []
    got = scorer.score(orders, seen.append)
    sent = [tuple(s) for call in llm.calls for s in call]
    assert len(sent) == len(set(sent)) == 3 * len(REQUESTS)
    assert [len(c) for c in llm.calls] == [4, 4, 1]
    assert sum(seen) == len(orders) == 6 * len(REQUESTS)
    for g, w in zip(got, want, strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
        assert g.n_tokens == w.n_tokens
    assert scorer.stats.requests == len(orders)
    assert scorer.stats.batches == 3
    assert scorer.stats.forward_tokens == sum(len(s) for s in sent)


def test_docs_do_not_claim_the_prefix_cache_shares_prompt_logprob_requests() -> None:
    """vLLM never reads its prefix cache for a request with ``prompt_logprobs``
    (``skip_reading_prefix_cache``), so no text may say the prompt is computed once."""
    import spillover.evaluate.vllm as backend

    root = Path(__file__).resolve().parents[1]
    texts = {
        "module": backend.__doc__ or "",
        "README.md": (root / "README.md").read_text(encoding="utf-8"),
        "docs/predictions.md": (root / "docs/predictions.md").read_text(encoding="utf-8"),
    }
    for name, text in texts.items():
        flat = " ".join(text.split())
        for stale in (
            "prefix cache computes each shared prompt once",
            "prefix cache sharing each prompt",
            "three answers is computed once",
        ):
            assert stale not in flat, (name, stale)
        assert "prefix cache does not share" in flat, name


def _engine_on(fake_vllm: Any, tiny: Any, fail: BaseException | None = None) -> None:
    """``vllm.LLM`` of the fake package: a FakeLLM scoring with the tiny model."""
    fake_vllm.LLM = lambda **kw: FakeLLM(kw, tiny.model, fail=fail)


def test_the_engine_is_shut_down_and_its_memory_settings_reach_it(
    tiny: Any, fake_vllm: Any, mini_dir: Path, tmp_path: Path
) -> None:
    """Every stage of a `spillover run` runs in one process: each vLLM engine is shut down
    after its evaluation (else the next one, or the training, finds the GPU full)."""
    from spillover.data import load_bbq
    from spillover.evaluate import EvalConfig
    from spillover.evaluate.run import run_evaluation

    _engine_on(fake_vllm, tiny)
    items = load_bbq(mini_dir, allow_unverified=True, fetch=False).items[:3]
    cfg = EvalConfig(backend="vllm", gpu_memory_utilization=0.5, max_num_batched_tokens=2048)
    outcome = run_evaluation(tiny.spec.location, items, cfg, out=tmp_path / "p.parquet")
    assert outcome.n_rows == 3
    (llm,) = FakeLLM.made
    assert llm.kwargs["gpu_memory_utilization"] == 0.5
    assert llm.kwargs["max_num_batched_tokens"] == 2048
    assert llm.shut_down == 1
    # unset: vLLM's 0.9, and its own batched-token default
    FakeLLM.made.clear()
    run_evaluation(
        tiny.spec.location, items, EvalConfig(backend="vllm"), out=tmp_path / "q.parquet"
    )
    assert FakeLLM.made[0].kwargs["gpu_memory_utilization"] == 0.9
    assert "max_num_batched_tokens" not in FakeLLM.made[0].kwargs
    assert FakeLLM.made[0].shut_down == 1


def test_an_engine_that_fails_while_scoring_is_shut_down_too(
    tiny: Any, fake_vllm: Any, mini_dir: Path, tmp_path: Path
) -> None:
    from spillover.data import load_bbq
    from spillover.evaluate import EvalConfig
    from spillover.evaluate.run import run_evaluation

    _engine_on(fake_vllm, tiny, fail=RuntimeError("CUDA out of memory. Tried to allocate"))
    items = load_bbq(mini_dir, allow_unverified=True, fetch=False).items[:3]
    with pytest.raises(ModelError) as info:
        run_evaluation(tiny.spec.location, items, EvalConfig(backend="vllm"), out=tmp_path / "p")
    assert "--max-num-batched-tokens (eval.max_num_batched_tokens)" in str(info.value)
    assert "--gpu-memory-utilization (eval.gpu_memory_utilization)" in str(info.value)
    assert FakeLLM.made[0].shut_down == 1


def test_engine_shutdown_falls_back_to_the_engine_client() -> None:
    """vLLM 0.10-0.11 has no LLM.shutdown: its engine client is stopped; failures only log."""
    from spillover.evaluate.vllm import shutdown_engine

    stopped: list[str] = []
    core = SimpleNamespace(shutdown=lambda: stopped.append("core"))
    shutdown_engine(SimpleNamespace(llm_engine=SimpleNamespace(engine_core=core)))
    assert stopped == ["core"]

    def broken() -> None:
        raise RuntimeError("engine already dead")

    shutdown_engine(SimpleNamespace(shutdown=broken))  # logged, not raised
    shutdown_engine(object())  # nothing to stop


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"backend": "vllm", "gpu_memory_utilization": 0}, "`gpu_memory_utilization`=0;"),
        ({"backend": "vllm", "gpu_memory_utilization": 1.5}, "`gpu_memory_utilization`=1.5;"),
        ({"gpu_memory_utilization": 0.5}, "with `backend`: vllm"),
        ({"backend": "vllm", "max_num_batched_tokens": 0}, "`max_num_batched_tokens`=0;"),
        ({"max_num_batched_tokens": 4096}, "with `backend`: vllm"),
    ],
)
def test_engine_memory_settings_are_checked(values: dict[str, Any], needle: str) -> None:
    from spillover.evaluate import EvalConfig

    with pytest.raises(ConfigError, match=re.escape(needle)):
        EvalConfig(**values)


def test_engine_memory_settings_neither_rerun_stages_nor_refuse_shards(tmp_path: Path) -> None:
    """They size the engine, not the scores: out of the scoring config's dict (the key of
    shards and stages), but read from the run config and recorded in its config.yaml."""
    from spillover.evaluate import EvalConfig
    from spillover.runs import RunConfig

    cfg = EvalConfig(backend="vllm", gpu_memory_utilization=0.6, max_num_batched_tokens=4096)
    assert cfg.to_dict() == EvalConfig(backend="vllm").to_dict()
    path = tmp_path / "study.yaml"
    path.write_text(
        "eval:\n  backend: vllm\n  gpu_memory_utilization: 0.6\n  max_num_batched_tokens: 4096\n",
        encoding="utf-8",
    )
    run = RunConfig.load(path)
    assert (run.eval.gpu_memory_utilization, run.eval.max_num_batched_tokens) == (0.6, 4096)
    assert run.to_dict()["eval"]["gpu_memory_utilization"] == 0.6


def test_a_dead_engine_is_one_line_on_the_command_line(
    tiny: Any, fake_vllm: Any, mini_dir: Path, tmp_path: Path
) -> None:
    """vLLM's EngineDeadError (an Exception, not one of the engine errors caught while
    scoring where vLLM is absent) reaches the CLI's boundary and reads as one line."""
    import importlib.machinery

    class EngineDeadError(Exception):
        pass

    fake_vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    _engine_on(fake_vllm, tiny, fail=EngineDeadError("EngineCore encountered an issue."))
    out = tmp_path / "preds.parquet"
    res = _invoke(tiny, mini_dir, out, ["--backend", "vllm", "--limit", "2"])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    tail = res.output[res.output.index("error:") :].strip()
    assert "\n" not in tail
    assert "vLLM's engine stopped (EngineDeadError: EngineCore encountered an issue.)" in tail
    assert "--max-num-batched-tokens" in tail and "--gpu-memory-utilization" in tail
    assert FakeLLM.made[0].shut_down == 1
