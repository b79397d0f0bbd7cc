"""Readers never return corrupt data: every bit flip in a completed shard object is an
IntegrityError naming the shard, from TeacherCache and from CacheDataset alike."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_dataset_support import CacheFactory

from kdcache.client import CacheDataset, TeacherCache
from kdcache.core.errors import IntegrityError
from kdcache.core.layout import shard_key
from kdcache.core.reader import CacheReader

FLIPS = 32


@pytest.fixture(scope="module")
def cache16(make_cache: CacheFactory) -> str:
    return make_cache(16, 8)


def _flipped(path: Path, bit: int) -> bytes:
    raw = bytearray(path.read_bytes())
    raw[bit // 8] ^= 1 << (bit % 8)
    return bytes(raw)


def _read_all_dataset(cache: Path) -> None:
    ds = CacheDataset(str(cache), fields=None, shuffle=False)
    for _ in ds:
        pass


@pytest.mark.slow
def test_every_bit_flip_is_caught_by_both_readers(cache16: str, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    shutil.copytree(cache16, cache)
    reader = CacheReader(str(cache))
    arrays = [s.name for s in reader.manifest.arrays()]
    want = {name: reader.read(name, slice(0, 8)) for name in arrays}
    rng = random.Random(0)
    caught = {"TeacherCache": 0, "CacheDataset": 0}
    for i in range(FLIPS):
        name = arrays[i % len(arrays)]
        obj = cache / shard_key(name, 0, reader.arrays[name].ndim)
        good = obj.read_bytes()
        bit = rng.randrange(len(good) * 8)
        obj.write_bytes(_flipped(obj, bit))
        try:
            tc = TeacherCache(str(cache))
            with pytest.raises(IntegrityError, match="shard") as info:
                tc.read(None, list(range(8)))
            assert "0" in str(info.value)
            caught["TeacherCache"] += 1
            with pytest.raises(IntegrityError, match="shard"):
                _read_all_dataset(cache)
            caught["CacheDataset"] += 1
        finally:
            obj.write_bytes(good)
    print(f"bit flips caught: {caught} of {FLIPS} each")
    assert caught == {"TeacherCache": FLIPS, "CacheDataset": FLIPS}
    # restored: the same numbers as before, and the other shard was never affected
    again = CacheReader(str(cache))
    for name in arrays:
        np.testing.assert_array_equal(again.read(name, slice(0, 8)), want[name])


def test_chunks_carry_a_checksum_and_old_caches_stay_readable(cache16: str, tmp_path: Path) -> None:
    """New caches end every inner chunk in a CRC-32C; a cache written without one (before
    issue 11) still reads, with the same numbers."""
    arr = zarr.open_array(str(Path(cache16) / "topk" / "logprobs"), mode="r")
    inner = arr.metadata.codecs[0].codecs  # type: ignore[union-attr]
    assert [type(c).__name__ for c in inner] == ["BytesCodec", "BloscCodec", "Crc32cCodec"]

    old = tmp_path / "old"
    shutil.copytree(cache16, old)
    src = CacheReader(cache16)
    group = zarr.open_group(str(old), mode="r+")
    for spec in src.manifest.arrays():
        a = src.arrays[spec.name]
        data = np.asarray(a[:])
        del group[spec.name]
        group.create_array(
            spec.name,
            shape=a.shape,
            dtype=a.dtype,
            chunks=a.chunks,
            shards=a.shards,
            compressors=zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
            fill_value=0,
            attributes=dict(a.attrs),
        )
        group[spec.name][:] = data  # type: ignore[index]
    got = TeacherCache(str(old)).read(None, list(range(16)))
    ref = TeacherCache(cache16).read(None, list(range(16)))
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    rows = [s["row"] for s in CacheDataset(str(old), shuffle=False)]
    assert sorted(rows) == list(range(16))
