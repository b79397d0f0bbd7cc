"""Batches made by the dataset (``iter_batches``, what ``ds.loader()`` hands out) equal what a
DataLoader collates from the rows, worker by worker, including batches that span two shuffle
windows; DataLoader workers get their share of decode threads."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from test_dataset_support import as_worker
from torch.utils.data import default_collate

from kdcache.client.dataset import CacheDataset


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("batch", [3, 5, 8])
@pytest.mark.parametrize("workers", [1, 2])
def test_batches_equal_collated_rows(cache_dir37: str, batch: int, workers: int) -> None:
    # windows of one shard (8 rows): batches of 3 and 5 span two windows, so two blocks
    ds = CacheDataset(
        cache_dir37,
        fields=["input_ids", "topk", "hidden_2"],
        seed=1,
        shuffle_window=8,
        batch_size=batch,
    )
    for w in range(workers):
        with as_worker(w, workers):
            samples = list(iter(ds))
            got = list(ds.iter_batches(batch))
        want = [default_collate(samples[i : i + batch]) for i in range(0, len(samples), batch)]
        assert len(got) == len(want) > 1
        for g, r in zip(got, want, strict=True):
            _equal(g, r)
            assert g["temperatures"].is_contiguous()


def test_loader_counts_batches_for_resume(cache_dir37: str) -> None:
    ds = CacheDataset(cache_dir37, fields=["input_ids"], seed=1, batch_size=4)
    it = iter(ds.loader())
    seen = [next(it)["row"].tolist() for _ in range(3)]
    state = ds.state_dict()
    assert state["consumed"] == 12
    rest = CacheDataset(cache_dir37, fields=["input_ids"], seed=1, batch_size=4)
    rest.load_state_dict(state)
    after = [b["row"].tolist() for b in rest.loader()]
    whole = [
        b["row"].tolist()
        for b in CacheDataset(cache_dir37, fields=["input_ids"], seed=1, batch_size=4).loader()
    ]
    assert seen + after == whole


def test_a_batch_inside_one_block_is_a_view(cache_dir37: str) -> None:
    ds = CacheDataset(cache_dir37, fields=["hidden_1"], seed=1, shuffle=False, batch_size=2)
    first, second = list(ds.iter_batches(2))[:2]
    a, b = first["hidden_1"], second["hidden_1"]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_workers_get_their_share_of_decode_threads(cache_dir37: str) -> None:
    ds = CacheDataset(cache_dir37, fields=["input_ids"], read_threads=8)
    assert ds._threads_here() == 8
    with mock.patch("os.sched_getaffinity", return_value=set(range(6)), create=True):
        with as_worker(0, 2):
            assert ds._threads_here() == 3
        with as_worker(1, 8):
            assert ds._threads_here() == 1


def test_two_workers_deliver_the_same_batches_as_none(cache_dir37: str) -> None:
    kw = {"fields": ["input_ids", "topk", "hidden_1"], "seed": 2, "batch_size": 4}
    main = list(CacheDataset(cache_dir37, **kw).loader())
    forked = list(
        CacheDataset(cache_dir37, **kw).loader(num_workers=2, multiprocessing_context="fork")
    )
    assert len(main) == len(forked) == 10
    for a, b in zip(main, forked, strict=True):
        _equal(a, b)
