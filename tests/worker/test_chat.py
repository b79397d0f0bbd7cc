"""Conversations: template rendering, assistant-only masks (markers, prefix diff), checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdcache.core.documents import check_messages
from kdcache.core.errors import DatasetError, SpecError
from kdcache.core.spec import DatasetSpec
from kdcache.worker import toy
from kdcache.worker.chat import ChatRenderer, has_generation_markers
from kdcache.worker.datasets import JsonlSource, open_checked


def expected(tok: Any, chat: list[dict[str, str]]) -> tuple[list[int], np.ndarray]:
    """Ids and assistant flags of the toy template, built word by word (independently)."""
    ids: list[int] = []
    flags: list[bool] = []
    for m in chat:
        words = [f"<|{m['role']}|>", *m["content"].split(), "<|end|>"]
        ids += tok.convert_tokens_to_ids(words)
        mine = m["role"] == "assistant"
        flags += [False] + [mine] * (len(words) - 1)
    return ids, np.array(flags)


@pytest.mark.parametrize("fixture", ["chat_tokenizer_dir", "chat_tokenizer_plain_dir"])
def test_assistant_tokens_are_exactly_the_assistants(
    request: pytest.FixtureRequest, fixture: str
) -> None:
    path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    renderer = ChatRenderer(tok, str(path))
    assert renderer.method == ("generation" if fixture == "chat_tokenizer_dir" else "prefix")
    for chat in toy.SAMPLE_CHATS:
        ids, flags = renderer.render(chat, "test")
        want_ids, want_flags = expected(tok, chat)
        assert ids == want_ids
        np.testing.assert_array_equal(flags, want_flags)
        assert 2 not in ids  # no <unk>: every word is in the vocabulary


def test_markers_and_prefix_diff_agree(
    chat_tokenizer_dir: Path, chat_tokenizer_plain_dir: Path
) -> None:
    a = ChatRenderer(AutoTokenizer.from_pretrained(str(chat_tokenizer_dir)), "a")
    b = ChatRenderer(AutoTokenizer.from_pretrained(str(chat_tokenizer_plain_dir)), "b")
    assert has_generation_markers(a.template) and not has_generation_markers(b.template)
    for chat in toy.SAMPLE_CHATS:
        ids_a, flags_a = a.render(chat, "x")
        ids_b, flags_b = b.render(chat, "x")
        assert ids_a == ids_b
        np.testing.assert_array_equal(flags_a, flags_b)


def test_a_template_that_rewrites_history_is_refused(
    tmp_path: Path, chat_tokenizer_plain_dir: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_plain_dir))
    # shows only the last assistant turn: earlier renders are not prefixes of later ones
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|' + m['role'] + '|> ' + m['content'] + ' <|end|> ' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
    )
    renderer = ChatRenderer(tok, "t")
    with pytest.raises(DatasetError, match="row 9: the chat template does not render") as err:
        renderer.render(toy.SAMPLE_CHATS[0], "row 9")
    assert err.value.field == "dataset.messages_field"


def test_a_tokenizer_without_a_template_is_refused(tokenizer_dir: Path) -> None:
    with pytest.raises(DatasetError, match="has no chat template") as err:
        ChatRenderer(AutoTokenizer.from_pretrained(str(tokenizer_dir)), str(tokenizer_dir))
    assert err.value.field == "dataset.messages_field"


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("text", "must be a list of {role, content} messages, got str"),
        ([], "empty conversation"),
        ([{"role": "robot", "content": "beep"}], r"messages\[0\] has unknown role 'robot'"),
        ([{"role": "user", "content": "hi"}, "x"], r"messages\[1\] must be a {role, content}"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string, got int"),
        ([{"role": "user", "content": "hi"}], "has no assistant turn"),
    ],
)
def test_bad_conversations_name_the_row(value: Any, match: str) -> None:
    with pytest.raises(DatasetError, match=match) as err:
        check_messages(value, "chat.jsonl line 4", "messages")
    assert str(err.value).startswith("chat.jsonl line 4: ")


def test_chat_jsonl_rows_and_masks(chat_jsonl: Path, chat_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    seq_len = 48
    src = JsonlSource(
        chat_jsonl,
        tokenizer_path=chat_tokenizer_dir,
        seq_len=seq_len,
        messages_field="messages",
        pack=False,
    )
    assert src.num_rows == len(toy.SAMPLE_CHATS)
    rows, mask = src.rows(0, src.num_rows), src.loss_mask(0, src.num_rows)
    for r, chat in enumerate(toy.SAMPLE_CHATS):
        ids, flags = expected(tok, chat)
        n = len(ids)
        np.testing.assert_array_equal(rows[r, :n], ids)
        assert (rows[r, n:] == tok.pad_token_id).all()
        # position j trains iff token j+1 is the assistant's
        want = np.zeros(seq_len, dtype=bool)
        want[: n - 1] = flags[1:]
        np.testing.assert_array_equal(mask[r], want)


def test_packed_chats_keep_each_tokens_flag(chat_jsonl: Path, chat_tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir))
    src = JsonlSource(
        chat_jsonl, tokenizer_path=chat_tokenizer_dir, seq_len=16, messages_field="messages"
    )
    stream: list[int] = []
    targets: list[bool] = []
    for chat in toy.SAMPLE_CHATS:
        ids, flags = expected(tok, chat)
        stream += [*ids, tok.eos_token_id]
        targets += [*flags, False]  # the separator after a conversation is nobody's turn
    n = len(stream) // 16
    assert src.num_rows == n
    np.testing.assert_array_equal(src.rows(0, n).ravel(), stream[: n * 16])
    t = np.array(targets[: n * 16]).reshape(n, 16)
    mask = src.loss_mask(0, n)
    np.testing.assert_array_equal(mask[:, :-1], t[:, 1:])
    assert not mask[:, -1].any()


def test_bad_row_in_a_file_is_a_spec_error_naming_field_and_line(
    tmp_path: Path, chat_tokenizer_dir: Path
) -> None:
    path = tmp_path / "chat.jsonl"
    rows = [toy.SAMPLE_CHATS[1], [{"role": "user", "content": "hi"}]]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    spec = DatasetSpec(
        jsonl=str(path), messages_field="messages", tokenizer=str(chat_tokenizer_dir), seq_len=8
    )
    with pytest.raises(SpecError) as err:
        open_checked(spec)
    (problem,) = err.value.problems
    assert problem.field == "dataset.messages_field"
    assert (
        problem.message
        == f"{path} line 2: field 'messages' has no assistant turn (nothing to train on)"
    )
    missing = DatasetSpec(
        jsonl=str(path), messages_field="conv", tokenizer=str(chat_tokenizer_dir), seq_len=8
    )
    with pytest.raises(SpecError, match=r"line 1: no field 'conv'"):
        open_checked(missing)
