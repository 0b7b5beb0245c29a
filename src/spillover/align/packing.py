"""Pair packing: one row per preference pair, the shared prompt computed once.

A DPO batch holds each pair's chosen and rejected sequence; both start with the same
prompt. Within :func:`pair_packing`, the model's decoder packs the two into one row
with a tree-shaped attention mask, runs once, and returns hidden states in the layout
the trainer expects, so TRL's LM head, log-probs and losses are unchanged (exact).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_PACKING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "spillover_pair_packing", default=False
)


@dataclass(frozen=True)
class PackedPairs:
    """A ``[chosen; rejected]`` batch packed into one row per pair."""

    input_ids: Any
    """``(B, L')`` token ids: chosen tokens, then the rejected tokens after the shared prefix."""
    position_ids: Any
    """``(B, L')`` positions in the original sequences."""
    attention_mask: Any
    """``(B, 1, L', L')`` mask: rejected tokens see the shared prefix and themselves, not the chosen ones."""
    gather: Any
    """``(2B * L,)`` index into the flattened packed hidden states giving the unpacked layout."""
    valid: Any
    """``(2B, L)`` the unpacked positions that hold a real token."""


def pack_pairs(
    input_ids: Any, attention_mask: Any, *, bool_mask: bool, dtype: Any = None
) -> PackedPairs:
    """Pack a DPO batch (rows ``i`` and ``B + i`` are the chosen and rejected sequence of pair ``i``).

    Both sequences of a pair share their prompt (and often the first completion
    tokens). The packed row holds the chosen sequence followed by the rejected
    tokens after the longest common prefix; a tree-shaped attention mask and
    the original position ids make every token's hidden state identical to the
    unpacked computation, while the shared prefix is computed once. Sequences
    must be right-padded (TRL's collator pads right).
    """
    import torch

    n2, width = input_ids.shape
    n = n2 // 2
    lengths = attention_mask.sum(dim=1).tolist()
    ids_cpu = input_ids.tolist()
    rows: list[list[int]] = []
    pos_rows: list[list[int]] = []
    spans: list[tuple[int, int, int]] = []
    for i in range(n):
        a, b = int(lengths[i]), int(lengths[n + i])
        ca, cb = ids_cpu[i][:a], ids_cpu[n + i][:b]
        c = 0
        limit = min(a, b) - 1  # keep at least one own token per sequence
        while c < limit and ca[c] == cb[c]:
            c += 1
        rows.append(ca + cb[c:])
        pos_rows.append(list(range(a)) + list(range(c, b)))
        spans.append((a, b, c))
    packed_len = max(len(r) for r in rows)
    device = input_ids.device
    pad = int(input_ids[0, -1]) if width else 0
    ids = torch.full((n, packed_len), pad, dtype=input_ids.dtype)
    pos = torch.zeros((n, packed_len), dtype=torch.long)
    allowed = torch.zeros((n, packed_len, packed_len), dtype=torch.bool)
    gather = torch.zeros((n2, width), dtype=torch.long)
    valid = torch.zeros((n2, width), dtype=torch.bool)
    causal = torch.ones((packed_len, packed_len), dtype=torch.bool).tril()
    for i, (a, b, c) in enumerate(spans):
        m = len(rows[i])
        ids[i, :m] = torch.tensor(rows[i], dtype=input_ids.dtype)
        pos[i, :m] = torch.tensor(pos_rows[i])
        blk = allowed[i]
        blk[:a, :a] = causal[:a, :a]
        r = m - a  # rejected suffix length
        if r:
            blk[a:m, :c] = True
            blk[a:m, a:m] = causal[:r, :r]
        for j in range(m, packed_len):  # padding rows attend to themselves (no empty softmax)
            blk[j, j] = True
        base = i * packed_len
        gather[i, :a] = torch.arange(base, base + a)
        gather[n + i, :c] = torch.arange(base, base + c)
        gather[n + i, c:b] = torch.arange(base + a, base + m)
        valid[i, :a] = True
        valid[n + i, :b] = True
    mask4d = allowed.unsqueeze(1)
    if not bool_mask:
        fill = torch.finfo(dtype or torch.float32).min
        mask4d = torch.zeros(mask4d.shape, dtype=dtype or torch.float32).masked_fill(~mask4d, fill)
    return PackedPairs(
        ids.to(device),
        pos.to(device),
        mask4d.to(device),
        gather.reshape(-1).to(device),
        valid.to(device),
    )


@contextlib.contextmanager
def pair_packing(model: Any) -> Any:
    """Within this context, forward passes of ``model`` on ``[chosen; rejected]`` batches are packed.

    The decoder backbone of ``model`` gets a wrapper (installed once) that packs
    the batch with :func:`pack_pairs`, runs the original backbone, and returns
    hidden states in the unpacked layout, so the LM head, log-probs and losses
    of the trainer are unchanged. Outside the context the wrapper passes through.
    """
    install_pair_packing(model)
    token = _PACKING.set(True)
    try:
        yield
    finally:
        _PACKING.reset(token)


def _backbone(model: Any) -> Any:
    inner = model
    for _ in range(4):  # accelerate / PEFT wrappers
        if hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        elif hasattr(inner, "module"):
            inner = inner.module
        else:
            break
    prefix = getattr(inner, "base_model_prefix", "model")
    return inner, getattr(inner, prefix, None)


def install_pair_packing(model: Any) -> bool:
    """Wrap the backbone of ``model`` for :func:`pair_packing`; False when the architecture is unsupported.

    Supported: decoder-only models using ``sdpa`` or ``eager`` attention whose
    backbone accepts ``position_ids`` and a 4D attention mask (Llama, Mistral,
    Qwen2, SmolLM2 and most transformers decoders).
    """
    inner, backbone = _backbone(model)
    if backbone is None or backbone is inner:
        return False
    if getattr(backbone, "_spillover_packing", False):
        return True
    impl = getattr(inner.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        logger.warning("pair packing is off: attention %r does not take a 4D mask", impl)
        return False
    original = backbone.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        input_ids = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if (
            not _PACKING.get()
            or args
            or input_ids is None
            or mask is None
            or mask.ndim != 2
            or input_ids.shape[0] % 2
            or kwargs.get("past_key_values") is not None
            or kwargs.get("inputs_embeds") is not None
            or kwargs.get("position_ids") is not None
        ):
            return original(*args, **kwargs)
        packed = pack_pairs(
            input_ids, mask, bool_mask=impl == "sdpa", dtype=next(backbone.parameters()).dtype
        )
        call = dict(kwargs)
        call.update(
            input_ids=packed.input_ids,
            attention_mask=packed.attention_mask,
            position_ids=packed.position_ids,
        )
        out = original(**call)
        hidden = out.last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        unpacked = flat.index_select(0, packed.gather).view(*input_ids.shape, hidden.shape[-1])
        out.last_hidden_state = unpacked * packed.valid.unsqueeze(-1).to(unpacked.dtype)
        return out

    backbone.forward = forward
    backbone._spillover_packing = True
    _install_compact_head(inner, backbone)
    return True


def _sharded(weight: Any) -> bool:
    """Whether a parameter is a shard, not the whole tensor: a DeepSpeed ZeRO-3 partition
    (``ds_id``; its local data is empty) or a DTensor (FSDP2); TRL gathers those itself."""
    return (
        hasattr(weight, "ds_id")
        or type(weight).__name__ == "DTensor"
        or type(getattr(weight, "data", None)).__name__ == "DTensor"
        or weight.ndim != 2
        or weight.numel() == 0
    )


def _install_compact_head(inner: Any, backbone: Any) -> None:
    """Score only completion positions in TRL's fused LM head while packing is active.

    TRL's fused head projects only labelled positions on Triton devices but every
    position elsewhere (CPU included). Within :func:`pair_packing`, this wrapper
    runs the backbone, then TRL's own ``ChunkedLogProbFunction`` on the labelled
    positions alone and scatters the results back, which is the computation TRL
    does on GPUs. Models with logit scaling or soft-capping keep TRL's path.
    """
    try:
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:  # pragma: no cover - other TRL layouts: keep TRL's head
        return
    text_config = inner.config.get_text_config()
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier"):
        if getattr(text_config, attr, None) not in (None, 1.0):
            return
    if getattr(text_config, "lm_head_multiplier", None) is not None:
        return
    if getattr(text_config, "logits_scaling", None) is not None:
        return
    head = inner.get_output_embeddings()
    if head is None or head.weight.device.type != "cpu":
        # TRL's fused head already projects only labelled positions on GPUs (and gathers
        # sharded ZeRO-3 / FSDP2 head weights itself): nothing to gain there
        return
    fused = inner.forward
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")

    def forward(*args: Any, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if (
            not _PACKING.get()
            or args
            or not kwargs.get("fused_lm_head")
            or labels is None
            or kwargs.get("shift_labels") is not None
            or kwargs.get("output_router_logits")
            or getattr(text_config, "output_router_logits", False)
            or _sharded(inner.get_output_embeddings().weight)
        ):
            return fused(*args, **kwargs)
        call = {
            k: v
            for k, v in kwargs.items()
            if k not in ("fused_lm_head", "labels", "num_items_in_batch")
        }
        call["use_cache"] = False
        hidden = backbone(**call).last_hidden_state[:, :-1]
        shifted = labels[:, 1:]
        lm_head = inner.get_output_embeddings()
        hidden = hidden.to(lm_head.weight.device)
        shifted = shifted.to(lm_head.weight.device)
        mask = shifted != -100
        per_token = ChunkedLogProbFunction.apply(  # type: ignore[no-untyped-call]
            hidden[mask],
            lm_head.weight,
            lm_head.bias,
            shifted[mask],
            1.0,
            32768,
            None,
            1.0,
            outputs,
        )
        log_probs, entropy, _, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
            for x in per_token
        )
        n_items = kwargs.get("num_items_in_batch")
        denom = mask.sum().clamp(min=1) if n_items is None else n_items
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / denom,  # type: ignore[union-attr]
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=None,
            mean_logits=mean_logits,
            is_top1=is_top1,
            label_mask=mask,
            aux_loss=None,
        )

    inner.forward = forward
