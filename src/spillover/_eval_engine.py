"""Choice scoring: the log-likelihood of each option's continuation after a prompt.

The HF backend scores an item's options in one *packed* sequence: the prompt's
tokens once, followed by every option's continuation tokens (all but the last,
which is only ever a target). A 4D block attention mask lets each continuation
see the prompt and its own earlier tokens only, and position ids restart after
the prompt, so every continuation is scored exactly as if it followed the
prompt alone, for the prompt's cost once instead of three times. The LM head
and log-softmax run only on the positions whose next token is scored.

Tokenisation follows lm-evaluation-harness's ``_encode_pair`` for causal
models: trailing whitespace of the prompt moves into the continuation, the
prompt is encoded alone and the continuation is ``whole[len(prompt_enc):]``
where ``whole`` encodes prompt and continuation together. The model input is
``prompt_enc + continuation_enc``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from .errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

Boundary = Literal["lm-eval", "whole"]
BOUNDARIES: tuple[str, ...] = ("lm-eval", "whole")


@dataclass(frozen=True, slots=True)
class ChoiceRequest:
    """A prompt and the continuations to score after it."""

    prompt: str
    """Text the continuations are conditioned on."""
    continuations: tuple[str, ...]
    """Scored texts, in the order their scores are returned."""


@dataclass(frozen=True, slots=True)
class ChoiceScores:
    """Scores of one :class:`ChoiceRequest`."""

    logprobs: tuple[float, ...]
    """Summed log-probability of each continuation's tokens given the prompt."""
    n_tokens: tuple[int, ...]
    """Number of scored tokens of each continuation."""


@runtime_checkable
class ChoiceScorer(Protocol):
    """Anything that scores multiple-choice continuations."""

    def score(
        self,
        requests: Sequence[ChoiceRequest],
        progress: Callable[[int], None] | None = None,
    ) -> list[ChoiceScores]:
        """Score every request; ``progress(n)`` is called as ``n`` more requests finish."""
        ...


@dataclass(slots=True)
class ScorerStats:
    """Counters kept by :class:`HFChoiceScorer` (cumulative over calls)."""

    requests: int = 0
    """Requests scored."""
    boundary_merges: int = 0
    """Options whose joint encoding does not start with the prompt's own encoding."""
    split_requests: int = 0
    """Requests whose options did not share prompt tokens (scored per option group)."""
    forward_tokens: int = 0
    """Token positions run through the model, padding included."""
    batches: int = 0
    """Forward passes."""

    def as_dict(self) -> dict[str, int]:
        """Plain dict view."""
        return {
            "requests": self.requests,
            "boundary_merges": self.boundary_merges,
            "split_requests": self.split_requests,
            "forward_tokens": self.forward_tokens,
            "batches": self.batches,
        }


@dataclass(frozen=True, slots=True)
class EncodedOption:
    """One option as token ids: the context it follows and its own tokens."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]
    merged: bool = False
    """Whether the joint encoding did not start with the context's own encoding."""


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def split_pair(
    whole: Sequence[int], context_enc: Sequence[int], boundary: str = "lm-eval"
) -> EncodedOption:
    """Split one option's encodings into context and continuation tokens.

    Args:
        whole: Encoding of ``context + continuation`` (after whitespace moving).
        context_enc: Encoding of the context alone.
        boundary: ``lm-eval``: context = ``context_enc``, continuation =
            ``whole[len(context_enc):]`` (lm-evaluation-harness's rule, also
            when the boundary token merged). ``whole``: score the joint
            encoding; the context is the longest prefix it shares with
            ``context_enc``. Either rule falls back to ``whole`` when the
            ``lm-eval`` continuation would be empty.

    Returns:
        The split, with ``merged`` set when the joint encoding does not start
        with ``context_enc``.
    """
    n = len(context_enc)
    merged = tuple(whole[:n]) != tuple(context_enc)
    if boundary == "lm-eval" and len(whole) > n:
        return EncodedOption(tuple(context_enc), tuple(whole[n:]), merged)
    k = _common_prefix(whole, context_enc) if merged else n
    k = min(k, len(whole) - 1)
    if k <= 0:
        raise ConfigError("a continuation tokenises to nothing; cannot score an empty option")
    return EncodedOption(tuple(whole[:k]), tuple(whole[k:]), merged)


@dataclass(slots=True)
class _Segment:
    """One packed row: a context followed by several continuations."""

    req: int
    context: tuple[int, ...]
    options: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return len(self.context) + sum(len(c) - 1 for _, c in self.options)


class HFChoiceScorer:
    """Packed-sequence scorer for a transformers causal LM (optionally PEFT-wrapped).

    Args:
        model: A causal LM (``PreTrainedModel`` or ``PeftModel``), eval mode.
        tokenizer: Its tokenizer.
        batch_tokens: Upper bound on ``rows x padded length`` of one forward.
        boundary: Tokenisation boundary rule, see :func:`split_pair`.
        add_special_tokens: Passed to the tokenizer; None uses the tokenizer's
            default, except for texts that already start with its BOS token
            (as lm-evaluation-harness does).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_tokens: int = 4096,
        boundary: str = "lm-eval",
        add_special_tokens: bool | None = None,
    ) -> None:
        if batch_tokens < 1:
            raise ConfigError(f"`batch_tokens`={batch_tokens}; expected a positive integer")
        if boundary not in BOUNDARIES:
            raise ConfigError(f"`boundary`={boundary!r}; expected one of {', '.join(BOUNDARIES)}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.boundary = boundary
        self.add_special_tokens = add_special_tokens
        self.stats = ScorerStats()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._config = base.config
        impl = getattr(self._config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):
            raise ConfigError(
                f"packed scoring needs eager or sdpa attention (custom 4D masks); "
                f"this model uses {impl!r}: load it with attn_implementation='sdpa'"
            )
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        if decoder is None:
            decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        head = base.get_output_embeddings()
        if decoder is None or head is None:
            raise ModelError(f"{type(base).__name__}: cannot find its decoder and LM head")
        self._decoder = decoder
        self._head = head
        self._softcap = getattr(self._config, "final_logit_softcapping", None)
        self._logit_scale = getattr(self._config, "logit_scale", None)
        param = next(base.parameters())
        self._device = param.device
        self._dtype = param.dtype
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        bos = tokenizer.bos_token
        self._bos_text: str | None = bos if isinstance(bos, str) and bos else None
        prefix = tokenizer.bos_token_id
        if prefix is None:
            prefix = tokenizer.eos_token_id
        self._prefix_id: int | None = prefix

    # ------------------------------------------------------------------ encoding

    def _encode_texts(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode texts the way lm-evaluation-harness's ``tok_encode`` does."""
        out: list[list[int]] = [[] for _ in texts]
        groups: dict[bool | None, list[int]] = {}
        for i, t in enumerate(texts):
            special = self.add_special_tokens
            if special is None and self._bos_text is not None and t.startswith(self._bos_text):
                special = False
            groups.setdefault(special, []).append(i)
        for special, idx in groups.items():
            kwargs = {} if special is None else {"add_special_tokens": special}
            enc = self.tokenizer([texts[i] for i in idx], **kwargs)["input_ids"]
            for i, ids in zip(idx, enc, strict=True):
                out[i] = list(ids)
        return out

    def encode(self, requests: Sequence[ChoiceRequest]) -> list[list[EncodedOption]]:
        """Token ids of every option of every request (see :func:`split_pair`)."""
        contexts: list[str] = []
        wholes: list[str] = []
        for req in requests:
            if not req.prompt:
                contexts.append("")
                wholes.extend(req.continuations)
                continue
            # lm-eval moves the prompt's trailing whitespace into the continuation
            ctx = req.prompt.rstrip() if self.boundary == "lm-eval" else req.prompt
            moved = req.prompt[len(ctx) :]
            contexts.append(ctx)
            wholes.extend(ctx + moved + c for c in req.continuations)
        ctx_enc = self._encode_texts(contexts)
        whole_enc = self._encode_texts(wholes)
        out: list[list[EncodedOption]] = []
        pos = 0
        for req, cenc in zip(requests, ctx_enc, strict=True):
            opts: list[EncodedOption] = []
            for _ in req.continuations:
                whole = whole_enc[pos]
                pos += 1
                if not req.prompt:
                    # lm-eval: an empty context becomes the prefix token
                    if self._prefix_id is None:
                        raise ConfigError("empty prompt and the tokenizer has no BOS/EOS token")
                    cont = tuple(whole)
                    if cont and cont[0] == self._prefix_id:
                        opts.append(EncodedOption(cont[:1], cont[1:]))
                    else:
                        opts.append(EncodedOption((self._prefix_id,), cont))
                    continue
                opts.append(split_pair(whole, cenc, self.boundary))
            out.append(opts)
        return out

    # ------------------------------------------------------------------ scoring

    def score(
        self,
        requests: Sequence[ChoiceRequest],
        progress: Callable[[int], None] | None = None,
    ) -> list[ChoiceScores]:
        """Score requests in length-bucketed, token-budgeted packed batches.

        Results come back in request order.
        """
        return self.score_encoded(self.encode(requests), progress)

    def score_encoded(
        self,
        encoded: Sequence[Sequence[EncodedOption]],
        progress: Callable[[int], None] | None = None,
    ) -> list[ChoiceScores]:
        """Score already tokenised requests (options sharing a context are packed together)."""
        import torch

        segments: list[_Segment] = []
        for r, opts in enumerate(encoded):
            by_ctx: dict[tuple[int, ...], _Segment] = {}
            for j, opt in enumerate(opts):
                if opt.merged:
                    self.stats.boundary_merges += 1
                if not opt.continuation:
                    raise ConfigError("a continuation tokenises to nothing; cannot score it")
                seg = by_ctx.get(opt.context)
                if seg is None:
                    seg = by_ctx[opt.context] = _Segment(r, opt.context)
                    segments.append(seg)
                seg.options.append((j, opt.continuation))
            if len(by_ctx) > 1:
                self.stats.split_requests += 1
        self.stats.requests += len(encoded)

        logprobs: list[list[float]] = [[0.0] * len(opts) for opts in encoded]
        remaining = [len({o.context for o in opts}) for opts in encoded]
        order = sorted(range(len(segments)), key=lambda i: (-segments[i].length, i))
        with torch.inference_mode():
            start = 0
            while start < len(order):
                longest = segments[order[start]].length
                rows = max(1, self.batch_tokens // max(longest, 1))
                batch = [segments[i] for i in order[start : start + rows]]
                start += len(batch)
                self._run_batch(batch, logprobs)
                done = 0
                for seg in batch:
                    remaining[seg.req] -= 1
                    done += remaining[seg.req] == 0
                if progress is not None and done:
                    progress(done)
        return [
            ChoiceScores(tuple(lp), tuple(len(o.continuation) for o in opts))
            for lp, opts in zip(logprobs, encoded, strict=True)
        ]

    def _run_batch(self, batch: Sequence[_Segment], logprobs: list[list[float]]) -> None:
        import torch

        width = max(seg.length for seg in batch)
        n = len(batch)
        ids = torch.full((n, width), self._pad, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        # segment id per position: 0 prompt, k>0 option k, -1 padding
        segid = torch.full((n, width), -1, dtype=torch.long)
        rows: list[int] = []
        cols: list[int] = []
        targets: list[int] = []
        owners: list[tuple[int, int]] = []
        for b, seg in enumerate(batch):
            ctx = seg.context
            p = len(ctx)
            ids[b, :p] = torch.tensor(ctx, dtype=torch.long)
            pos[b, :p] = torch.arange(p)
            segid[b, :p] = 0
            at = p
            for k, (j, cont) in enumerate(seg.options, start=1):
                body = cont[:-1]
                m = len(body)
                if m:
                    ids[b, at : at + m] = torch.tensor(body, dtype=torch.long)
                    pos[b, at : at + m] = torch.arange(p, p + m)
                    segid[b, at : at + m] = k
                # the first token is predicted from the prompt's last position,
                # token t>0 from the option's own (t-1)-th packed position
                srcs = [p - 1, *range(at, at + m)]
                for src, tgt in zip(srcs, cont, strict=True):
                    rows.append(b)
                    cols.append(src)
                    targets.append(tgt)
                    owners.append((seg.req, j))
                at += m
        q = segid.unsqueeze(2)
        kv = segid.unsqueeze(1)
        idx = torch.arange(width)
        causal = idx.view(1, 1, width) <= idx.view(1, width, 1)
        allowed = causal & (kv >= 0) & ((kv == 0) | (kv == q))
        allowed |= torch.eye(width, dtype=torch.bool).unsqueeze(0)  # padding rows: no NaN
        mask = torch.zeros((n, 1, width, width), dtype=self._dtype)
        mask.masked_fill_(~allowed.unsqueeze(1), torch.finfo(self._dtype).min)
        dev = self._device
        out = self._decoder(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            use_cache=False,
        )
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
        # unique scored positions: the prompt's last one serves every option
        flat = [r * width + c for r, c in zip(rows, cols, strict=True)]
        uniq = sorted(set(flat))
        where = {f: i for i, f in enumerate(uniq)}
        sel = hidden.reshape(n * width, -1)[torch.tensor(uniq, device=dev)]
        logits = self._head(sel).float()
        if self._logit_scale is not None:
            logits = logits * float(self._logit_scale)
        if self._softcap is not None:
            cap = float(self._softcap)
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp[
            torch.tensor([where[f] for f in flat], device=dev),
            torch.tensor(targets, device=dev),
        ].tolist()
        for (r, j), v in zip(owners, picked, strict=True):
            logprobs[r][j] += v
        self.stats.forward_tokens += n * width
        self.stats.batches += 1


def score_naive(
    model: Any, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> list[float]:
    """Reference scorer: one unpadded forward per ``(context, continuation)`` pair.

    Slow; used to check the packed scorer.
    """
    import torch

    out: list[float] = []
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for ctx, cont in sequences:
            seq = list(ctx) + list(cont)
            ids = torch.tensor([seq[:-1]], device=dev)
            logits = model(input_ids=ids).logits[0].float()
            logp = torch.log_softmax(logits[len(ctx) - 1 :], dim=-1)
            tgt = torch.tensor(list(cont), device=dev)
            out.append(float(logp.gather(1, tgt.unsqueeze(1)).sum()))
    return out


__all__ = [
    "BOUNDARIES",
    "Boundary",
    "ChoiceRequest",
    "ChoiceScorer",
    "ChoiceScores",
    "EncodedOption",
    "HFChoiceScorer",
    "ScorerStats",
    "score_naive",
    "split_pair",
]
