"""Diagnostics of a trained adapter: log-probabilities of pairs and DPO reward accuracy."""

from __future__ import annotations

from typing import Any

from .trainer import strip_duplicate_special_tokens


def pair_logps(
    model: Any, tokenizer: Any, pairs: Any, *, batch_size: int = 16
) -> tuple[list[float], list[float]]:
    """Summed log-probs of each pair's chosen and rejected completion, tokenized as TRL does.

    Completions carry one EOS, like in training. Runs under ``torch.no_grad``
    in the model's current adapter state.

    Returns:
        ``(chosen_logps, rejected_logps)``, one value per pair.
    """
    import torch

    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs: list[tuple[list[int], int]] = []
    for prompt, chosen, rejected in zip(
        pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True
    ):
        p_ids = tokenizer(str(prompt))["input_ids"]
        for completion in (chosen, rejected):
            text = str(completion)
            if eos and not text.endswith(eos):
                text += eos
            full = tokenizer(str(prompt) + text)["input_ids"]
            n = 0
            while n < min(len(p_ids), len(full)) and p_ids[n] == full[n]:
                n += 1
            ex = strip_duplicate_special_tokens(
                {"prompt_ids": full[:n], "chosen_ids": full[n:]},
                tokenizer.bos_token_id,
                tokenizer.eos_token_id,
            )
            seqs.append((ex["prompt_ids"] + ex["chosen_ids"], len(ex["prompt_ids"])))
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                chunk = seqs[i : i + batch_size]
                width = max(len(s) for s, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                comp = torch.zeros((len(chunk), width), dtype=torch.bool)
                for j, (s, start) in enumerate(chunk):
                    ids[j, : len(s)] = torch.tensor(s)
                    mask[j, : len(s)] = 1
                    comp[j, start : len(s)] = True
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
                summed = (tok_lp * comp[:, 1:].to(device)).sum(-1)
                out.extend(float(v) for v in summed.cpu())
    finally:
        if was_training:
            model.train()
    return out[0::2], out[1::2]


def reward_accuracy(
    model: Any, tokenizer: Any, pairs: Any, *, beta: float = 0.1, batch_size: int = 16
) -> dict[str, float]:
    """DPO implicit-reward accuracy of a PEFT model on pairs (adapter vs adapter disabled).

    The implicit reward of a completion is ``beta * (logp_policy - logp_reference)``
    with the reference being the same model with its adapter disabled; a pair
    counts as correct when the chosen reward exceeds the rejected one. Also
    returns the policy's own preference accuracy (``logp_chosen > logp_rejected``),
    which is meaningful before training too.

    Returns:
        ``reward_accuracy``, ``reward_margin`` (mean), ``policy_accuracy``,
        ``reference_accuracy`` and ``n``.
    """
    pc, pr = pair_logps(model, tokenizer, pairs, batch_size=batch_size)
    with model.disable_adapter():
        rc, rr = pair_logps(model, tokenizer, pairs, batch_size=batch_size)
    margins = [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr, strict=True)]
    n = len(margins)
    return {
        "reward_accuracy": sum(m > 0 for m in margins) / n if n else float("nan"),
        "reward_margin": sum(margins) / n if n else float("nan"),
        "policy_accuracy": sum(a > b for a, b in zip(pc, pr, strict=True)) / n
        if n
        else float("nan"),
        "reference_accuracy": sum(a > b for a, b in zip(rc, rr, strict=True)) / n
        if n
        else float("nan"),
        "n": float(n),
    }
