"""Mid-epoch resume: a resumed run yields exactly the rows an uninterrupted run would have yielded
from that point, with the same or another world size, and refuses what it cannot continue."""

from __future__ import annotations

from typing import Any

import pytest
from test_dataset_support import global_sequence, padded_order, rank_batches, rows, take

from kdcache.client.dataset import CacheDataset, ResumeError

WINDOW = 8


def ranks(url: str, world: int, batch: int | None, **kw: Any) -> list[CacheDataset]:
    return [
        CacheDataset(
            url, rank=r, world_size=world, batch_size=batch, seed=5, shuffle_window=WINDOW, **kw
        )
        for r in range(world)
    ]


@pytest.mark.parametrize("batch,taken", [(4, 7), (4, 8), (None, 5)])
def test_resume_same_world_mid_batch_continues_each_rank(
    cache_dir37: str, batch: int | None, taken: int
) -> None:
    full = [rows(iter(ds)) for ds in ranks(cache_dir37, 2, batch)]
    before = ranks(cache_dir37, 2, batch)
    for ds, expected in zip(before, full, strict=True):
        assert take(ds, taken) == expected[:taken]
    state = before[0].state_dict()
    assert state["consumed"] == taken
    after = ranks(cache_dir37, 2, batch)
    for ds, expected in zip(after, full, strict=True):
        ds.load_state_dict(state)
        ds.set_epoch(0)  # the usual loop calls this; the loaded epoch keeps its position
        assert rows(iter(ds)) == expected[taken:]


@pytest.mark.parametrize(
    "old,new,workers",
    [((2, 3), (3, 2), 0), ((2, 3), (1, 6), 2), ((3, 2), (2, 3), 3), ((1, 6), (6, 1), 1)],
)
def test_resume_other_world_size_same_global_batch(
    cache_dir37: str, old: tuple[int, int], new: tuple[int, int], workers: int
) -> None:
    (w0, b0), (w1, b1) = old, new
    reference = CacheDataset(cache_dir37, seed=5, shuffle_window=WINDOW, batch_size=6)
    uninterrupted = padded_order(reference).tolist()
    before = ranks(cache_dir37, w0, b0)
    steps = 3
    for ds in before:
        take(ds, steps * b0)
    state = before[-1].state_dict()
    assert state["global_consumed"] == steps * 6
    after = ranks(cache_dir37, w1, b1)
    for ds in after:
        ds.load_state_dict(state)
    seq = global_sequence([rank_batches(ds, workers, b1) for ds in after])
    assert seq == uninterrupted[steps * 6 :]


def test_resume_with_other_global_batch_continues_the_order(cache_dir37: str) -> None:
    before = ranks(cache_dir37, 2, 3)
    for ds in before:
        take(ds, 6)
    state = before[0].state_dict()
    after = ranks(cache_dir37, 2, 2)  # global batch 4 instead of 6
    for ds in after:
        ds.load_state_dict(state)
    seq = global_sequence([rank_batches(ds, 0, 2) for ds in after])
    order = after[0].epoch_order().all_rows().tolist()
    assert seq[: 37 - 12] == order[12:]
    assert len(seq) % 4 == 0 and seq[37 - 12 :] == order[: len(seq) - 25]


def test_resume_refuses_what_it_cannot_continue(cache_dir37: str) -> None:
    before = ranks(cache_dir37, 2, 4)
    for ds in before:
        take(ds, 5)  # mid-batch
    state = before[0].state_dict()
    with pytest.raises(ResumeError, match="mid-batch"):
        ranks(cache_dir37, 3, 4)[0].load_state_dict(state)
    other_seed = CacheDataset(cache_dir37, rank=0, world_size=2, batch_size=4, seed=6)
    with pytest.raises(ResumeError, match="seed"):
        other_seed.load_state_dict(state)
    with pytest.raises(ResumeError, match="version"):
        before[0].load_state_dict({**state, "version": 99})


def test_resume_other_cache_is_refused(make_cache, cache_dir37: str) -> None:
    state = CacheDataset(cache_dir37).state_dict()
    with pytest.raises(ResumeError, match="cache_id"):
        CacheDataset(make_cache(11, 8)).load_state_dict(state)


def test_resume_in_later_epoch_and_epoch_end(cache_dir37: str) -> None:
    ds = CacheDataset(cache_dir37, seed=5, batch_size=2)
    ds.set_epoch(2)
    full = rows(iter(ds))
    assert ds.state_dict()["consumed"] == 0, "a finished pass starts the epoch over"
    take(ds, 10)
    state = ds.state_dict()
    resumed = CacheDataset(cache_dir37, seed=5, batch_size=2)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2
    assert rows(iter(resumed)) == full[10:]
    resumed.set_epoch(3)
    assert len(rows(iter(resumed))) == 38


def test_loader_with_workers_resumes_exactly(cache_dir37: str) -> None:
    kw = {"num_workers": 2, "multiprocessing_context": "fork"}
    ds = CacheDataset(cache_dir37, seed=5, rank=1, world_size=2)
    full = [b["row"].tolist() for b in ds.loader(batch_size=3, **kw)]
    assert ds.state_dict()["consumed"] == 0
    first = CacheDataset(cache_dir37, seed=5, rank=1, world_size=2)
    got = []
    for i, batch in enumerate(first.loader(batch_size=3, **kw)):
        got.append(batch["row"].tolist())
        if i == 2:
            break
    state = first.state_dict()
    assert got == full[:3] and state["consumed"] == 9
    second = CacheDataset(cache_dir37, seed=5, rank=1, world_size=2)
    second.load_state_dict(state)
    rest = [b["row"].tolist() for b in second.loader(batch_size=3, **kw)]
    assert rest == full[3:]
