"""Chat data end to end: the cached loss mask is the assistant's targets; masked KD is exact.

The teacher is the tiny Llama (V=320), the student the tiny GPT-2; the conversations are
``toy.SAMPLE_CHATS`` under a word-level tokenizer whose template marks the assistant's turns.
``topk`` = V, so the cached top-k is the full distribution and the loss has a dense reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.client import TeacherCache, losses
from kdcache.core.reader import CacheReader
from kdcache.core.spec import parse_spec
from kdcache.worker import toy
from kdcache.worker.runner import run_job

V = 320
TEMPS = [1.0, 2.0]


def _spec(teacher: Path, chats: Path, tokenizer: Path, seq_len: int) -> dict[str, Any]:
    return {
        "name": f"chat-{seq_len}",
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {
            "jsonl": str(chats),
            "messages_field": "messages",
            "tokenizer": str(tokenizer),
            "seq_len": seq_len,
            "pack": False,
        },
        "outputs": {"topk": V, "temperatures": TEMPS},
        "batch_size": 4,
        "rows_per_shard": 2,
    }


@pytest.fixture(scope="module")
def caches(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_teacher_dir: Path,
    chat_jsonl: Path,
    chat_tokenizer_dir: Path,
) -> dict[int, str]:
    """The sample conversations cached at seq_len 64 and 96 (one row each, right-padded)."""
    root = tmp_path_factory.mktemp("chat-root")
    return {
        n: run_job(parse_spec(_spec(tiny_teacher_dir, chat_jsonl, chat_tokenizer_dir, n)), root)
        for n in (64, 96)
    }


def assistant_targets(tok: Any, chat: list[dict[str, str]]) -> np.ndarray:
    """(len,) bool: which tokens of the rendered chat are the assistant's, word by word."""
    flags: list[bool] = []
    for m in chat:
        n = len(m["content"].split()) + 1  # words and <|end|>
        flags += [False] + [m["role"] == "assistant"] * n
    return np.array(flags)


def test_loss_mask_is_true_exactly_where_the_target_is_the_assistants(
    caches: dict[int, str], chat_tokenizer_dir: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    r = CacheReader(caches[64])
    assert r.manifest.loss_mask and r.manifest.dataset["messages_field"] == "messages"
    mask = r.read("loss_mask", slice(None))
    ids = r.read("input_ids", slice(None))
    assert mask.shape == (len(toy.SAMPLE_CHATS), 64)
    for row, chat in enumerate(toy.SAMPLE_CHATS):
        flags = assistant_targets(tok, chat)
        want = np.zeros(64, dtype=bool)
        want[: len(flags) - 1] = flags[1:]
        np.testing.assert_array_equal(mask[row], want)
        header = tok.convert_tokens_to_ids("<|assistant|>")
        # every trained position predicts an assistant word or its <|end|>, never a header
        assert header not in ids[row, 1:][mask[row, :-1]].tolist()
    assert all(c.ok for c in r.verify())


def _student_logits(student: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return student(ids).logits.double()


def _dense_ref(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, t: float) -> float:
    """t² · KL(teacher_t ‖ student_t), float64, averaged over the masked positions only."""
    q = torch.softmax(teacher / t, dim=-1)
    log_p = torch.log_softmax(student / t, dim=-1)
    kl = (torch.xlogy(q, q) - q * log_p).sum(-1)
    return float(t**2 * kl[mask].mean())


@pytest.mark.parametrize("t", TEMPS)
def test_masked_kd_loss_equals_the_dense_float64_loss_on_assistant_positions(
    caches: dict[int, str],
    tiny_teacher_dir: Path,
    tiny_gpt2_dir: Path,
    chat_tokenizer_dir: Path,
    t: float,
) -> None:
    cache = TeacherCache(caches[64])
    rows = list(range(len(toy.SAMPLE_CHATS)))
    batch = cache.batch(rows, fields=["input_ids", "topk"])
    mask = torch.from_numpy(CacheReader(caches[64]).read("loss_mask", slice(None)))
    ids = batch["input_ids"]
    student = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float64).eval()
    s = _student_logits(student, ids)
    with torch.no_grad():
        z = teacher(ids).logits.double()
    got = float(losses.kd_loss(s, batch, temperature=t, mask=mask))
    want = _dense_ref(s, z, mask, t)
    assert got == pytest.approx(want, rel=2e-3)
    # the mask matters: over every position (padding, prompts) the loss is another number
    everywhere = _dense_ref(s, z, torch.ones_like(mask), t)
    assert abs(everywhere - want) > 50 * abs(got - want) + 1e-3


def test_padding_changes_nothing(caches: dict[int, str], tiny_gpt2_dir: Path) -> None:
    student = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir, dtype=torch.float64).eval()
    rows = list(range(len(toy.SAMPLE_CHATS)))
    out = {}
    for n, url in caches.items():
        batch = TeacherCache(url).batch(rows, fields=["input_ids", "topk"])
        mask = torch.from_numpy(CacheReader(url).read("loss_mask", slice(None)))
        assert mask.shape[1] == n
        s = _student_logits(student, batch["input_ids"])
        out[n] = [float(losses.kd_loss(s, batch, temperature=t, mask=mask)) for t in TEMPS]
    assert out[64] == pytest.approx(out[96], rel=1e-5)
