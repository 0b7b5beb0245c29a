"""Choice scoring: requests, scores, the scorer protocol and the shared tokeniser.

A request is a prompt and the continuations (answer options) to score after it;
its scores are the summed log-probability of each continuation's tokens. Every
backend tokenises through one :class:`ChoiceEncoder`, so all of them score the
very same token sequences.

Tokenisation follows lm-evaluation-harness's ``_encode_pair`` for causal
models: trailing whitespace of the prompt moves into the continuation, the
prompt is encoded alone and the continuation is ``whole[len(prompt_enc):]``
where ``whole`` encodes prompt and continuation together. The model input is
``prompt_enc + continuation_enc``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import ConfigError

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


ScoreProgress = Callable[[int], None]
"""``progress(n)``: ``n`` more requests are finished."""

NeedsRescoring = Callable[[int, ChoiceScores], bool]
"""``needs(i, scores)``: whether request ``i``, scored in bfloat16, is a close call that must
be scored again in the weights' own dtype."""


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
    verified_requests: int = 0
    """Requests rescored in full precision after a bf16 pass (``precision="bf16-verified"``)."""
    compiled_batches: int = 0
    """Forward passes run through ``torch.compile`` (see ``HFChoiceScorer(compile=...)``)."""

    def as_dict(self) -> dict[str, int]:
        """Plain dict view."""
        return {
            "requests": self.requests,
            "boundary_merges": self.boundary_merges,
            "split_requests": self.split_requests,
            "forward_tokens": self.forward_tokens,
            "verified_requests": self.verified_requests,
            "batches": self.batches,
            "compiled_batches": self.compiled_batches,
        }


@runtime_checkable
class ChoiceScorer(Protocol):
    """Anything that scores multiple-choice continuations, stating what it can do."""

    supports_bf16: bool
    """Whether :meth:`score` can run under bfloat16 autocast with ``rescore`` (the
    ``bf16-verified`` precision); a backend that computes in its weights' dtype says False."""
    stats: ScorerStats
    """Counters, cumulative over calls."""

    def score(
        self,
        requests: Sequence[ChoiceRequest],
        progress: ScoreProgress | None = None,
        *,
        rescore: NeedsRescoring | None = None,
    ) -> list[ChoiceScores]:
        """Score every request; ``progress(n)`` is called as ``n`` more requests finish.

        With ``rescore`` (only when :attr:`supports_bf16`), the pass runs under bfloat16
        autocast and each request for which ``rescore(i, scores)`` holds is scored again in
        the weights' dtype; the rescored requests are counted in
        ``stats.verified_requests``.
        """
        ...


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


class ChoiceEncoder:
    """Tokenises choice requests the way lm-evaluation-harness does (shared by every backend).

    Args:
        tokenizer: A transformers tokenizer.
        boundary: Tokenisation boundary rule, see :func:`split_pair`.
        add_special_tokens: Passed to the tokenizer; None keeps its default, except for
            texts that already start with its BOS token (as lm-evaluation-harness does).
    """

    def __init__(
        self, tokenizer: Any, boundary: str = "lm-eval", add_special_tokens: bool | None = None
    ) -> None:
        if boundary not in BOUNDARIES:
            raise ConfigError(f"`boundary`={boundary!r}; expected one of {', '.join(BOUNDARIES)}")
        self.tokenizer = tokenizer
        self.boundary = boundary
        self.add_special_tokens = add_special_tokens
        bos = tokenizer.bos_token
        self._bos_text: str | None = bos if isinstance(bos, str) and bos else None
        prefix = tokenizer.bos_token_id
        if prefix is None:
            prefix = tokenizer.eos_token_id
        self._prefix_id: int | None = prefix

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
