"""Prepared rows of a document job: round trip, meta.json last, integrity checks."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from kdcache.core.errors import CacheFormatError, IntegrityError
from kdcache.core.prepared import (
    PREPARED_META,
    PreparedRows,
    prepared_url,
    read_prepared_meta,
    write_prepared,
)
from kdcache.core.storage import LocalStorage

N, T, PER = 7, 5, 3


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, (N, T)).astype(np.int32), rng.random((N, T)) < 0.5


def _shards(ids: np.ndarray, mask: np.ndarray):
    return ((ids[s : s + PER], mask[s : s + PER]) for s in range(0, N, PER))


def _write(storage: LocalStorage, **kw: object):
    ids, mask = _data()
    return write_prepared(
        storage,
        cache_id="c1",
        num_rows=N,
        seq_len=T,
        rows_per_shard=PER,
        shards=_shards(ids, mask),
        **kw,  # type: ignore[arg-type]
    )


def test_round_trip_any_row_range(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    meta = _write(storage, source={"source": "jsonl"})
    assert meta is not None and meta.num_shards == 3
    assert read_prepared_meta(storage) == meta
    rows = PreparedRows(storage)
    ids, mask = _data()
    for start, end in [(0, 7), (2, 5), (3, 6), (6, 7), (4, 4)]:
        got = rows.rows(start, end)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, ids[start:end])
        np.testing.assert_array_equal(rows.loss_mask(start, end), mask[start:end])
    with pytest.raises(IndexError):
        rows.rows(5, 8)


def test_stopped_writer_leaves_no_meta(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    stop = itertools.chain([False, False], itertools.repeat(True)).__next__
    assert _write(storage, should_stop=stop) is None
    assert not storage.exists(PREPARED_META) and read_prepared_meta(storage) is None
    with pytest.raises(CacheFormatError, match="holds no prepared rows"):
        PreparedRows(storage)


def test_a_changed_or_missing_object_is_refused(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    _write(storage)
    key = "shards/00000001.npz"
    good = storage.read_bytes(key)
    storage.write_bytes(key, good[:-1] + bytes([good[-1] ^ 1]))
    rows = PreparedRows(storage)
    rows.rows(0, 3)  # shard 0 is fine
    with pytest.raises(IntegrityError, match="fails its checksum"):
        rows.rows(3, 4)
    storage.delete(key)
    with pytest.raises(IntegrityError, match="is missing"):
        PreparedRows(storage).rows(3, 4)


def test_prepared_rows_live_beside_the_cache() -> None:
    assert prepared_url("/r/caches/abc") == "/r/prepared/abc"
    assert prepared_url("s3://b/p/caches/abc/") == "s3://b/p/prepared/abc"
    with pytest.raises(ValueError, match="not a cache location"):
        prepared_url("/r/elsewhere/abc")
