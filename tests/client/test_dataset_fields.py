"""What CacheDataset yields: the fields asked for, with the cache's exact values, cropped and
collated; DataLoader workers under fork and spawn; validation against what a run declares."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from test_dataset_support import LAYERS, SEQ_LEN, TEMPERATURES, TOPK, rows
from torch.utils.data import DataLoader

from kdcache.client.cache import TeacherCache
from kdcache.client.dataset import CacheDataset
from kdcache.core.errors import ManifestMismatchError, ShardIncompleteError

TOPK_KEYS = {"topk_logprobs", "topk_indices", "topk_logsumexp", "temperatures", "loss_mask"}


def test_samples_equal_the_cache_rows(cache_dir37: str) -> None:
    cache = TeacherCache(cache_dir37)
    ds = CacheDataset(cache_dir37, seed=1)
    n = 0
    for sample in ds:
        ref = cache[int(sample["row"])]
        assert set(sample) == set(ref)
        for key, value in ref.items():
            assert value.dtype == sample[key].dtype and torch.equal(value, sample[key]), key
        n += 1
    assert n == 37


def test_field_selection(cache_dir37: str) -> None:
    topk = next(iter(CacheDataset(cache_dir37, fields=["topk"])))
    assert set(topk) == {"row"} | TOPK_KEYS
    assert topk["topk_logprobs"].shape == (SEQ_LEN, TOPK)
    assert topk["topk_logprobs"].dtype == torch.float32
    assert topk["topk_indices"].dtype == torch.int64
    assert topk["topk_logsumexp"].shape == (SEQ_LEN, len(TEMPERATURES))
    assert topk["temperatures"].tolist() == TEMPERATURES
    hidden = next(iter(CacheDataset(cache_dir37, fields=["input_ids", f"hidden_{LAYERS[1]}"])))
    assert set(hidden) == {"row", "input_ids", "hidden_2"}
    assert hidden["hidden_2"].dtype == torch.bfloat16 and hidden["hidden_2"].shape == (SEQ_LEN, 32)
    with pytest.raises(ValueError, match="hidden_7"):
        CacheDataset(cache_dir37, fields=["hidden_7"])


def test_crop_to_shorter_sequence(cache_dir37: str) -> None:
    full = {int(s["row"]): s for s in CacheDataset(cache_dir37, shuffle=False)}
    cropped = list(CacheDataset(cache_dir37, shuffle=False, seq_len=5))
    assert len(cropped) == 37
    for s in cropped:
        ref = full[int(s["row"])]
        for key in (
            "input_ids",
            "topk_logprobs",
            "topk_indices",
            "topk_logsumexp",
            "hidden_1",
            "loss_mask",
        ):
            assert s[key].shape[0] == 5 and torch.equal(s[key], ref[key][:5]), key
    with pytest.raises(ValueError, match="seq_len"):
        CacheDataset(cache_dir37, seq_len=SEQ_LEN + 1)


def test_collate_and_pin_memory(cache_dir37: str) -> None:
    ds = CacheDataset(cache_dir37, fields=["input_ids", "topk", "hidden_1"], batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # on CPU-only machines torch warns that it cannot pin
        batches = list(DataLoader(ds, batch_size=4, pin_memory=True))
    if torch.cuda.is_available():
        assert all(t.is_pinned() for t in batches[0].values())
    b = batches[0]
    assert b["row"].shape == (4,)
    assert b["input_ids"].shape == (4, SEQ_LEN) and b["input_ids"].dtype == torch.int64
    assert b["topk_logprobs"].shape == (4, SEQ_LEN, TOPK)
    assert b["temperatures"].shape == (4, len(TEMPERATURES))
    assert b["hidden_1"].dtype == torch.bfloat16 and b["hidden_1"].shape == (4, SEQ_LEN, 32)
    got = [r for b in batches for r in b["row"].tolist()]
    assert len(got) == 40 and set(got) == set(range(37))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_fork_and_spawn(cache_dir37: str, context: str) -> None:
    ds = CacheDataset(cache_dir37, seed=2, batch_size=3, fields=["input_ids", "hidden_2"])
    in_process = rows(iter(ds))  # opens the store here first: a forked child must reopen it
    loader = ds.loader(num_workers=2, multiprocessing_context=context)
    got = [r for b in loader for r in b["row"].tolist()]
    assert sorted(got) == sorted(in_process)
    assert got == in_process, "workers must follow the global order in DataLoader order"


def test_expectations_pass_and_fail_with_every_problem(cache_dir37: str) -> None:
    m = TeacherCache(cache_dir37).manifest
    CacheDataset(
        cache_dir37,
        expect={
            "vocab_size": m.vocab_size,
            "tokenizer_fingerprint": m.tokenizer_fingerprint,
            "temperatures": [2.0],
            "layers": [1, 2],
            "seq_len": 8,
        },
    )
    with pytest.raises(ManifestMismatchError) as err:
        CacheDataset(
            cache_dir37,
            expect={
                "vocab_size": 999,
                "tokenizer_fingerprint": "tok:other",
                "temperatures": [1.0, 4.0],
                "layers": [2, 5],
                "bogus": 1,
            },
        )
    text = str(err.value)
    for needle in ("vocab_size", "999", "tok:other", "[4.0]", "[5]", "bogus"):
        assert needle in text


def test_expected_tokenizer_directory(cache_dir37: str, tiny_teacher_dir: Path, tmp_path: Path):
    CacheDataset(cache_dir37, expect={"tokenizer": tiny_teacher_dir})
    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.json").write_text('{"different": true}')
    with pytest.raises(ManifestMismatchError, match="another vocabulary"):
        CacheDataset(cache_dir37, expect={"tokenizer": other})


def test_incomplete_cache_is_refused(cache_dir37: str, tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache_dir37, copy)
    (copy / "_kdcache" / "shards" / "00000002.json").unlink()
    with pytest.raises(ShardIncompleteError, match="4 of 5 shards"):
        CacheDataset(copy)
