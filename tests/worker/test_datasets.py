"""Dataset sources: .npy rows, JSON lines packing / padding, errors naming file, line and field."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdcache.core.errors import DatasetError
from kdcache.worker import toy
from kdcache.worker.datasets import DatasetSource, JsonlSource, TokensSource, open_source


def tokenize(tokenizer_dir: Path, texts: list[str] | tuple[str, ...]) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    return [tok(t)["input_ids"] for t in texts]


def test_tokens_source_reads_rows(tokens_npy: Path) -> None:
    src = TokensSource(tokens_npy)
    assert isinstance(src, DatasetSource)
    arr = np.load(tokens_npy)
    assert (src.num_rows, src.seq_len) == arr.shape == (8, 16)
    rows = src.rows(2, 5)
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, arr[2:5])
    assert src.rows(8, 8).shape == (0, 16)
    with pytest.raises(DatasetError, match="out of range"):
        src.rows(6, 9)


def test_tokens_source_mask_is_every_position_but_the_last(tokens_npy: Path) -> None:
    mask = TokensSource(tokens_npy).loss_mask(1, 4)
    assert mask.dtype == np.bool_ and mask.shape == (3, 16)
    assert mask[:, :-1].all() and not mask[:, -1].any()


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.arange(10, dtype=np.int32), r"2-D \(N, T\) array, got shape \(10,\)"),
        (np.zeros((2, 3, 4), dtype=np.int32), "2-D"),
        (np.zeros((2, 8), dtype=np.float32), "integer token ids, got dtype float32"),
    ],
)
def test_tokens_source_rejects_bad_arrays(tmp_path: Path, array: np.ndarray, match: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(DatasetError, match=match) as err:
        TokensSource(path)
    assert str(path) in str(err.value)


def test_tokens_source_missing_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        TokensSource(tmp_path / "missing.npy")
    junk = tmp_path / "junk.npy"
    junk.write_bytes(b"not numpy")
    with pytest.raises(DatasetError, match="not a readable .npy"):
        TokensSource(junk)


def test_jsonl_packing(docs_jsonl: Path, tokenizer_dir: Path) -> None:
    src = JsonlSource(docs_jsonl, tokenizer_path=tokenizer_dir, seq_len=8)
    assert isinstance(src, DatasetSource)
    assert src.eos_token_id == 0 and src.pad_token_id == 1
    stream = [i for doc in tokenize(tokenizer_dir, toy.SAMPLE_TEXTS) for i in (*doc, 0)]
    n = len(stream) // 8
    assert len(stream) % 8 != 0, "the fixture should leave a partial last row to drop"
    assert src.num_rows == n and src.seq_len == 8
    want = np.array(stream[: n * 8]).reshape(n, 8)
    np.testing.assert_array_equal(src.rows(0, n), want)
    assert src.rows(0, 1).dtype == np.int64
    assert src.fingerprint_extra["pack"] is True and src.fingerprint_extra["seq_len"] == 8


def test_jsonl_padding(docs_jsonl: Path, tokenizer_dir: Path) -> None:
    docs = tokenize(tokenizer_dir, toy.SAMPLE_TEXTS)
    seq_len = 16
    assert min(map(len, docs)) < seq_len < max(map(len, docs)), "need short and long docs"
    src = JsonlSource(docs_jsonl, tokenizer_path=tokenizer_dir, seq_len=seq_len, pack=False)
    assert src.num_rows == len(docs)
    rows = src.rows(0, src.num_rows)
    for r, doc in enumerate(docs):
        kept = doc[:seq_len]
        np.testing.assert_array_equal(rows[r, : len(kept)], kept)
        assert (rows[r, len(kept) :] == src.pad_token_id).all()
        assert src.lengths[r] == len(kept)
    mask = src.loss_mask(0, src.num_rows)
    for r, doc in enumerate(docs):
        n = min(len(doc), seq_len)
        # position j predicts token j+1: trained while j+1 is a real token of the document
        np.testing.assert_array_equal(mask[r], np.arange(seq_len) < n - 1)
    np.testing.assert_array_equal(src.loss_mask(2, 4), mask[2:4])


def test_jsonl_packed_mask_is_every_position_but_the_last(
    docs_jsonl: Path, tokenizer_dir: Path
) -> None:
    src = JsonlSource(docs_jsonl, tokenizer_path=tokenizer_dir, seq_len=8)
    mask = src.loss_mask(0, src.num_rows)
    assert mask[:, :-1].all() and not mask[:, -1].any()


def test_jsonl_pads_with_eos_without_pad_token(
    tmp_path: Path, docs_jsonl: Path, tokenizer_dir: Path
) -> None:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    tok.pad_token = None
    tok.save_pretrained(str(tmp_path))
    src = JsonlSource(docs_jsonl, tokenizer_path=tmp_path, seq_len=64, pack=False)
    assert src.pad_token_id == src.eos_token_id == 0
    assert (src.rows(0, 1)[0, int(src.lengths[0]) :] == 0).all()


def test_jsonl_is_deterministic(docs_jsonl: Path, tokenizer_dir: Path) -> None:
    a = JsonlSource(docs_jsonl, tokenizer_path=tokenizer_dir, seq_len=8)
    b = JsonlSource(docs_jsonl, tokenizer_path=tokenizer_dir, seq_len=8)
    np.testing.assert_array_equal(a.rows(0, a.num_rows), b.rows(0, b.num_rows))


def test_jsonl_custom_text_field_and_blank_lines(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "hello world"}\n\n{"body": "again"}\n')
    src = JsonlSource(path, tokenizer_path=tokenizer_dir, seq_len=4, text_field="body", pack=False)
    assert src.num_rows == 2


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"text": "a"}', "", "{not json"], "line 3: not valid JSON"),
        (['{"text": "a"}', '{"body": "b"}'], "line 2: no field 'text'"),
        (['{"text": 5}'], "line 1: field 'text' must be a string"),
        (["[1, 2]"], "line 1: no field 'text'"),
    ],
)
def test_jsonl_bad_lines(tmp_path: Path, tokenizer_dir: Path, lines: list[str], match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=match) as err:
        JsonlSource(path, tokenizer_path=tokenizer_dir, seq_len=4)
    assert str(path) in str(err.value)


def test_jsonl_too_short_for_one_row(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(DatasetError, match="no rows of 100 tokens"):
        JsonlSource(path, tokenizer_path=tokenizer_dir, seq_len=100)


def test_jsonl_bad_tokenizer(docs_jsonl: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot load tokenizer"):
        JsonlSource(docs_jsonl, tokenizer_path=tmp_path / "none", seq_len=8)


def ds(**kw: object) -> SimpleNamespace:
    base: dict = {
        "tokens": None,
        "jsonl": None,
        "text_field": "text",
        "tokenizer": None,
        "seq_len": None,
        "pack": True,
    }
    base.update(kw)
    return SimpleNamespace(**base)


def test_open_source(
    tokens_npy: Path, docs_jsonl: Path, tiny_teacher_dir: Path, tokenizer_dir: Path
) -> None:
    assert isinstance(open_source(ds(tokens=str(tokens_npy))), TokensSource)
    with pytest.raises(DatasetError, match="rows have 16 tokens, seq_len is 8"):
        open_source(ds(tokens=str(tokens_npy), seq_len=8))
    by_teacher = open_source(
        ds(jsonl=str(docs_jsonl), seq_len=8), teacher_dir=str(tiny_teacher_dir)
    )
    by_tok = open_source(ds(jsonl=str(docs_jsonl), seq_len=8, tokenizer=str(tokenizer_dir)))
    assert isinstance(by_teacher, JsonlSource) and isinstance(by_tok, JsonlSource)
    np.testing.assert_array_equal(by_teacher.rows(0, 3), by_tok.rows(0, 3))
    with pytest.raises(DatasetError, match="needs a tokenizer"):
        open_source(ds(jsonl=str(docs_jsonl), seq_len=8))
    with pytest.raises(DatasetError, match="exactly one"):
        open_source(ds())


def test_accepts_the_core_dataset_spec(docs_jsonl: Path, tiny_teacher_dir: Path) -> None:
    from kdcache.core.spec import DatasetSpec

    src = open_source(
        DatasetSpec(jsonl=str(docs_jsonl), seq_len=8, pack=False), str(tiny_teacher_dir)
    )
    assert isinstance(src, JsonlSource) and src.seq_len == 8 and not src.pack
