"""Worker batches in shared memory: blocks decoded into one arena, each block's storage sent to
the main process once, batches rebuilt there as views of it."""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable, Iterable
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from kdcache.client._shm import Arena, ArenaPool, PackedBatch, Packer, Unpacker
from kdcache.client.dataset import CacheDataset, CacheLoader

SPECS = [((3, 5), np.dtype(np.int64)), ((3, 7), np.dtype(np.uint16)), ((2,), np.dtype(np.bool_))]


@pytest.mark.parametrize("shared", [False, True])
def test_arena_arrays_are_separate_and_writable(shared: bool) -> None:
    arena = Arena(SPECS, shared=shared)
    assert [(a.shape, a.dtype) for a in arena.arrays] == SPECS
    values = [7, 0xBEEF, True]
    for a, v in zip(arena.arrays, values, strict=True):
        a[...] = v
    for a, v in zip(arena.arrays, values, strict=True):
        assert np.all(a == v)  # no array overlaps another
        assert (a.ctypes.data - arena.base) % 64 == 0
    assert (arena.storage is not None) == shared


def test_adopt_moves_tensors_onto_the_shared_storage() -> None:
    arena = Arena(SPECS, shared=True)
    ids, bits, _ = arena.arrays
    ids[...] = np.arange(15).reshape(3, 5)
    bits[...] = np.arange(21, dtype=np.uint16).reshape(3, 7) + 0x3F80
    from_np = torch.from_numpy(ids)
    as_bf16 = torch.from_numpy(bits).view(torch.int16).view(torch.bfloat16)
    for t in (from_np, as_bf16, from_np[1:]):
        adopted = arena.adopt(t)
        assert adopted.is_shared() and not t.is_shared()
        assert adopted.untyped_storage().data_ptr() == arena.base
        assert adopted.dtype == t.dtype and torch.equal(adopted, t)
    foreign = torch.arange(4)
    assert arena.adopt(foreign) is foreign
    assert Arena(SPECS).adopt(from_np) is from_np  # a private arena has nothing to adopt onto


def _block(n: int, fill: int) -> dict[str, torch.Tensor]:
    arena = Arena([((n, 4), np.dtype(np.int64)), ((n, 2), np.dtype(np.float32))], shared=True)
    a, b = arena.arrays
    a[...], b[...] = fill, fill / 2
    return {"x": arena.adopt(torch.from_numpy(a)), "y": arena.adopt(torch.from_numpy(b))}


def test_a_block_storage_crosses_once_then_views() -> None:
    packer, unpacker = Packer(worker=1), Unpacker()
    one, two = _block(6, 1), _block(4, 2)
    batches = [
        {**{k: v[0:3] for k, v in one.items()}, "row": torch.arange(3)},
        {**{k: v[3:6] for k, v in one.items()}, "row": torch.arange(3, 6)},
        {k: v[0:4] for k, v in two.items()},
    ]
    sent = []
    for batch in batches:
        packed = packer.pack(batch)
        # a real pickling round trip (file descriptors and all), as the DataLoader queue does
        packed = pickle.loads(ForkingPickler.dumps(packed))
        assert isinstance(packed, PackedBatch)
        sent.append(len(packed.storages))
        got = unpacker.unpack(packed)
        assert got.keys() == batch.keys()
        for k in batch:
            assert got[k].dtype == batch[k].dtype and torch.equal(got[k], batch[k]), k
        assert got["x"].untyped_storage().data_ptr() == got["y"].untyped_storage().data_ptr()
    assert sent == [1, 0, 1]  # one storage per block, not one per tensor per batch
    assert list(unpacker._storages) == [(1, 1)]  # the first block's storage was let go


def test_worker_batches_of_one_block_share_one_storage(cache_dir37: str) -> None:
    kw = {"fields": ["input_ids", "topk", "hidden_1"], "seed": 2, "batch_size": 2}
    main = list(CacheDataset(cache_dir37, **kw).loader())
    loader = CacheDataset(cache_dir37, **kw).loader(num_workers=2, multiprocessing_context="fork")
    got = list(loader)
    assert len(got) == len(main) > 4
    for a, b in zip(main, got, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ptrs = [b["hidden_1"].untyped_storage().data_ptr() for b in got]
    # batches alternate between the two workers; a worker's consecutive batches of one block
    # are views of the storage it sent once, holding every decoded field
    assert ptrs[0] == ptrs[2] and ptrs[1] == ptrs[3]
    assert got[0]["input_ids"].untyped_storage().data_ptr() == ptrs[0]
    assert got[0]["topk_indices"].untyped_storage().data_ptr() == ptrs[0]


def _board(slots: int = 64) -> np.ndarray:
    return np.zeros(slots, dtype=np.uint8)


def test_pool_reuses_a_storage_only_once_released_and_unreferenced() -> None:
    board = _board()
    pool = ArenaPool(board, keep=1)
    first = pool.new(1000)
    view = torch.empty(0, dtype=torch.uint8).set_(first)  # a tensor of this process views it
    pool.sent(3, first)
    ptr = first.data_ptr()
    del first
    held = [pool.new(1000)]  # sent as id 3, not released: a fresh one (held, so not reusable)
    board[3] = 1
    held.append(pool.new(1000))  # released, but a tensor here still views it: fresh again
    assert (pool.made, pool.reused) == (3, 0)
    del view
    again = pool.new(900)
    assert again.data_ptr() == ptr and again.nbytes() >= 900
    assert (pool.made, pool.reused) == (3, 1)


def _released(pool: ArenaPool, board: np.ndarray, sizes: list[int]) -> dict[int, int]:
    """Storages of these sizes made, sent and released: size -> address."""
    ptrs = {}
    for sid, n in enumerate(sizes):
        s = pool.new(n)
        pool.sent(sid, s)
        ptrs[n] = s.data_ptr()
        board[sid] = 1
    return ptrs


def test_pool_picks_the_smallest_free_storage_that_holds_the_block() -> None:
    board = _board()
    pool = ArenaPool(board, keep=4)
    ptrs = _released(pool, board, [1000, 1500, 1300])
    a = pool.new(1200)
    assert a.data_ptr() == ptrs[1300]  # 1000 too small; 1300 fits best
    b = pool.new(400)
    assert b.data_ptr() == ptrs[1000]  # a bigger block's storage, already paid for
    c = pool.new(2000)  # none free holds it: a fresh one
    assert (pool.made, pool.reused) == (4, 2) and c.nbytes() == 2000


def test_pool_lets_go_of_free_storages_beyond_keep() -> None:
    board = _board()
    pool = ArenaPool(board, keep=1)
    ptrs = _released(pool, board, [1000, 2000, 3000, 9000])
    fresh = pool.new(100)  # fits none: the three smallest idle ones are let go
    held = {h.storage.data_ptr() for h in pool._held.values()}
    assert held == {ptrs[9000], fresh.data_ptr()}


def test_pool_never_reuses_a_storage_it_cannot_hear_back_on() -> None:
    board = _board(slots=2)
    pool = ArenaPool(board)
    s = pool.new(1000)
    pool.sent(5, s)  # id beyond the board: the main process has no slot to release it on
    assert not pool._held  # let go of, never to be handed out again
    del s
    board[:] = 1
    pool.new(1000)
    assert (pool.made, pool.reused) == (2, 0)


# read-ahead kept to one block, one batch in flight: a block's storage is let go by the main
# process while the worker still has blocks to decode
SLOW = {"prefetch_bytes": 1, "shuffle_window": 4}


def _all_equal(
    want: list[dict[str, torch.Tensor]],
    batches: Iterable[dict[str, torch.Tensor]],
    after: Callable[[int], None] | None = None,
) -> None:
    """Every batch equals ``want``'s in order, and all of them come; each is let go once
    compared (``after(n)`` runs after the n-th), so its block may be reused for a later one."""
    n = 0
    for b in batches:
        for k in want[n]:
            assert torch.equal(want[n][k], b[k]), (n, k)
        n += 1
        if after is not None:
            after(n)
        del b
    assert n == len(want)


def test_a_worker_reuses_only_the_block_storages_the_main_process_let_go(
    cache_dir37: str,
) -> None:
    kw = {"fields": ["input_ids", "topk", "hidden_1"], "seed": 4, "batch_size": 2, **SLOW}
    want = list(CacheDataset(cache_dir37, **kw).loader())

    def loader() -> CacheLoader:
        return CacheDataset(cache_dir37, **kw).loader(
            num_workers=1, multiprocessing_context="fork", prefetch_factor=1
        )

    held = loader()
    _all_equal(want, list(held))  # every batch kept: no block may be written over
    ((blocks, none),) = held.arenas.values()
    assert none == 0 and blocks >= 5  # 37 rows: at least five blocks (shards of 8 rows)

    dropped = loader()
    _all_equal(want, dropped)
    ((made, reused),) = dropped.arenas.values()
    assert reused >= 1 and made + reused == blocks


def test_without_workers_blocks_reuse_memory_only_once_the_caller_lets_go(
    cache_dir37: str,
) -> None:
    kw = {"fields": ["input_ids", "topk", "hidden_1"], "seed": 4, **SLOW}
    ds = CacheDataset(cache_dir37, **kw)
    arenas = ds._open_here().blocks.arenas
    held = list(ds.loader(batch_size=2))  # every batch kept: nothing may be written over
    want = [{k: v.clone() for k, v in b.items()} for b in held]
    assert arenas.reused == 0 and arenas.made >= 5  # 37 rows: at least five blocks
    made = arenas.made
    _all_equal(want, ds.loader(batch_size=2))  # the same pass again
    assert arenas.reused >= 1 and arenas.made - made < made
    _all_equal(want, held)  # the kept batches are intact


def test_pin_memory_without_an_accelerator_still_packs_and_reuses(cache_dir37: str) -> None:
    """torch pins nothing without an accelerator: batches still cross as packed views."""
    from kdcache.client._loader import _pins

    kw = {"fields": ["input_ids", "topk"], "seed": 4, "batch_size": 2, **SLOW}
    want = list(CacheDataset(cache_dir37, **kw).loader())
    loader = CacheDataset(cache_dir37, **kw).loader(
        num_workers=1, multiprocessing_context="fork", prefetch_factor=1, pin_memory=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "no accelerator is found"
        _all_equal(want, loader)
    ((_, reused),) = loader.arenas.values()  # packed with or without an accelerator
    assert reused >= 1
    assert loader.dataloader.pin_memory == (not _pins())  # where torch pins, the loader does


class _FakePin:
    """Stands in for pinning, which needs an accelerator this machine lacks: copies each batch
    (as pinning does) and records the thread it ran in; raises on batch ``fail_at``."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.threads: list[str] = []
        self.fail_at = fail_at

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import threading

        if len(self.threads) == self.fail_at:
            raise RuntimeError("pinning failed")
        self.threads.append(threading.current_thread().name)
        return {k: v.clone() for k, v in batch.items()}


@pytest.fixture
def pins_here(monkeypatch: pytest.MonkeyPatch) -> _FakePin:
    """Make the loader believe torch pins here (an accelerator), with a recording fake pin."""
    from kdcache.client import _loader

    fake = _FakePin()
    monkeypatch.setattr(_loader, "_pins", lambda: True)
    monkeypatch.setattr(_loader, "_current_device", lambda: None)
    monkeypatch.setattr(_loader, "_pin", fake)
    return fake


def test_where_torch_pins_workers_batches_stay_packed_and_are_pinned_in_a_thread(
    cache_dir37: str, pins_here: _FakePin
) -> None:
    kw = {"fields": ["input_ids", "topk", "hidden_1"], "seed": 4, "batch_size": 2, **SLOW}
    want = list(CacheDataset(cache_dir37, **kw).loader())
    assert pins_here.threads == []  # no workers: the DataLoader pins (here: torch pins nothing)
    ds = CacheDataset(cache_dir37, **kw)
    loader = ds.loader(
        num_workers=1, multiprocessing_context="fork", prefetch_factor=1, pin_memory=True
    )
    assert loader.dataloader.pin_memory is False  # the loader pins, not the DataLoader

    def counted(n: int) -> None:  # when handed over, not when pinned ahead of the caller
        assert ds.state_dict()["consumed"] == min(2 * n, len(ds)), n

    _all_equal(want, loader, counted)
    assert len(pins_here.threads) == len(want)
    assert set(pins_here.threads) == {"kdcache-pin"}
    ((made, reused),) = loader.arenas.values()  # packed: the workers' storages were reused
    assert reused >= 1 and made >= 1
    assert ds.state_dict()["consumed"] == 0  # the pass ended


def test_pinning_errors_reach_the_caller_and_an_early_stop_ends_the_thread(
    cache_dir37: str, pins_here: _FakePin
) -> None:
    import threading

    kw = {"fields": ["input_ids", "topk"], "seed": 4, "batch_size": 2, **SLOW}
    ds = CacheDataset(cache_dir37, **kw)
    pins_here.fail_at = 3
    loader = ds.loader(num_workers=1, multiprocessing_context="fork", pin_memory=True)
    got = 0
    with pytest.raises(RuntimeError, match="pinning failed"):
        for _ in loader:
            got += 1
    assert got == 3 and ds.state_dict()["consumed"] == 6
    pins_here.fail_at, pins_here.threads[:] = None, []
    it = iter(ds.loader(num_workers=1, multiprocessing_context="fork", pin_memory=True))
    next(it)
    it.close()  # the caller stops early: the pinning thread ends with the pass
    assert not any(t.name == "kdcache-pin" and t.is_alive() for t in threading.enumerate())
