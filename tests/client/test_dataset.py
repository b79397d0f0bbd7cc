"""CacheDataset partitioning and order: every row exactly once per epoch for any (rank, worker)
layout, equal batch counts, and one global order whatever the world size or worker count."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_dataset_support import global_sequence, padded_order, rank_batches, rows

from kdcache.client._order import EpochOrder, PassPlan
from kdcache.client.dataset import CacheDataset

WINDOW = 8  # one shard per shuffle window for the rows_per_shard=8 caches


def layout(url: str, world: int, **kw: Any) -> list[CacheDataset]:
    return [
        CacheDataset(url, rank=r, world_size=world, seed=3, shuffle_window=WINDOW, **kw)
        for r in range(world)
    ]


@pytest.mark.parametrize("n_rows", [37, 11])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("batch", [None, 4])
def test_each_row_once_plus_reported_padding(
    make_cache, n_rows: int, world: int, workers: int, batch: int | None
) -> None:
    url = make_cache(n_rows, 8)
    ranks = layout(url, world, batch_size=batch)
    per_rank = [rank_batches(ds, workers, batch or 2) for ds in ranks]
    assert len({len(b) for b in per_rank}) == 1, "ranks got unequal numbers of batches"
    assert {len(sum(b, [])) for b in per_rank} == {len(ranks[0])}
    got = Counter(r for batches in per_rank for b in batches for r in b)
    ds = ranks[0]
    g = (batch or 1) * world
    assert ds.padded_rows == (-n_rows) % g
    repeats = padded_order(ds)[n_rows:]
    assert got == Counter(range(n_rows)) + Counter(repeats.tolist())


@pytest.mark.parametrize("world,batch", [(2, 4), (3, 2), (3, None)])
def test_drop_last_drops_the_tail_of_the_order(cache_dir37: str, world: int, batch: int | None):
    ranks = layout(cache_dir37, world, batch_size=batch, drop_last=True)
    per_rank = [rows(iter(ds)) for ds in ranks]
    g = (batch or 1) * world
    assert {len(r) for r in per_rank} == {37 // g * g // world}
    got = sorted(r for part in per_rank for r in part)
    order = ranks[0].epoch_order().all_rows()
    assert ranks[0].dropped_rows == 37 % g
    assert got == sorted(order[: 37 - 37 % g].tolist())


def test_no_padding_no_drop_is_exactly_once_with_unequal_ranks(cache_dir37: str) -> None:
    ranks = layout(cache_dir37, 3, batch_size=4, pad=False)
    per_rank = [rows(iter(ds)) for ds in ranks]
    assert sorted(sum(per_rank, [])) == list(range(37))
    assert [len(p) for p in per_rank] == [len(ds) for ds in ranks] == [13, 12, 12]


@pytest.mark.parametrize(
    "world,batch,workers", [(1, 6, 0), (2, 3, 1), (3, 2, 3), (6, 1, 0), (2, 3, 3), (1, 6, 2)]
)
def test_global_order_is_independent_of_world_size_and_workers(
    cache_dir37: str, world: int, batch: int, workers: int
) -> None:
    ranks = layout(cache_dir37, world, batch_size=batch)
    seq = global_sequence([rank_batches(ds, workers, batch) for ds in ranks])
    reference = CacheDataset(cache_dir37, seed=3, shuffle_window=WINDOW, batch_size=6)
    assert seq == padded_order(reference).tolist()
    assert len(seq) == 42


def test_order_depends_on_seed_epoch_and_cache(cache_dir37: str) -> None:
    ds = CacheDataset(cache_dir37, seed=3, shuffle_window=WINDOW)
    first = rows(iter(ds))
    assert rows(iter(ds)) == first, "the same epoch must repeat its order"
    ds.set_epoch(1)
    second = rows(iter(ds))
    assert second != first and sorted(second) == sorted(first) == list(range(37))
    ds.set_epoch(0)
    assert rows(iter(ds)) == first
    other_seed = CacheDataset(cache_dir37, seed=4, shuffle_window=WINDOW)
    assert rows(iter(other_seed)) != first
    kw = {"seed": 3, "epoch": 0, "shuffle": True, "window_shards": 2}
    a = EpochOrder(37, 8, cache_id="a" * 32, **kw).all_rows()
    b = EpochOrder(37, 8, cache_id="b" * 32, **kw).all_rows()
    assert a.tolist() != b.tolist()


def test_shuffle_is_shard_order_then_rows_within_a_window(cache_dir37: str) -> None:
    for window, shards_per_window in [(8, 1), (16, 2), (9, 2)]:
        ds = CacheDataset(cache_dir37, seed=3, shuffle_window=window)
        order = ds.epoch_order()
        assert order.shards.tolist() != list(range(5))
        flat = order.all_rows()
        for k in range(order.num_windows):
            lo, hi = order.window_starts[k], order.window_starts[k + 1]
            shards = order.shards[k * shards_per_window : (k + 1) * shards_per_window]
            expected = {r for s in shards for r in range(8 * s, min(8 * s + 8, 37))}
            assert set(flat[lo:hi].tolist()) == expected
        assert flat.tolist() != sorted(flat.tolist())


def test_no_shuffle_gives_row_order(cache_dir37: str) -> None:
    assert rows(iter(CacheDataset(cache_dir37, shuffle=False))) == list(range(37))
    ranks = layout(cache_dir37, 2, shuffle=False, batch_size=2)
    seq = global_sequence([rank_batches(ds, 0, 2) for ds in ranks])
    assert seq == list(range(37)) + [0, 1, 2]


def test_pass_plan_arithmetic_for_many_shapes() -> None:
    """Exactly once (plus padding) straight from the plan, for sizes too many to cache."""
    order = EpochOrder(103, 10, cache_id="c", seed=1, epoch=2, shuffle=True, window_shards=3)
    for world in (1, 2, 5):
        for unit in (1, 3, 7):
            for workers in (1, 2, 4):
                plan = PassPlan(103, 0, unit, world, "pad")
                got: Counter[int] = Counter()
                for r in range(world):
                    n = 0
                    for w in range(workers):
                        for pos in plan.slot_groups(order, r, w, workers):
                            assert len(set(order.window_of(pos).tolist())) == 1
                            got.update(order.rows_at(pos).tolist())
                            n += len(pos)
                    assert n == plan.rank_rows(r) == plan.length // world
                assert sum(got.values()) == plan.length
                assert set(got) == set(range(103))
                assert plan.length % (unit * world) == 0 and plan.padded < unit * world


def test_len_matches_rows_and_dataloader_batches(cache_dir37: str) -> None:
    from torch.utils.data import DataLoader

    ranks = layout(cache_dir37, 2, batch_size=4)
    for ds in ranks:
        batches = list(DataLoader(ds, batch_size=4))
        assert len(ds) == 20 and len(batches) == 5 == len(DataLoader(ds, batch_size=4))
        assert all(len(b["row"]) == 4 for b in batches)


def test_rank_and_world_size_are_checked(cache_dir37: str) -> None:
    with pytest.raises(ValueError, match="rank 2 is not in"):
        CacheDataset(cache_dir37, rank=2, world_size=2)
    ds = CacheDataset(cache_dir37)
    assert (ds.rank, ds.world_size) == (0, 1)


def test_epoch_order_is_stable_numbers() -> None:
    """The order is part of the contract: a change here silently reshuffles resumed runs."""
    order = EpochOrder(20, 5, cache_id="abc", seed=0, epoch=0, shuffle=True, window_shards=2)
    expected = [2, 19, 16, 17, 4, 1, 3, 15, 18, 0, 14, 10, 5, 9, 6, 12, 13, 11, 7, 8]
    assert order.all_rows().tolist() == expected
    assert order.shards.tolist() == [3, 0, 1, 2]


def _rank_rows(rank: int, world: int, url: str, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        ds = CacheDataset(url, seed=3, batch_size=2)  # rank and world size from the group
        got = {"rank": ds.rank, "world": ds.world_size, "rows": rows(iter(ds))}
        Path(out, f"{rank}.json").write_text(json.dumps(got))
    finally:
        dist.destroy_process_group()


def test_rank_and_world_size_come_from_torch_distributed(cache_dir37: str, tmp_path: Path):
    import torch.multiprocessing as mp

    args = (2, cache_dir37, str(tmp_path / "store"), str(tmp_path))
    mp.start_processes(_rank_rows, args=args, nprocs=2, start_method="fork", join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [(g["rank"], g["world"]) for g in got] == [(0, 2), (1, 2)]
    a, b = got[0]["rows"], got[1]["rows"]
    assert len(a) == len(b) == 20 and set(a) | set(b) == set(range(37))
    assert len(a + b) - len(set(a + b)) == 3, "only the 3 padding rows repeat"


def test_padding_cycles_when_the_global_batch_exceeds_the_rows(make_cache) -> None:
    url = make_cache(11, 8)
    ranks = layout(url, 3, batch_size=8)  # global batch 24 > 11 rows: 13 repeats, cycling
    per_rank = [rows(iter(ds)) for ds in ranks]
    assert [len(p) for p in per_rank] == [8, 8, 8] and ranks[0].padded_rows == 13
    order = ranks[0].epoch_order().all_rows().tolist()
    assert sum(per_rank, []) == (order * 3)[:24]
