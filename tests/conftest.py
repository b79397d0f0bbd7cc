"""Shared fixtures: tiny offline assets, built once per test session.

Sizes (see :mod:`kdcache.worker.toy`): teachers have V=320, d=32, 128 positions; the tokenizer is a
byte-level BPE of vocab 320 with EOS=0, PAD=1, BOS=2, so its ids are valid teacher ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kdcache.worker import toy

TINY_VOCAB = 320


@pytest.fixture(scope="session", autouse=True)
def _fingerprint_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Remembered file hashes go to this session's folder, never the user's ~/.cache."""
    os.environ["KDCACHE_FINGERPRINT_CACHE"] = str(tmp_path_factory.mktemp("fingerprints"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only the tiny tokenizer."""
    return toy.make_tokenizer(tmp_path_factory.mktemp("tokenizer"), vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A word-level tokenizer whose chat template marks assistant text with {% generation %}."""
    return toy.make_chat_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"), generation=True)


@pytest.fixture(scope="session")
def chat_tokenizer_plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tokenizer with the same template minus the generation markers."""
    return toy.make_chat_tokenizer(
        tmp_path_factory.mktemp("chat-tokenizer-plain"), generation=False
    )


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSON lines, one ``{"messages": [...]}`` per line, from ``toy.SAMPLE_CHATS``."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in toy.SAMPLE_CHATS))
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama HF directory (safetensors) with the tiny tokenizer saved next to it."""
    path = toy.make_tiny_teacher(
        tmp_path_factory.mktemp("teacher-llama"), arch="llama", vocab_size=TINY_VOCAB
    )
    return toy.make_tokenizer(path, vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer GPT-2 HF directory (no tokenizer): tied embeddings, learned positions."""
    return toy.make_tiny_teacher(
        tmp_path_factory.mktemp("teacher-gpt2"), arch="gpt2", vocab_size=TINY_VOCAB, num_layers=3
    )


@pytest.fixture(scope="session")
def tokens_npy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (8, 16) int32 ``.npy`` of random ids below TINY_VOCAB."""
    return toy.make_tokens(
        tmp_path_factory.mktemp("data") / "tokens.npy", 8, 16, TINY_VOCAB, seed=0
    )


@pytest.fixture(scope="session")
def docs_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSON lines, one ``{"text": ...}`` per line, from ``toy.SAMPLE_TEXTS``."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy.SAMPLE_TEXTS))
    return path
