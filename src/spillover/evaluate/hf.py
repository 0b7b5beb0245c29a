"""The transformers backend: packed-tree scoring of choice requests.

Requests are packed into token trees: each row holds the prompt's tokens once
and every option's continuation tokens after it (all but the last, which is
only ever a target); requests whose prompts share a prefix (answer
permutations of one prompt, two questions on one BBQ context) share those
nodes too. A 4D attention mask lets every token attend to its ancestors in the
tree only, and position ids are tree depths, so each continuation is scored
exactly as if it followed its prompt alone. The LM head and log-softmax run
only on the positions whose next token is scored.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import ConfigError, ModelError
from .scoring import (
    ChoiceEncoder,
    ChoiceRequest,
    ChoiceScores,
    EncodedOption,
    NeedsRescoring,
    ScoreProgress,
    ScorerStats,
)

logger = logging.getLogger(__name__)

CPU_ROW_TOKENS = 96
"""Row width of packed scoring on a CPU. Attention over a row costs its width per token, and a
BBQ request is about 60 tokens: rows of 96 tokens with eager attention scored 506 items' bf16
pass in 15.2-17.0 s against 19.1-19.4 s for 256-token rows with SDPA (2 cores, AVX512-BF16;
docs/benchmarks.md, "Row width and attention on a CPU")."""

ENV_COMPILE = "SPILLOVER_COMPILE"
"""``1`` runs the bf16 pass of ``evaluate_model`` through ``torch.compile``; ``0`` or unset does
not. Off by default: on 2 cores with AVX512-BF16 it made SmolLM2-135M's bf16 pass 0-15 % faster
(noise of the same size) and a 1,100-item ``spillover eval`` took 59.6 s of scoring compiled
against 58.6 s eager, while the first compile on a machine costs about 36 s
(docs/benchmarks.md, "Compiled bf16 pass")."""


def compile_requested() -> bool:
    """Whether ``$SPILLOVER_COMPILE`` asks for the compiled bf16 pass.

    Raises:
        ConfigError: a value other than ``0``, ``1`` or empty.
    """
    env = os.environ.get(ENV_COMPILE, "").strip()
    if env not in ("", "0", "1"):
        raise ConfigError(f"${ENV_COMPILE}={env!r}; expected 0, 1 or unset")
    return env == "1"


def _inductor_cache() -> None:
    """Keep inductor's compiled kernels with spillover's other caches (unless the user chose
    a place), so a warm cache means a fast compile after a reboot too."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from ..data import default_cache_root

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(default_cache_root() / "inductor")


class _Tree:
    """A token trie packed into one row: shared prefixes are computed once.

    Nodes are numbered in insertion order; a node's parent always precedes
    it. Flattened depth-first, every subtree is a contiguous interval, so
    "j is an ancestor of i (or i itself)" is ``j <= i < end[j]``.
    """

    __slots__ = ("_root", "children", "depth", "parent", "reqs", "scored", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self.children: list[dict[int, int]] = []
        self.scored: list[tuple[int, int, int, int]] = []  # node, target, request, option
        self.reqs: set[int] = set()
        self._root: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def new_tokens(self, seq: Sequence[int]) -> int:
        """How many nodes inserting ``seq`` would add."""
        kids = self._root
        for i, t in enumerate(seq):
            node = kids.get(t)
            if node is None:
                return len(seq) - i
            kids = self.children[node]
        return 0

    def insert(self, seq: Sequence[int]) -> list[int]:
        """Add a token path; returns its node ids."""
        path: list[int] = []
        kids = self._root
        parent = -1
        for t in seq:
            node = kids.get(t)
            if node is None:
                node = len(self.tokens)
                self.tokens.append(t)
                self.parent.append(parent)
                self.depth.append(len(path))
                self.children.append({})
                kids[t] = node
            path.append(node)
            parent = node
            kids = self.children[node]
        return path

    def add_option(self, req: int, opt: int, context: Sequence[int], cont: Sequence[int]) -> None:
        """Insert ``context + cont[:-1]`` and record which node predicts each ``cont`` token."""
        path = self.insert([*context, *cont[:-1]])
        start = len(context) - 1
        for k, tgt in enumerate(cont):
            self.scored.append((path[start + k], tgt, req, opt))
        self.reqs.add(req)

    def flatten(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """Depth-first order: (tokens, positions, subtree end, new index of each node)."""
        n = len(self.tokens)
        kids: list[list[int]] = [[] for _ in range(n)]
        roots: list[int] = []
        for node, par in enumerate(self.parent):
            (roots if par < 0 else kids[par]).append(node)
        order: list[int] = []
        stack = list(reversed(roots))
        while stack:
            node = stack.pop()
            order.append(node)
            stack.extend(reversed(kids[node]))
        new = [0] * n
        for i, node in enumerate(order):
            new[node] = i
        size = [1] * n
        for node in reversed(order):
            par = self.parent[node]
            if par >= 0:
                size[par] += size[node]
        tokens = [self.tokens[node] for node in order]
        pos = [self.depth[node] for node in order]
        end = [new[node] + size[node] for node in order]
        return tokens, pos, end, new


def _alone_size(opts: Sequence[EncodedOption]) -> int:
    """Upper bound on the nodes one request needs in an empty tree."""
    return _cost(None, opts)


def _cost(tree: _Tree | None, opts: Sequence[EncodedOption]) -> int:
    """Upper bound on the nodes inserting a request's options into ``tree`` adds."""
    if not opts:
        return 0
    first = opts[0]
    if all(o.context == first.context for o in opts):
        head = [*first.context, *first.continuation[:-1]]
        n = tree.new_tokens(head) if tree is not None else len(head)
        return n + sum(len(o.continuation) - 1 for o in opts[1:])
    total = 0
    for o in opts:
        seq = [*o.context, *o.continuation[:-1]]
        total += tree.new_tokens(seq) if tree is not None else len(seq)
    return total


def pack_trees(encoded: Sequence[Sequence[EncodedOption]], cap: int) -> list[_Tree]:
    """Pack tokenised requests into token trees of at most about ``cap`` nodes each.

    Prompts go in token order, so that requests sharing a prefix are neighbours; a
    request goes into the last tree when it fits there (sharing what it can), else into
    the first tree with room (first fit), else a new tree.
    """
    alone = [_alone_size(opts) for opts in encoded]
    order = sorted(range(len(encoded)), key=lambda r: encoded[r][0].context if encoded[r] else ())
    trees: list[_Tree] = []
    for r in order:
        opts = encoded[r]
        target: _Tree | None = None
        if trees and len(trees[-1]) + _cost(trees[-1], opts) <= cap:
            target = trees[-1]
        else:
            for tree in trees:
                if len(tree) + alone[r] <= cap:
                    target = tree
                    break
        if target is None:
            target = _Tree()
            trees.append(target)
        for j, o in enumerate(opts):
            target.add_option(r, j, o.context, o.continuation)
    return trees


class HFChoiceScorer:
    """Packed-sequence scorer for a transformers causal LM (optionally PEFT-wrapped).

    It supports ``bf16-verified`` scoring: the decoder runs under bfloat16 autocast (AMX on
    CPUs, tensor cores on GPUs; the LM head stays in the weights' dtype) and close calls are
    rescored in the weights' dtype.

    Args:
        model: A causal LM (``PreTrainedModel`` or ``PeftModel``), eval mode.
        tokenizer: Its tokenizer.
        batch_tokens: Upper bound on ``rows x padded length`` of one forward.
        boundary, add_special_tokens: Tokenisation, see :class:`ChoiceEncoder`.
        max_row_tokens: Row width: several requests are packed into one row
            (a forest of token trees, so no padding inside it) up to this many
            tokens; a request longer than that gets a row of its own size. None:
            :data:`CPU_ROW_TOKENS` on a CPU, 256 elsewhere.
        attention: Attention implementation used while scoring (``eager`` or ``sdpa``);
            None: ``eager`` on a CPU, the model's own elsewhere. The model's setting is
            restored after every pass.
        compile: Run the bf16 pass's decoder layers through ``torch.compile`` (inductor
            fuses the norms, rotary embedding, activation and attention softmax that take
            half of a CPU pass; matmuls are unchanged). The layers are compiled for the
            pass only and the model is left as it was; if compiling fails, the pass falls
            back to eager with a warning. The float32 rescoring is never compiled (it gained
            nothing measurable). Off by default (see :data:`ENV_COMPILE`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        batch_tokens: int = 4096,
        boundary: str = "lm-eval",
        add_special_tokens: bool | None = None,
        max_row_tokens: int | None = None,
        attention: str | None = None,
        compile: bool = False,
    ) -> None:
        if batch_tokens < 1:
            raise ConfigError(f"`batch_tokens`={batch_tokens}; expected a positive integer")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_tokens = batch_tokens
        self.stats = ScorerStats()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._config = base.config
        impl = getattr(self._config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):
            raise ConfigError(
                f"packed scoring needs eager or sdpa attention (custom 4D masks); "
                f"this model uses {impl!r}: load it with attn_implementation='sdpa'"
            )
        if attention not in (None, "eager", "sdpa"):
            raise ConfigError(f"`attention`={attention!r}; expected eager or sdpa")
        on_cpu = next(base.parameters()).device.type == "cpu"
        self.attention = attention or ("eager" if on_cpu else impl)
        if max_row_tokens is None:
            max_row_tokens = CPU_ROW_TOKENS if on_cpu else 256
        self.max_row_tokens = max_row_tokens
        decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
        if decoder is None:
            decoder = getattr(base, getattr(base, "base_model_prefix", "model"), None)
        head = base.get_output_embeddings()
        if decoder is None or head is None:
            raise ModelError(f"{type(base).__name__}: cannot find its decoder and LM head")
        self._decoder = decoder
        self._head = head
        layers = getattr(decoder, "layers", None)
        self._layers: list[Any] = list(layers) if layers is not None else []
        self.compile = bool(compile) and bool(self._layers)
        self._compiled_calls: list[Any] | None = None
        self._compile_checked = False
        self._softcap = getattr(self._config, "final_logit_softcapping", None)
        self._logit_scale = getattr(self._config, "logit_scale", None)
        param = next(base.parameters())
        self._device = param.device
        self._dtype = param.dtype
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.encoder = ChoiceEncoder(tokenizer, boundary, add_special_tokens)

    def encode(self, requests: Sequence[ChoiceRequest]) -> list[list[EncodedOption]]:
        """Token ids of every option of every request (see :class:`ChoiceEncoder`)."""
        return self.encoder.encode(requests)

    # ------------------------------------------------------------------ scoring

    supports_bf16 = True

    def score(
        self,
        requests: Sequence[ChoiceRequest],
        progress: ScoreProgress | None = None,
        *,
        rescore: NeedsRescoring | None = None,
    ) -> list[ChoiceScores]:
        """Score requests in length-bucketed, token-budgeted packed batches.

        Results come back in request order. With ``rescore``, the pass runs under
        bfloat16 autocast and every request ``rescore`` picks is scored again in the
        weights' dtype (counted in ``stats.verified_requests``).
        """
        encoded = self.encode(requests)
        if rescore is None:
            return self.score_encoded(encoded, progress)
        scores = self.score_encoded(encoded, progress, bf16=True)
        close = [i for i, s in enumerate(scores) if rescore(i, s)]
        if close:
            exact = self.score_encoded([encoded[i] for i in close])
            for i, s in zip(close, exact, strict=True):
                scores[i] = s
        self.stats.verified_requests += len(close)
        return scores

    def score_encoded(
        self,
        encoded: Sequence[Sequence[EncodedOption]],
        progress: ScoreProgress | None = None,
        *,
        bf16: bool = False,
    ) -> list[ChoiceScores]:
        """Score already tokenised requests (under bfloat16 autocast with ``bf16``).

        Requests are packed into rows of about ``max_row_tokens`` tokens, each
        row a token trie: shared prefixes (one prompt for three options,
        identical prompts under answer permutations, one BBQ context under two
        questions) are computed once, and rows need almost no padding.
        """
        import torch

        for opts in encoded:
            for opt in opts:
                if opt.merged:
                    self.stats.boundary_merges += 1
                if not opt.continuation:
                    raise ConfigError("a continuation tokenises to nothing; cannot score it")
            if len({o.context for o in opts}) > 1:
                self.stats.split_requests += 1
        cap = max(
            min(self.max_row_tokens, self.batch_tokens),
            max((_alone_size(opts) for opts in encoded), default=1),
        )
        trees = pack_trees(encoded, cap)
        self.stats.requests += len(encoded)

        logprobs: list[list[float]] = [[0.0] * len(opts) for opts in encoded]
        remaining = [0] * len(encoded)
        for tree in trees:
            for r in tree.reqs:
                remaining[r] += 1
        order = sorted(range(len(trees)), key=lambda i: (-len(trees[i]), i))
        # one autocast region for the whole pass: autocast caches the bf16 copy of each
        # weight for the life of the region, so weights are cast once, not once per batch.
        # Its cache is bypassed under inference_mode (measured: a cast per call), hence
        # no_grad there.
        autocast = torch.autocast(device_type=self._device.type, dtype=torch.bfloat16, enabled=bf16)
        grad_off = torch.no_grad() if bf16 else torch.inference_mode()
        compiled = contextlib.nullcontext() if not (bf16 and self.compile) else self._compiled()
        with grad_off, autocast, self._attention(), compiled:
            start = 0
            while start < len(order):
                longest = len(trees[order[start]])
                rows = max(1, self.batch_tokens // max(longest, 1))
                batch = [trees[i] for i in order[start : start + rows]]
                start += len(batch)
                self._run_batch_guarded(batch, logprobs, bf16)
                done = 0
                for tree in batch:
                    for r in tree.reqs:
                        remaining[r] -= 1
                        done += remaining[r] == 0
                if progress is not None and done:
                    progress(done)
        return [
            ChoiceScores(tuple(lp), tuple(len(o.continuation) for o in opts))
            for lp, opts in zip(logprobs, encoded, strict=True)
        ]

    @contextlib.contextmanager
    def _attention(self) -> Iterator[None]:
        """Score with :attr:`attention`; the model's own setting is put back afterwards."""
        saved = self._config._attn_implementation
        self._config._attn_implementation = self.attention
        try:
            yield
        finally:
            self._config._attn_implementation = saved

    @contextlib.contextmanager
    def _compiled(self) -> Iterator[None]:
        """Decoder layers run compiled for the duration of a pass, then as they were."""
        import torch

        if self._compiled_calls is None:
            _inductor_cache()
            logger.info("compiling the bf16 scoring pass (torch.compile)")
            # One dynamic-shape graph serves every layer and every batch shape: the layers
            # share their code, and their parameters are graph inputs, not constants.
            self._compiled_calls = [
                torch.compile(layer._call_impl, dynamic=True) for layer in self._layers
            ]
        # ``nn.Module.compile()`` sets ``_compiled_call_impl`` for good; setting it here and
        # putting the old value back keeps the caller's model uncompiled outside the pass.
        saved = [layer._compiled_call_impl for layer in self._layers]
        for layer, call in zip(self._layers, self._compiled_calls, strict=True):
            layer._compiled_call_impl = call
        try:
            yield
        finally:
            for layer, old in zip(self._layers, saved, strict=True):
                layer._compiled_call_impl = old

    def _run_batch_guarded(
        self, batch: Sequence[_Tree], logprobs: list[list[float]], bf16: bool
    ) -> None:
        """:meth:`_run_batch`; the first compiled batch falls back to eager if compiling fails."""
        compiling = bf16 and self.compile
        if compiling and not self._compile_checked:
            try:
                self._run_batch(batch, logprobs)  # adds to logprobs only after the forward
            except Exception as exc:  # inductor's build failures share no base class
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                logger.warning(
                    "torch.compile failed (%s: %s); scoring without it (%s=0 skips it)",
                    type(exc).__name__,
                    first_line,
                    ENV_COMPILE,
                )
                self.compile = compiling = False
                for layer in self._layers:
                    layer._compiled_call_impl = None
                self._run_batch(batch, logprobs)
            self._compile_checked = True
        else:
            self._run_batch(batch, logprobs)
        if compiling:
            self.stats.compiled_batches += 1

    def _run_batch(self, batch: Sequence[_Tree], logprobs: list[list[float]]) -> None:
        import torch

        flat = [tree.flatten() for tree in batch]
        width = max(len(f[0]) for f in flat)
        n = len(batch)
        ids = torch.full((n, width), self._pad, dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        # padding: a node's subtree is itself only, so it attends to itself alone
        end = torch.arange(1, width + 1, dtype=torch.long).repeat(n, 1)
        flat_idx: list[int] = []
        targets: list[int] = []
        owners: list[tuple[int, int]] = []
        for b, (tree, (tokens, positions, ends, new)) in enumerate(zip(batch, flat, strict=True)):
            m = len(tokens)
            ids[b, :m] = torch.tensor(tokens, dtype=torch.long)
            pos[b, :m] = torch.tensor(positions, dtype=torch.long)
            end[b, :m] = torch.tensor(ends, dtype=torch.long)
            for node, tgt, r, j in tree.scored:
                flat_idx.append(b * width + new[node])
                targets.append(tgt)
                owners.append((r, j))
        col = torch.arange(width)
        # query i may attend to key j iff j is i's ancestor or i itself: j <= i < end[j]
        allowed = (col.view(1, 1, width) <= col.view(1, width, 1)) & (
            col.view(1, width, 1) < end.view(n, 1, width)
        )
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
        hidden = hidden.to(self._head.weight.dtype)
        # the LM head runs once per distinct scored position
        uniq = sorted(set(flat_idx))
        where = {f: i for i, f in enumerate(uniq)}
        sel = hidden.reshape(n * width, -1)[torch.tensor(uniq, device=dev)]
        with torch.autocast(device_type=self._device.type, enabled=False):
            logits = self._head(sel).float()  # the LM head always in the weights' dtype
        if self._logit_scale is not None:
            logits = logits * float(self._logit_scale)
        if self._softcap is not None:
            cap = float(self._softcap)
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp[
            torch.tensor([where[f] for f in flat_idx], device=dev),
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
