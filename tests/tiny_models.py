"""A tiny random-weight Llama and a local BPE tokenizer for tests (no hub access)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

TEXT = (
    "the man woman who was late not enough information unknown secretary board meeting a and "
    "were met q answer with letter of correct option question can't be determined nurse "
    "doctor engineer gender identity age A B C . , : ? ! ( ) 0 1 2 3 4 5 6 7 8 9 \n"
)

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(
    *,
    bos: bool = False,
    chat: bool = True,
    corpus: Sequence[str] = (TEXT,) * 20,
    vocab_size: int = 400,
    chat_template: str = CHAT_TEMPLATE,
) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus``; ``bos`` makes it prepend ``<s>``
    like Llama tokenizers; ``chat`` attaches ``chat_template``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat:
        fast.chat_template = chat_template
    return fast


def make_tiny(
    path: Path,
    *,
    bos: bool = False,
    chat: bool = True,
    corpus: Sequence[str] = (TEXT,) * 20,
    vocab_size: int = 400,
    chat_template: str = CHAT_TEMPLATE,
    initializer_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Save a 2-layer random LlamaForCausalLM and its tokenizer to ``path``.

    A larger ``initializer_range`` gives larger logits, so answers are not near-tied.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = make_tokenizer(
        bos=bos, chat=chat, corpus=corpus, vocab_size=vocab_size, chat_template=chat_template
    )
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
