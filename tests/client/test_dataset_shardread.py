"""The local shard-file fast path reads exactly what zarr reads, for any rows, crop and geometry
(chunks split along T, partial last shard, inner chunks that hold only the fill value), and a
missing shard object of a completed shard is an error, never zeros."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from kdcache.client._blocks import BlockReader, read_rows
from kdcache.client._shardread import FastLayout
from kdcache.core.errors import IntegrityError


def _array(
    root: Path, dtype: str = "float16", compressors: Any = None, write_empty: bool = True
) -> tuple[zarr.Array, np.ndarray]:
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((23, 12, 3)) * 10).astype(dtype)
    data[6:12] = 0  # one whole shard equal to the fill value (kdcache writes it all the same)
    data[14:16, 4:8] = 0  # one inner chunk equal to the fill value
    group = zarr.open_group(zarr.storage.LocalStore(root), mode="w")
    arr = group.create_array(
        "topk/x",
        shape=data.shape,
        dtype=dtype,
        chunks=(2, 4, 3),
        shards=(6, 12, 3),
        fill_value=0,
        compressors=compressors or BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    )
    arr.with_config({"write_empty_chunks": write_empty})[:] = data
    return arr, data


def _locate(root: Path):
    def locate(key: str) -> str | None:
        path = root / key
        return str(path) if path.is_file() else None

    return locate


@pytest.mark.parametrize("crop", [None, 5, 12, 1])
@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
def test_fast_path_equals_zarr(tmp_path: Path, crop: int | None, out_dtype: str) -> None:
    arr, data = _array(tmp_path)
    layout = FastLayout.of(arr)
    assert layout is not None and layout.inner == (2, 4, 3) and layout.grid == (3, 3, 1)
    assert (tmp_path / layout.key(1)).exists(), "kdcache writes all-fill shards too"
    rng = np.random.default_rng(1)
    for rows in (np.arange(23), np.array([0, 5, 13, 14, 22]), np.sort(rng.choice(23, 9, False))):
        t = 12 if crop is None else crop
        out = np.full((len(rows), t, 3), np.nan, dtype=out_dtype)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda task: task(), layout.tasks(_locate(tmp_path), rows, out, crop)))
        expected = data[rows, :t].astype(out_dtype)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(read_rows(arr, rows, crop), data[rows, :t])


@pytest.mark.parametrize("crop", [None, 5])
def test_rows_land_at_their_positions_cast(tmp_path: Path, crop: int | None) -> None:
    # rows of one chunk scattered to far-apart places, cast float16 -> float32 on the way
    arr, data = _array(tmp_path)
    layout = FastLayout.of(arr)
    assert layout is not None
    rows = np.arange(23)
    places = np.random.default_rng(3).permutation(23)
    t = 12 if crop is None else crop
    out = np.full((23, t, 3), np.nan, dtype="float32")
    for task in layout.tasks(_locate(tmp_path), rows, out, crop, places):
        task()
    expected = np.empty_like(out)
    expected[places] = data[rows, :t].astype("float32")
    np.testing.assert_array_equal(out, expected)


def test_missing_shard_object_is_an_error(tmp_path: Path) -> None:
    arr, _ = _array(tmp_path, write_empty=False)
    layout = FastLayout.of(arr)
    assert layout is not None and not (tmp_path / layout.key(1)).exists()
    out = np.zeros((2, 12, 3), dtype="float32")
    with pytest.raises(IntegrityError, match="missing"):
        layout.tasks(_locate(tmp_path), np.array([6, 7]), out, None)


def test_other_layouts_go_through_zarr(tmp_path: Path) -> None:
    arr, data = _array(tmp_path, compressors=ZstdCodec(level=1))
    assert FastLayout.of(arr) is None
    plain = zarr.create_array(tmp_path / "plain", shape=(4, 3), chunks=(2, 3), dtype="int32")
    assert FastLayout.of(plain) is None
    with ThreadPoolExecutor(2) as pool:
        reader = BlockReader(_manifest_stub(), {"hidden_9": arr}, None, pool, _locate(tmp_path))
        assert reader.layouts["hidden_9"] is None
        block = reader.read(np.array([3, 1, 3]))
    got = block.tensors["hidden_9"][block.index].numpy()
    np.testing.assert_array_equal(got, data[[3, 1, 3]])


def test_corrupt_shard_index_is_detected(tmp_path: Path) -> None:
    arr, _ = _array(tmp_path)
    layout = FastLayout.of(arr)
    assert layout is not None
    path = tmp_path / layout.key(0)
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    out = np.empty((1, 12, 3), dtype="float16")
    with pytest.raises(IntegrityError, match="checksum"):
        layout.tasks(_locate(tmp_path), np.array([0]), out, None)


def _manifest_stub():
    from kdcache.core.format import Manifest

    return Manifest(
        cache_id="x",
        num_rows=23,
        seq_len=12,
        vocab_size=10,
        topk=0,
        temperatures=[1.0],
        hidden_layers=[9],
        hidden_size=3,
        hidden_dtype="float16",
        rows_per_shard=6,
        teacher_fingerprint="t",
        dataset_fingerprint="d",
    )


def _rows_array(root: Path, rows_per_chunk: int) -> tuple[zarr.Array, np.ndarray]:
    """float16 (23, 12, 3) in shards of 6 rows, chunks of whole rows (the layout of large rows)."""
    rng = np.random.default_rng(2)
    data = (rng.standard_normal((23, 12, 3)) * 10).astype("float16")
    group = zarr.open_group(zarr.storage.LocalStore(root), mode="w")
    arr = group.create_array(
        "hidden/1",
        shape=data.shape,
        dtype="float16",
        chunks=(rows_per_chunk, 12, 3),
        shards=(6, 12, 3),
        fill_value=0,
        compressors=(BloscCodec(cname="zstd", clevel=1, shuffle="shuffle"), Crc32cCodec()),
    )
    arr.with_config({"write_empty_chunks": True})[:] = data
    return arr, data


@pytest.mark.parametrize("rows_per_chunk", [1, 2, 3])
@pytest.mark.parametrize("out_dtype", ["float16", "float32"])
@pytest.mark.parametrize("crop", [None, 5])
def test_rows_land_in_the_places_asked(
    tmp_path: Path, rows_per_chunk: int, out_dtype: str, crop: int | None
) -> None:
    """Whole-row chunks decode straight into the output (float16 out: no scratch buffer) or
    through one cast (float32: torch's copy); ``positions`` puts each row where it is used."""
    arr, data = _rows_array(tmp_path, rows_per_chunk)
    layout = FastLayout.of(arr)
    assert layout is not None and layout.crc
    rng = np.random.default_rng(3)
    for rows in (np.arange(23), np.sort(rng.choice(23, 10, replace=False)), np.array([7])):
        places = rng.permutation(len(rows))
        t = 12 if crop is None else crop
        out = np.full((len(rows), t, 3), np.nan, dtype=out_dtype)
        tasks = layout.tasks(_locate(tmp_path), rows, out, crop, places)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda task: task(), tasks))
        expected = np.empty_like(out)
        expected[places] = data[rows, :t].astype(out_dtype)
        np.testing.assert_array_equal(out, expected)


def test_a_block_holds_rows_in_yield_order_with_repeats(tmp_path: Path) -> None:
    """The fast path and zarr give the same block, rows in the order asked, repeats included."""
    arr, data = _rows_array(tmp_path, 2)
    rows = np.array([9, 3, 22, 3, 0, 9, 9, 14])
    with ThreadPoolExecutor(2) as pool:
        fast = BlockReader(_manifest_stub(), {"hidden_9": arr}, None, pool, _locate(tmp_path))
        slow = BlockReader(_manifest_stub(), {"hidden_9": arr}, None, pool)
        assert fast.layouts["hidden_9"] is not None and slow.layouts["hidden_9"] is None
        blocks = [fast.read(rows), slow.read(rows)]
    for block in blocks:
        assert block.tensors["row"].tolist() == rows.tolist()
        np.testing.assert_array_equal(block.tensors["hidden_9"].numpy(), data[rows])


def test_a_corrupt_chunk_body_is_an_integrity_error(tmp_path: Path) -> None:
    arr, _ = _rows_array(tmp_path, 1)
    layout = FastLayout.of(arr)
    assert layout is not None
    path = tmp_path / layout.key(1)
    raw = bytearray(path.read_bytes())
    raw[20] ^= 0xFF  # inside the first inner chunk of shard 1
    path.write_bytes(bytes(raw))
    out = np.empty((1, 12, 3), dtype="float16")
    (task,) = layout.tasks(_locate(tmp_path), np.array([6]), out, None)
    with pytest.raises(IntegrityError, match="CRC-32C mismatch"):
        task()
