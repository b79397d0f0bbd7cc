"""Cache format v1: the shard writer, the reader, completion records, integrity checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from kdcache.core.errors import (
    CacheFormatError,
    CacheNotFoundError,
    IntegrityError,
    ManifestMismatchError,
    ShardIncompleteError,
)
from kdcache.core.format import Manifest, plan_chunks
from kdcache.core.reader import CacheReader
from kdcache.core.writer import CacheWriter


def _manifest(**kw: object) -> Manifest:
    base: dict = {
        "cache_id": "c0ffee",
        "num_rows": 10,
        "seq_len": 8,
        "vocab_size": 70000,
        "topk": 4,
        "temperatures": [1.0, 2.0],
        "hidden_layers": [1, 3],
        "hidden_size": 6,
        "hidden_dtype": "bfloat16",
        "rows_per_shard": 4,
        "teacher_fingerprint": "t",
        "dataset_fingerprint": "d",
        "loss_mask": True,
    }
    base.update(kw)
    base["index_dtype"] = "uint16" if base["vocab_size"] <= 65536 else "int32"
    return Manifest(**base)


def _shard_data(m: Manifest, shard: int, seed: int = 0) -> dict[str, np.ndarray]:
    start, end = m.shard_rows(shard)
    rng = np.random.default_rng(seed + shard)
    out = {}
    for spec in m.arrays():
        shape = (end - start, *spec.row_shape)
        if spec.dtype == "bool":
            out[spec.name] = rng.random(shape) < 0.7
        elif np.issubdtype(np.dtype(spec.dtype), np.integer):
            out[spec.name] = rng.integers(0, 60000, shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


def _write_all(url: str, m: Manifest, shards: list[int] | None = None) -> CacheWriter:
    w = CacheWriter.open(url, m)
    for s in range(m.num_shards) if shards is None else shards:
        w.commit(w.write_shard(s, _shard_data(m, s)))
    return w


def test_roundtrip_every_array(tmp_path: Path) -> None:
    m = _manifest()
    _write_all(str(tmp_path / "c"), m)
    r = CacheReader(str(tmp_path / "c"))
    assert r.manifest == m and r.is_complete
    for s in range(m.num_shards):
        start, end = m.shard_rows(s)
        for name, expected in _shard_data(m, s).items():
            np.testing.assert_array_equal(r.read(name, slice(start, end)), expected)
    full = {name: np.concatenate([_shard_data(m, s)[name] for s in range(3)]) for name in r.arrays}
    rows = [9, 0, 5, 5, 2]
    for name, arr in full.items():
        np.testing.assert_array_equal(r.read(name, rows), arr[rows])


def test_layout_dtypes_and_plain_zarr(tmp_path: Path) -> None:
    m = _manifest()
    _write_all(str(tmp_path / "c"), m)
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    assert g["input_ids"].dtype == np.int32 and g["input_ids"].shape == (10, 8)
    assert g["topk/logprobs"].dtype == np.float16 and g["topk/logprobs"].shape == (10, 8, 4)
    assert g["topk/indices"].dtype == np.int32  # V = 70000 > 65536
    assert g["topk/logsumexp"].shape == (10, 8, 2) and g["topk/logsumexp"].dtype == np.float32
    assert g["hidden/3"].dtype == np.uint16 and g["hidden/3"].attrs["dtype"] == "bfloat16"
    assert g["loss_mask"].dtype == np.bool_ and g["loss_mask"].shape == (10, 8)
    assert g.attrs["kdcache"]["format_version"] == 1
    # one shard object per row-shard: the unit a worker writes
    shard_files = sorted(p.name for p in (tmp_path / "c" / "topk" / "logprobs" / "c").iterdir())
    assert shard_files == ["0", "1", "2"]
    assert CacheWriter.open(
        str(tmp_path / "d"), _manifest(vocab_size=320)
    ).manifest.index_dtype == ("uint16")


def test_a_cache_written_before_loss_masks_still_reads(tmp_path: Path) -> None:
    old = _manifest(loss_mask=False)
    raw = old.to_dict()
    del raw["loss_mask"]  # manifests written before issue 8 lack the key
    assert Manifest.from_dict(raw) == old
    assert "loss_mask" not in {a.name for a in old.arrays()}
    assert "loss_mask" in {a.name for a in _manifest().arrays()}
    _write_all(str(tmp_path / "c"), old)
    r = CacheReader(str(tmp_path / "c"))
    assert not r.manifest.loss_mask and "loss_mask" not in r.arrays
    assert all(c.ok for c in r.verify())


def test_a_folder_of_other_files_is_refused_not_retried(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("not a cache")
    with pytest.raises(CacheFormatError, match="holds files but no Zarr group"):
        CacheWriter.open(str(tmp_path / "c"), _manifest())


def test_verify_covers_the_loss_mask(tmp_path: Path) -> None:
    m = _manifest()
    w = _write_all(str(tmp_path / "c"), m, shards=[0])
    start, end = m.shard_rows(0)
    flipped = ~_shard_data(m, 0)["loss_mask"]
    w.group["loss_mask"][start:end] = flipped  # type: ignore[index]
    (check,) = CacheReader(str(tmp_path / "c")).verify()
    assert not check.ok and check.problems == ("loss_mask: checksum mismatch",)


def test_tensorstore_opens_every_array(tmp_path: Path) -> None:
    ts = pytest.importorskip("tensorstore")
    m = _manifest()
    _write_all(str(tmp_path / "c"), m)
    r = CacheReader(str(tmp_path / "c"))
    for name, arr in r.arrays.items():
        t = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "c" / name)}}
        ).result()
        np.testing.assert_array_equal(t.read().result(), arr[:])


def test_incomplete_shard_is_not_readable(tmp_path: Path) -> None:
    m = _manifest()
    w = _write_all(str(tmp_path / "c"), m, shards=[0, 2])
    record = w.write_shard(1, _shard_data(m, 1))  # written but not committed
    r = CacheReader(str(tmp_path / "c"))
    assert not r.is_complete and sorted(r.completed()) == [0, 2]
    r.read("input_ids", slice(0, 4))
    r.read("input_ids", [9, 8, 0])
    with pytest.raises(ShardIncompleteError, match=r"\[1\]"):
        r.read("input_ids", [0, 5])
    with pytest.raises(ShardIncompleteError):
        r.read("topk/logprobs", slice(3, 5))
    w.commit(record)
    assert r.read("input_ids", [5]).shape == (1, 8)  # a new record is picked up


def test_verify_detects_corruption(tmp_path: Path) -> None:
    m = _manifest()
    _write_all(str(tmp_path / "c"), m)
    assert all(c.ok for c in CacheReader(str(tmp_path / "c")).verify())
    shard = tmp_path / "c" / "hidden" / "1" / "c" / "1" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    shard.write_bytes(bytes(raw))
    checks = {c.shard: c for c in CacheReader(str(tmp_path / "c")).verify()}
    assert checks[0].ok and checks[2].ok
    assert not checks[1].ok and any("hidden/1" in p for p in checks[1].problems)


def test_missing_shard_file_is_reported(tmp_path: Path) -> None:
    m = _manifest()
    _write_all(str(tmp_path / "c"), m)
    (tmp_path / "c" / "input_ids" / "c" / "2" / "0").unlink()
    r = CacheReader(str(tmp_path / "c"))
    checks = {c.shard: c for c in r.verify()}
    assert not checks[2].ok and "input_ids" in checks[2].problems[0]
    r.read("input_ids", [0, 4])
    with pytest.raises(IntegrityError, match="missing"):
        r.read("input_ids", [9])  # would otherwise read as zeros (the fill value)


def test_all_fill_value_shard_is_still_written(tmp_path: Path) -> None:
    m = _manifest()
    w = CacheWriter.open(str(tmp_path / "c"), m)
    data = {k: np.zeros_like(v) for k, v in _shard_data(m, 0).items()}
    w.commit(w.write_shard(0, data))
    assert (tmp_path / "c" / "input_ids" / "c" / "0" / "0").is_file()
    r = CacheReader(str(tmp_path / "c"))
    assert r.verify()[0].ok
    np.testing.assert_array_equal(r.read("hidden/1", [1, 2]), np.zeros((2, 8, 6), np.uint16))


def test_reopen_same_manifest_and_refuse_other(tmp_path: Path) -> None:
    m = _manifest()
    _write_all(str(tmp_path / "c"), m, shards=[0])
    w = CacheWriter.open(str(tmp_path / "c"), m)
    assert w.missing_shards() == [1, 2]
    with pytest.raises(ManifestMismatchError):
        CacheWriter.open(str(tmp_path / "c"), _manifest(topk=5))


def test_write_shard_checks_shapes(tmp_path: Path) -> None:
    m = _manifest()
    w = CacheWriter.open(str(tmp_path / "c"), m)
    data = _shard_data(m, 0)
    data["topk/logprobs"] = data["topk/logprobs"].astype(np.float32)
    with pytest.raises(ValueError, match="topk/logprobs"):
        w.write_shard(0, data)
    data = _shard_data(m, 0)
    del data["hidden/3"]
    with pytest.raises(ValueError, match="hidden/3"):
        w.write_shard(0, data)


def test_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheNotFoundError):
        CacheReader(str(tmp_path / "nothing"))
    zarr.open_group(str(tmp_path / "plain"), mode="w")
    with pytest.raises(CacheFormatError, match="manifest"):
        CacheReader(str(tmp_path / "plain"))
    g = zarr.open_group(str(tmp_path / "future"), mode="w")
    g.attrs["kdcache"] = {**_manifest().to_dict(), "format_version": 99}
    with pytest.raises(CacheFormatError, match="version 99"):
        CacheReader(str(tmp_path / "future"))


@pytest.mark.parametrize(
    ("row_shape", "itemsize", "per_shard"),
    [((8,), 4, 256), ((2048, 64), 2, 256), ((4096, 8192), 2, 64), ((100, 7), 4, 30)],
)
def test_chunks_divide_shards(row_shape: tuple[int, ...], itemsize: int, per_shard: int) -> None:
    chunks = plan_chunks(row_shape, itemsize, per_shard)
    assert per_shard % chunks[0] == 0 and row_shape[0] % chunks[1] == 0
    assert chunks[2:] == row_shape[1:]
    chunk_bytes = itemsize * int(np.prod(chunks))
    assert chunk_bytes <= max(1 << 20, itemsize * int(np.prod(row_shape[1:])))


def test_large_rows_get_chunks_of_their_own_and_small_rows_share() -> None:
    # a 128 KiB row (T=512, d=128, bf16): one row per chunk, so a reader of one row of a
    # shuffled window (a DDP rank, a DataLoader worker) decodes no other reader's rows
    assert plan_chunks((512, 128), 2, 128) == (1, 512, 128)
    # 2 KiB rows (token ids): 32 per chunk (64 KiB), a chunk still worth a decoder call
    assert plan_chunks((512,), 4, 128) == (32, 512)
    # rows of 1 MiB or more are still split along T
    assert plan_chunks((4096, 4096), 2, 64) == (1, 128, 4096)


def test_hidden_states_and_ids_use_zstd_level_1_topk_level_3(tmp_path: Path) -> None:
    _write_all(str(tmp_path / "c"), _manifest())
    g = zarr.open_group(str(tmp_path / "c"), mode="r")
    levels = {}
    for name in ("input_ids", "loss_mask", "hidden/1", "topk/logprobs", "topk/indices"):
        blosc = g[name].metadata.codecs[0].codecs[1]  # type: ignore[union-attr]
        assert blosc.cname.value == "zstd"
        levels[name] = blosc.clevel
    assert levels == {
        "input_ids": 1,
        "loss_mask": 1,
        "hidden/1": 1,
        "topk/logprobs": 3,
        "topk/indices": 3,
    }
