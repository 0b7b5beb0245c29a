"""Alignment: every method trains, LoRA traps, pair packing, CLI errors, SmolLM2 end to end."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cli_runner import invoke
from full_bbq import FULL_BBQ_DIR
from spillover.align import METHODS, AlignConfig, train_adapter
from spillover.align.diagnostics import reward_accuracy
from spillover.align.packing import pair_packing
from spillover.align.trainer import build_trainer, trainer_classes
from spillover.errors import ConfigError, DataError
from tiny_models import make_tiny

FULL_BBQ = os.fspath(FULL_BBQ_DIR) if FULL_BBQ_DIR else None  # env, else the cache

PROMPTS = [
    "A man and a woman met. q: who was late?\nA:",
    "The nurse and the doctor met. q: who was the secretary?\nA:",
    "A woman and a man were late to the board meeting. q: who was late?\nA:",
    "The engineer and the nurse met. q: who can't be determined?\nA:",
]
CHOSEN = [" Unknown", " The doctor", " Not enough information", " The engineer"]
REJECTED = [" The woman", " The nurse", " The man", " The nurse"]


def tiny_pairs(n: int = 16) -> pd.DataFrame:
    rows = [
        {"prompt": PROMPTS[i % 4], "chosen": CHOSEN[i % 4], "rejected": REJECTED[i % 4]}
        for i in range(n)
    ]
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected"])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_bos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-bos"), bos=True)


def lora_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def logged_losses(adapter_dir: Path) -> list[float]:
    """The per-step losses a training wrote to its ``log_history.json``."""
    history = json.loads((adapter_dir / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def one_process_reference(tiny_dir: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """For the two-process tests: pairs that vary per step under ``tmp_path/pairs``, the
    ``python -m spillover align`` arguments (without batch size and output), and the folder
    of the one-process run with the combined batch of 4 they are compared with."""
    import subprocess
    import sys

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    df = tiny_pairs(32)
    df["chosen"] = [CHOSEN[(i // 4) % 4] for i in range(32)]  # vary the pairs per step
    df.to_parquet(pairs / "train.parquet")
    (pairs / "split.json").write_text(json.dumps({"heldout_templates": {}}))
    common = [
        "-m", "spillover", "align", "--model", str(tiny_dir), "--pairs", str(pairs),
        "--max-steps", "3", "--target-modules", "q_proj,v_proj", "--no-bf16",
        "--device", "cpu", "--lr", "0.05", "--lora-r", "4", "--lora-alpha", "8",
    ]  # fmt: skip
    one = tmp_path / "one"
    subprocess.run(
        [sys.executable, *common, "--batch-size", "4", "--out", str(one)],
        check=True,
        capture_output=True,
    )
    return common, one


def cfg_for(model: Path, out: Path, method: str, **kw: Any) -> AlignConfig:
    base: dict[str, Any] = {
        "method": method,
        "max_steps": 2,
        "batch_size": 2,
        "learning_rate": 5e-2,
        "lora_r": 4,
        "lora_alpha": 8,
        "bf16": False,
        "dtype": "float32",
        "device": "cpu",
        "target_modules": ("q_proj", "v_proj", "up_proj"),
    }
    base.update(kw)
    return AlignConfig.from_preset(str(model), out, **base)


# --------------------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_lora(method: str, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    ref = train_adapter(tiny_pairs(), cfg_for(tiny_dir, out, method))
    assert ref.steps == 2
    weights = lora_weights(out)
    b_mats = [v for k, v in weights.items() if "lora_B" in k]
    assert b_mats, "no LoRA weights saved"
    # lora_B starts at zero: any non-zero entry means the optimizer changed it
    assert any(v.abs().max() > 0 for v in b_mats)
    assert ref.train_loss is not None and math.isfinite(ref.train_loss)
    assert (out / "adapter_config.json").is_file()
    history = json.loads((out / "log_history.json").read_text())
    assert sum("loss" in h for h in history) >= 2
    saved = json.loads((out / "align_config.json").read_text())
    assert saved["config"]["method"] == method
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_dpo_logs_rewards_and_writes_provenance(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "a"
    train_adapter(tiny_pairs(), cfg_for(tiny_dir, out, "dpo", merge=True))
    history = json.loads((out / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert all("rewards/accuracies" in h and "rewards/margins" in h for h in steps)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4  # a fresh adapter equals the reference
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["versions"]["trl"] and prov["model"]["kind"] == "local"
    assert (out / "merged" / "config.json").is_file()
    assert list((out / "merged").glob("*.safetensors"))


# --------------------------------------------------------------------------- traps


def test_resume_from_adapter_trains(tiny_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    train_adapter(tiny_pairs(), cfg_for(tiny_dir, first, "dpo"))
    before = lora_weights(first)
    second = tmp_path / "second"
    ref = train_adapter(tiny_pairs(), cfg_for(tiny_dir, second, "dpo", adapter=str(first), seed=1))
    after = lora_weights(second)
    assert set(after) == set(before)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "the loaded adapter did not train (frozen adapter)"
    assert ref.train_loss is not None


def _processed(trainer: Any) -> dict[str, list[int]]:
    ex = trainer.train_dataset[0]
    return {k: list(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}


def test_no_duplicate_bos_eos_with_bos_tokenizer(tiny_bos_dir: Path, tmp_path: Path) -> None:
    from spillover.models import load_model
    from spillover.prompts import render
    from test_prefs import small_items

    loaded = load_model(str(tiny_bos_dir), device="cpu")
    tok = loaded.tokenizer
    item = small_items()[0]
    r = render(item, "letters-chat", tokenizer=tok)
    assert r.prompt.startswith(tok.bos_token)  # the template writes BOS and the tokenizer adds one
    df = pd.DataFrame([{"prompt": r.prompt, "chosen": "B", "rejected": "C"}] * 4)
    cfg = cfg_for(tiny_bos_dir, tmp_path / "x", "dpo", precompute_ref=False)
    ex = _processed(build_trainer(loaded.model, tok, df, cfg, tmp_path / "t"))
    seq = ex["prompt_ids"] + ex["chosen_ids"]
    assert seq[0] == tok.bos_token_id and seq.count(tok.bos_token_id) == 1
    assert ex["chosen_ids"] == [*tok("B", add_special_tokens=False).input_ids, tok.eos_token_id]
    assert ex["rejected_ids"][-1] == tok.eos_token_id
    assert ex["rejected_ids"].count(tok.eos_token_id) == 1

    # the trap is real: plain TRL keeps the doubled BOS
    import trl

    plain = trl.DPOTrainer(
        model=loaded.model,
        args=trl.DPOConfig(output_dir=str(tmp_path / "p"), use_cpu=True, bf16=False, report_to=[]),
        train_dataset=__import__("datasets").Dataset.from_pandas(df),
        processing_class=tok,
        peft_config=__import__("spillover.align.trainer", fromlist=["lora_config"]).lora_config(
            cfg
        ),
    )
    assert _processed(plain)["prompt_ids"][:2] == [tok.bos_token_id] * 2


def test_no_duplicate_bos_eos_with_smollm2_tokenizer(tiny_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from spillover.models import load_tokenizer, resolve_model
    from spillover.prompts import render
    from test_prefs import small_items

    try:
        tok = load_tokenizer(resolve_model("smollm2-135m"))
    except Exception as exc:  # the embedded model package is optional
        pytest.skip(f"SmolLM2 tokenizer unavailable: {exc}")
    for fmt, chosen, rejected in (
        ("lm-eval", " Unknown", " The woman"),
        ("letters-chat", "B", "C"),
    ):
        # a tiny model: only the tokenizer is exercised (no forward pass without precompute)
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        r = render(small_items()[0], fmt, tokenizer=tok)
        df = pd.DataFrame([{"prompt": r.prompt, "chosen": chosen, "rejected": rejected}] * 2)
        cfg = cfg_for(tiny_dir, tmp_path / "x", "dpo", precompute_ref=False)
        ex = _processed(build_trainer(model, tok, df, cfg, tmp_path / fmt))
        prompt_ids = tok(r.prompt).input_ids
        # the prompt is tokenized as at evaluation: nothing added (SmolLM2 adds no BOS)
        assert ex["prompt_ids"] == prompt_ids
        # completion = the continuation's tokens + exactly one EOS
        for comp, key in ((chosen, "chosen_ids"), (rejected, "rejected_ids")):
            assert ex[key][:-1] == tok(r.prompt + comp).input_ids[len(prompt_ids) :]
            assert ex[key][-1] == tok.eos_token_id and ex[key].count(tok.eos_token_id) == 1
        full = ex["prompt_ids"] + ex["chosen_ids"]
        assert full.count(tok.bos_token_id) == prompt_ids.count(tok.bos_token_id)
        if fmt == "lm-eval":
            assert tok.bos_token_id not in full


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pair_packing_is_exact(attn: str, tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head

    import spillover.align.packing as align_mod  # the module whose pack_pairs is counted

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation=attn)
    add_fused_lm_head(model)
    examples = []
    for p, c, r in zip(PROMPTS, CHOSEN, REJECTED, strict=True):
        pi = tok(p).input_ids
        examples.append(
            {
                "prompt_ids": pi,
                "chosen_ids": [*tok(p + c).input_ids[len(pi) :], tok.eos_token_id],
                "rejected_ids": [*tok(p + r).input_ids[len(pi) :], tok.eos_token_id],
            }
        )
    batch = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    plain = model(**kw, labels=labels, fused_lm_head=True).log_probs
    calls: list[int] = []
    original = align_mod.pack_pairs

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(1)
        return original(*a, **k)

    align_mod.pack_pairs = counting  # type: ignore[assignment]
    try:
        with pair_packing(model):
            packed = model(**kw, labels=labels, fused_lm_head=True).log_probs
    finally:
        align_mod.pack_pairs = original  # type: ignore[assignment]
    assert calls, "packing did not run"
    assert torch.allclose(plain, packed, atol=1e-5)
    # outside the context the model is untouched
    again = model(**kw, labels=labels, fused_lm_head=True).log_probs
    assert torch.equal(plain, again)


# --------------------------------------------------------------------------- config and CLI


def test_config_cross_field_messages() -> None:
    with pytest.raises(ConfigError, match=r"`epochs`=1.0 and `max_steps`=5"):
        AlignConfig(model="m", output_dir="o", epochs=1.0, max_steps=5)
    with pytest.raises(ConfigError, match=r"did you mean 'dpo'"):
        AlignConfig(model="m", output_dir="o", method="dpoo")
    with pytest.raises(ConfigError, match=r"`batch_size`=1 with method 'kto'"):
        AlignConfig(model="m", output_dir="o", method="kto", batch_size=1, pack_pairs=False)
    with pytest.raises(ConfigError, match=r"`precompute_ref`=True with method 'orpo'"):
        AlignConfig(model="m", output_dir="o", method="orpo", precompute_ref=True, pack_pairs=False)
    with pytest.raises(ConfigError, match=r"`load_in_4bit`=True with `device`='cpu'"):
        AlignConfig(model="m", output_dir="o", load_in_4bit=True, device="cpu")
    cfg = AlignConfig.from_preset("smollm2-135m", "o", method="orpo")
    assert not cfg.precompute_ref and not cfg.pack_pairs and cfg.lora_r == 16
    assert all(trainer_classes(m) for m in METHODS)


def _cli_fails(args: list[str], out: Path, expect: str) -> None:
    res = invoke(["align", *args, "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert expect in res.output, res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def _empty_pairs(root: Path) -> Path:
    from spillover.align.prefs import PAIR_COLUMNS

    root.mkdir()
    pd.DataFrame(columns=list(PAIR_COLUMNS)).to_parquet(root / "train.parquet")
    (root / "split.json").write_text(json.dumps({"heldout_templates": {}}))
    return root


def test_cli_bad_inputs(tiny_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    tiny_pairs().to_parquet(good / "train.parquet")
    (good / "split.json").write_text(json.dumps({"heldout_templates": {}}))
    base = ["--model", str(tiny_dir), "--device", "cpu"]
    _cli_fails(
        [*base, "--pairs", str(_empty_pairs(tmp_path / "empty"))],
        tmp_path / "o1",
        "no training pairs",
    )
    _cli_fails(
        [*base, "--pairs", str(good), "--method", "ipoo"], tmp_path / "o2", "did you mean 'ipo'"
    )
    _cli_fails([*base, "--pairs", str(good), "--load-in-4bit"], tmp_path / "o3", "CUDA")
    _cli_fails(
        ["--model", str(tiny_dir), "--pairs", str(good), "--load-in-4bit"], tmp_path / "o4", "CUDA"
    )
    _cli_fails([*base, "--pairs", str(tmp_path / "nope")], tmp_path / "o5", "does not exist")


def test_cli_trains(tiny_dir: Path, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    tiny_pairs().to_parquet(good / "train.parquet")
    (good / "split.json").write_text(json.dumps({"heldout_templates": {}}))
    res = invoke(
        [
            "align",
            "--model",
            str(tiny_dir),
            "--pairs",
            str(good),
            "--out",
            str(tmp_path / "out"),
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--target-modules",
            "q_proj,v_proj",
            "--no-bf16",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "adapter ->" in res.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_empty_pairs_library_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no training pairs"):
        train_adapter(tiny_pairs(0), AlignConfig(model="m", output_dir=str(tmp_path / "o")))


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
@pytest.mark.fulldata
@pytest.mark.skipif(not FULL_BBQ, reason="full BBQ not available: set SPILLOVER_BBQ_DIR")
def test_smollm2_gender_dpo_learns(tmp_path: Path) -> None:
    from spillover.align import PrefsConfig, build_pairs
    from spillover.align.prefs import write_pairs
    from spillover.data import load_bbq
    from spillover.models import load_model

    data = load_bbq(FULL_BBQ, categories=["gender"])
    # the training loop on real pairs; `stereotype` pairs (one per item, the biased answer
    # rejected) are the easiest to learn in 12 steps, which is all this checks
    pcfg = PrefsConfig(targets=("gender",), strategy="stereotype", seed=0)
    pairs = build_pairs(data.items, pcfg, provenance=data.provenance())
    write_pairs(pairs, tmp_path / "pairs")
    held = pd.read_parquet(tmp_path / "pairs" / "heldout.parquet").sample(24, random_state=0)
    cfg = AlignConfig.from_preset(
        "smollm2-135m",
        tmp_path / "adapter",
        max_steps=12,
        batch_size=4,
        learning_rate=5e-4,  # a rate that moves the model in 12 steps, whatever the preset
        device="cpu",
    )
    ref = train_adapter(tmp_path / "pairs", cfg)
    losses = [h["loss"] for h in ref.log_history if "loss" in h]
    assert abs(losses[0] - math.log(2)) < 1e-3
    assert sum(losses[-4:]) / 4 < math.log(2)

    loaded = load_model("smollm2-135m", adapter=ref.path, device="cpu")
    after = reward_accuracy(loaded.model, loaded.tokenizer, held, beta=cfg.beta)
    # before training the adapter is the identity: every implicit reward margin is 0
    assert after["reward_accuracy"] > 0.5
    assert after["reward_margin"] > 0
    assert after["policy_accuracy"] >= after["reference_accuracy"]


def test_two_process_training_equals_one_process_with_the_combined_batch(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """`torchrun`/`accelerate launch`, 2 CPU processes x batch 2 = 1 process x batch 4.

    Data-parallel training averages the two processes' gradients, so with the same seed
    both runs see the same 4 pairs per step and must end with the same adapter. The
    reference log-probs TRL precomputes on the main process must reach the other one,
    and only the main process writes the adapter folder.
    """
    import shutil
    import subprocess
    import sys

    common, one = one_process_reference(tiny_dir, tmp_path)
    two = tmp_path / "two"
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", *common, "--batch-size", "2", "--out", str(two)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("adapter ->") == 1  # the main process reports
    losses = [logged_losses(d) for d in (one, two)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0][-1] < losses[0][0]
    a, b = lora_weights(one), lora_weights(two)
    assert sorted(a) == sorted(b)
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 0.01  # it trained
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "pairs", "two"]  # no scratch
    assert not (two / "training_args.bin").exists()


def test_bf16_is_automatic_unless_asked() -> None:
    """Unset, bf16 autocast follows the hardware (emulated bf16 on a CPU is many times slower)."""
    from spillover.align import AlignConfig
    from spillover.align.trainer import trl_config
    from spillover.models import fast_bf16

    auto = AlignConfig.from_preset("smollm2-135m", "o")
    assert auto.bf16 is None
    assert trl_config(auto, "o", device="cpu", max_length=64).bf16 is fast_bf16("cpu")
    forced = AlignConfig.from_preset("smollm2-135m", "o", bf16=False)
    assert trl_config(forced, "o", device="cpu", max_length=64).bf16 is False


def test_rpo_alpha_adds_a_scaled_nll_of_the_chosen_answer(tiny_dir: Path, tmp_path: Path) -> None:
    """RPO: the first-step loss (a fresh adapter equals the reference, DPO loss = log 2) is
    log 2 + rpo_alpha x NLL(chosen); the added term scales linearly with rpo_alpha."""
    from spillover.align.trainer import trl_config

    first: dict[float, float] = {}
    for alpha in (0.5, 2.0):
        out = tmp_path / f"rpo{alpha}"
        train_adapter(tiny_pairs(), cfg_for(tiny_dir, out, "dpo", max_steps=1, rpo_alpha=alpha))
        history = json.loads((out / "log_history.json").read_text())
        first[alpha] = next(h["loss"] for h in history if "loss" in h)
    extra = {a: loss - math.log(2) for a, loss in first.items()}
    assert extra[0.5] > 0
    assert extra[2.0] / extra[0.5] == pytest.approx(4.0, rel=1e-4)
    cfg = cfg_for(tiny_dir, tmp_path / "x", "ipo", rpo_alpha=1.0)
    args = trl_config(cfg, "o", device="cpu", max_length=64)
    assert list(args.loss_type) == ["ipo", "sft"] and list(args.loss_weights) == [1.0, 1.0]
    with pytest.raises(ConfigError, match=r"`rpo_alpha`=1\.0 with method 'kto'"):
        cfg_for(tiny_dir, tmp_path / "y", "kto", rpo_alpha=1.0)
    with pytest.raises(ConfigError, match=r"`lr_scheduler_type`='cosin'.*did you mean 'cosine'"):
        cfg_for(tiny_dir, tmp_path / "y", "dpo", lr_scheduler_type="cosin")


# --------------------------------------------------------------------------- tracking, evaluation, checkpoints


def _pairs_folder(root: Path, train: int = 16, heldout: int = 6) -> Path:
    root.mkdir()
    tiny_pairs(train).to_parquet(root / "train.parquet")
    tiny_pairs(heldout).to_parquet(root / "heldout.parquet")
    (root / "split.json").write_text(json.dumps({"heldout_templates": {}}))
    return root


def test_tensorboard_events_land_in_the_adapter_and_match_the_log_history(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "adapter"
    cfg = cfg_for(tiny_dir, out, "dpo", max_steps=3, report_to="tensorboard")
    train_adapter(_pairs_folder(tmp_path / "pairs"), cfg)
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, sorted(str(p) for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    history = json.loads((out / "log_history.json").read_text())
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    assert sorted(logged) == sorted(losses) == [1, 2, 3]
    for step, loss in losses.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6)
    evals = {e.step: e.value for e in acc.Scalars("eval/loss")}
    assert evals == pytest.approx({h["step"]: h["eval_loss"] for h in history if "eval_loss" in h})
    # nothing but the adapter is left beside it: no scratch or checkpoint folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "pairs"]


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("wandb") is None, reason="wandb not installed"
)
def test_wandb_offline_run_lands_in_the_adapter(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    out = tmp_path / "adapter"
    train_adapter(tiny_pairs(), cfg_for(tiny_dir, out, "dpo", report_to="wandb"))
    assert list((out / "logs").rglob("*.wandb"))


def test_heldout_pairs_are_evaluated_at_the_eval_steps(tiny_dir: Path, tmp_path: Path) -> None:
    pairs = _pairs_folder(tmp_path / "pairs")
    out = tmp_path / "a"
    ref = train_adapter(pairs, cfg_for(tiny_dir, out, "dpo", max_steps=4, eval_steps=2))
    evals = [h for h in ref.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [2, 4]
    for h in evals:
        assert 0.0 <= h["eval_rewards/accuracies"] <= 1.0
        assert math.isfinite(h["eval_rewards/margins"]) and math.isfinite(h["eval_loss"])
    assert json.loads((out / "log_history.json").read_text()) == json.loads(
        json.dumps(list(ref.log_history))
    )
    # default: four evaluations over the training; 0 and `no` turn them off
    ref = train_adapter(pairs, cfg_for(tiny_dir, tmp_path / "b", "dpo", max_steps=4))
    assert [h["step"] for h in ref.log_history if "eval_loss" in h] == [1, 2, 3, 4]
    for off in ({"eval_steps": 0}, {"eval_strategy": "no"}, {"eval_pairs": 0}):
        cfg = cfg_for(tiny_dir, tmp_path / "c", "dpo", max_steps=1, overwrite=True, **off)
        ref = train_adapter(pairs, cfg)
        assert not [h for h in ref.log_history if "eval_loss" in h], off


def test_eval_pairs_caps_the_heldout_sample() -> None:
    from spillover.align.trainer import eval_rows

    cfg = AlignConfig(model="m", output_dir="o", eval_pairs=3, seed=1)
    rows = eval_rows(tiny_pairs(10), cfg)
    assert rows is not None and len(rows) == 3
    assert list(rows["prompt"]) == list(eval_rows(tiny_pairs(10), cfg)["prompt"])  # seeded
    assert len(eval_rows(tiny_pairs(2), cfg)) == 2
    assert eval_rows(tiny_pairs(0), cfg) is None


class _Interrupted(Exception):
    pass


def _interrupt_at(step: int) -> Any:
    def progress(done: int, total: int, logs: Any) -> None:
        if done == step and not logs:  # the end of optimizer step `step`
            raise _Interrupted

    return progress


def test_interrupted_training_resumes_to_the_same_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    pairs = _pairs_folder(tmp_path / "pairs")
    kw: dict[str, Any] = {"max_steps": 6, "save_steps": 2, "eval_steps": 3}
    clean = train_adapter(pairs, cfg_for(tiny_dir, tmp_path / "clean", "dpo", **kw))
    out = tmp_path / "killed"
    with pytest.raises(_Interrupted):
        train_adapter(pairs, cfg_for(tiny_dir, out, "dpo", **kw), progress=_interrupt_at(5))
    ckpts = out.parent / "killed.checkpoints"
    assert not out.exists()
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-4"]  # limit 1
    seen: list[int] = []
    resumed = train_adapter(
        pairs, cfg_for(tiny_dir, out, "dpo", **kw), progress=lambda s, t, logs: seen.append(s)
    )
    assert resumed.resumed_step == 4 and min(seen) == 5 and resumed.steps == 6
    a, b = lora_weights(tmp_path / "clean"), lora_weights(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)

    def losses(h: Any) -> list[tuple[int, str]]:
        return [(e["step"], k) for e in h for k in ("loss", "eval_loss") if k in e]

    def values(h: Any) -> list[float]:
        return [e[k] for e in h for k in ("loss", "eval_loss") if k in e]

    assert losses(resumed.log_history) == losses(clean.log_history)
    assert values(resumed.log_history) == pytest.approx(values(clean.log_history), abs=1e-6)
    assert json.loads((out / "provenance.json").read_text())["resumed_from_step"] == 4
    assert not ckpts.exists()


def test_checkpoints_of_another_config_are_discarded(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pairs = _pairs_folder(tmp_path / "pairs")
    out = tmp_path / "a"
    kw: dict[str, Any] = {"max_steps": 3, "save_steps": 1, "eval_strategy": "no"}
    with pytest.raises(_Interrupted):
        train_adapter(pairs, cfg_for(tiny_dir, out, "dpo", **kw), progress=_interrupt_at(2))
    assert (tmp_path / "a.checkpoints" / "checkpoint-1").is_dir()
    with caplog.at_level("WARNING", logger="spillover"):
        ref = train_adapter(pairs, cfg_for(tiny_dir, out, "dpo", beta=0.2, **kw))
    assert ref.resumed_step is None and ref.steps == 3
    assert "another config or other pairs" in caplog.text
    # a folder in that place that spillover did not make is refused, not deleted
    mine = tmp_path / "b.checkpoints"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a checkpoint folder spillover made"):
        train_adapter(pairs, cfg_for(tiny_dir, tmp_path / "b", "dpo", **kw))
    assert (mine / "notes.txt").read_text() == "keep"


# --------------------------------------------------------------------------- TRL pass-through


def test_trl_args_reach_the_trl_config_coerced_to_its_types(tmp_path: Path) -> None:
    from spillover.align import resolve_trl_args
    from spillover.align.trainer import trl_config

    given = AlignConfig(
        model="m",
        output_dir=str(tmp_path / "o"),
        trl_args={"per_device_eval_batch_size": "3", "optim": "adafactor", "disable_dropout": 0},
    )
    cfg = resolve_trl_args(given)
    assert cfg.trl_args == {
        "disable_dropout": False,
        "optim": "adafactor",
        "per_device_eval_batch_size": 3,
    }
    args = trl_config(given, tmp_path / "t", device="cpu", max_length=64)  # resolves them itself
    assert args.per_device_eval_batch_size == 3 and args.disable_dropout is False
    assert str(args.optim.value if hasattr(args.optim, "value") else args.optim) == "adafactor"
    assert cfg.to_dict()["trl_args"] == cfg.trl_args


@pytest.mark.parametrize(
    ("method", "args", "pattern"),
    [
        ("dpo", {"gradient_acumulation_steps": 2}, "did you mean 'gradient_accumulation_steps'"),
        ("dpo", {"learning_rate": 1e-3}, "set by spillover from `learning_rate`"),
        ("dpo", {"gradient_accumulation_steps": 2}, "set by spillover from `grad_accum`"),
        ("kto", {"desirable_weight": "heavy"}, r"desirable_weight='heavy'.*KTOConfig"),
        ("dpo", {"desirable_weight": 1.0}, "not a field of TRL's DPOConfig"),
    ],
)
def test_trl_args_are_checked_against_the_methods_config(
    method: str, args: dict[str, Any], pattern: str
) -> None:
    from spillover.align import resolve_trl_args

    with pytest.raises(ConfigError, match=pattern) as info:
        resolve_trl_args(AlignConfig.from_preset("m", "o", method=method, trl_args=args))
    assert "\n" not in str(info.value)


def test_cli_trl_arg(tiny_dir: Path, tmp_path: Path) -> None:
    good = _pairs_folder(tmp_path / "good")
    base = ["--model", str(tiny_dir), "--device", "cpu", "--pairs", str(good)]
    _cli_fails(
        [*base, "--trl-arg", "optim=adafactor", "--trl-arg", "lr_schedulr_kwargs={}"],
        tmp_path / "o1",
        "--trl-arg: key 'lr_schedulr_kwargs' is not a field of TRL's DPOConfig (did you mean",
    )
    _cli_fails([*base, "--trl-arg", "learning_rate=1"], tmp_path / "o2", "from --lr")
    _cli_fails([*base, "--trl-arg", "optim"], tmp_path / "o3", "expected key=value")
    out = tmp_path / "out"
    res = invoke(
        [
            "align",
            *base,
            "--out",
            str(out),
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--target-modules",
            "q_proj",
            "--no-bf16",
            "--trl-arg",
            "per_device_eval_batch_size=5",
        ]
    )
    assert res.exit_code == 0, res.output
    saved = json.loads((out / "align_config.json").read_text())
    assert saved["config"]["trl_args"] == {"per_device_eval_batch_size": 5}


# --------------------------------------------------------------------------- the tables


def test_every_model_alias_has_its_preset_and_no_other() -> None:
    """One model table: each alias of `models.MODEL_TABLE` has a preset, found by the alias
    or the hub id; the compute estimate and the small-model caveat read the same table."""
    from spillover.align.presets import PRESETS, preset_for_model
    from spillover.models import MODEL_TABLE

    assert set(PRESETS) == set(MODEL_TABLE)
    for alias, info in MODEL_TABLE.items():
        assert preset_for_model(alias) is PRESETS[alias]
        assert preset_for_model(info.hub_id) is PRESETS[alias]
    assert preset_for_model("org/unknown-model") is None
    assert [a for a, m in MODEL_TABLE.items() if m.demo_only] == ["smollm2-135m"]


def test_a_method_is_one_entry_of_the_method_table() -> None:
    """Every method's TRL classes resolve from its table entry; what applies to it (packing,
    RPO, a reference model, label smoothing) is read from the entry, not from name lists."""
    from spillover.align.methods import METHOD_TABLE, method_of

    assert tuple(METHOD_TABLE) == METHODS
    for name, m in METHOD_TABLE.items():
        cfg = AlignConfig.from_preset("smollm2-135m", "out", method=name)
        assert cfg.pack_pairs == m.is_dpo and cfg.precompute_ref == (not m.reference_free)
    assert method_of("DPO").name == "dpo" and method_of("apo-zero").name == "apo_zero"
    assert {m.name for m in METHOD_TABLE.values() if m.reference_free} == {"cpo", "simpo", "orpo"}
    with pytest.raises(ConfigError, match="has no effect with method 'ipo'; use it with dpo, "):
        AlignConfig(model="m", output_dir="o", method="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match=r"unknown `method`='dpoo' \(did you mean 'dpo'\?\)"):
        method_of("dpoo")


def test_validating_an_align_config_imports_no_trl() -> None:
    """An AlignConfig is validated without TRL; its `trl_args` are checked against TRL when
    they are resolved (the command, the run config and training do)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from spillover.align import AlignConfig\n"
        "cfg = AlignConfig(model='m', output_dir='o', trl_args={'optim': 'adafactor'})\n"
        "print('trl' in sys.modules, cfg.trl_args)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False {'optim': 'adafactor'}"
    with pytest.raises(
        ConfigError, match="key 'learning_rate' is set by spillover from `learning_rate`"
    ):
        AlignConfig(model="m", output_dir="o", trl_args={"learning_rate": 0.1})
