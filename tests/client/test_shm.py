"""Worker batches in shared memory: blocks decoded into one arena, each block's storage sent to
the main process once, batches rebuilt there as views of it."""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

from kdcache.client._shm import Arena, PackedBatch, Packer, Unpacker
from kdcache.client.dataset import CacheDataset

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
