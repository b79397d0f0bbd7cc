"""Tiny, offline assets for tests, benchmarks and the demo: a random-init HF teacher, a small
byte-level BPE tokenizer, and a random token array. Nothing here touches the network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "BOS_TOKEN",
    "CHAT_TEMPLATE",
    "CHAT_TEMPLATE_PLAIN",
    "SAMPLE_CHATS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SAMPLE_TEXTS",
    "make_chat_tokenizer",
    "make_tiny_teacher",
    "make_tokenizer",
    "make_tokens",
]

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"

SAMPLE_TEXTS = (
    "The teacher runs once; the students train many times.",
    "Knowledge distillation matches a small model to a large one.",
    "Top-k log-probabilities and the exact log-normaliser are cached per position.",
    "Hidden states of selected layers are stored in bfloat16.",
    "A shard is a contiguous range of rows written by one worker.",
    "the quick brown fox jumps over the lazy dog " * 3,
    "Hello, student.",
    "KD",
)


def _chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


SAMPLE_CHATS = (
    _chat(
        ("system", "you are a terse teacher"),
        ("user", "what is distillation"),
        ("assistant", "a small model learns from a large one"),
        ("user", "why cache the teacher"),
        ("assistant", "so the teacher runs once"),
    ),
    _chat(("user", "hello"), ("assistant", "hello student")),
    _chat(("system", "answer in one word"), ("user", "name a loss"), ("assistant", "kl")),
    _chat(
        ("user", "how many shards are there"),
        ("assistant", "one per lease"),
        ("user", "thanks"),
        ("assistant", "you are welcome"),
    ),
    _chat(
        ("user", "what is top k"),
        ("assistant", "the k most likely tokens with their log probabilities"),
    ),
)
"""Conversations (system / user / assistant turns) for chat-data tests, each under 40 tokens."""

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|assistant|> ' }}"
    "{% generation %}{{ m['content'] }} <|end|> {% endgeneration %}"
    "{% else %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)
"""A chat template that marks the assistant's text with ``{% generation %}``: each turn is
``<|role|> words <|end|>``, and an assistant turn trains its words and its ``<|end|>``."""

CHAT_TEMPLATE_PLAIN = CHAT_TEMPLATE.replace("{% generation %}", "").replace(
    "{% endgeneration %}", ""
)
"""The same template without generation markers (renders the same text)."""

CHAT_ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def make_chat_tokenizer(
    path: str | Path,
    *,
    generation: bool = True,
    chats: Iterable[list[dict[str, str]]] = SAMPLE_CHATS,
    texts: Iterable[str] = (),
) -> Path:
    """Save a word-level tokenizer with a chat template into ``path``.

    One id per whitespace/punctuation-separated word of ``chats`` and ``texts``; ids 0..2 are
    ``<eos>``, ``<pad>``, ``<unk>``, then the role markers ``<|system|>``, ``<|user|>``,
    ``<|assistant|>``, ``<|end|>``. ``generation`` picks :data:`CHAT_TEMPLATE` (with
    ``{% generation %}``) or :data:`CHAT_TEMPLATE_PLAIN`. Ids stay far below 320 for the sample
    conversations, so the tiny teachers can run on them.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = {w for c in chats for m in c for w, _ in pre.pre_tokenize_str(m["content"])}
    words |= {w for t in texts for w, _ in pre.pre_tokenize_str(t)}
    specials = ["<eos>", "<pad>", "<unk>", *CHAT_ROLES]
    vocab = {w: i for i, w in enumerate([*specials, *sorted(words - set(specials))])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE if generation else CHAT_TEMPLATE_PLAIN
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def make_tiny_teacher(
    path: str | Path,
    *,
    arch: str = "llama",
    vocab_size: int = 320,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 128,
    seed: int = 0,
    initializer_range: float = 0.2,
) -> Path:
    """Save a random-init causal LM (``arch`` "llama" or "gpt2") as safetensors into ``path``.

    ``initializer_range`` is larger than HF's 0.02 so the logits are far from uniform, which makes
    top-k orderings and temperature effects visible in tests.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model: torch.nn.Module
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                num_key_value_heads=max(1, num_heads // 2),
                max_position_embeddings=max_positions,
                initializer_range=initializer_range,
                # the ids make_tokenizer gives its special tokens
                eos_token_id=0,
                pad_token_id=1,
                bos_token_id=2,
            )
        )
    elif arch == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab_size,
                n_embd=hidden_size,
                n_layer=num_layers,
                n_head=num_heads,
                n_positions=max_positions,
                initializer_range=initializer_range,
                # the ids make_tokenizer gives its special tokens
                eos_token_id=0,
                pad_token_id=1,
                bos_token_id=2,
            )
        )
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    model.save_pretrained(out)
    log.info(
        "saved tiny %s teacher (V=%d, L=%d, d=%d) to %s",
        arch,
        vocab_size,
        num_layers,
        hidden_size,
        out,
    )
    return out


def make_tokenizer(
    path: str | Path, texts: Iterable[str] = SAMPLE_TEXTS, vocab_size: int = 320
) -> Path:
    """Train a byte-level BPE on ``texts`` and save it as a ``PreTrainedTokenizerFast`` into
    ``path`` (which may be a teacher's directory). Ids 0..2 are EOS, PAD, BOS; every byte has an
    id, so any text tokenises. ``vocab_size`` must be >= 259 (256 bytes + 3 specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS_TOKEN, PAD_TOKEN, BOS_TOKEN]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(specials)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=BOS_TOKEN
    )
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out


def make_tokens(
    path: str | Path, n_rows: int, seq_len: int, vocab_size: int, seed: int = 0
) -> Path:
    """Write an (n_rows, seq_len) int32 ``.npy`` of uniform random ids in [0, vocab_size)."""
    rng = np.random.default_rng(seed)
    out = Path(path)
    if out.suffix != ".npy":  # np.save would append it
        out = out.with_name(out.name + ".npy")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, rng.integers(0, vocab_size, size=(n_rows, seq_len), dtype=np.int32))
    return out
