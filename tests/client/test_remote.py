"""Remote sources: S3 (moto on 127.0.0.1) and HTTP (the kdcache service under uvicorn) give the
same batches as the local directory, with and without the disk cache; reads are retried."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from _net import serve
from test_dataset_support import CacheFactory, global_sequence, rank_batches
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype

from kdcache.client._remote import DiskCachedStore, retry_call
from kdcache.client.dataset import CacheDataset
from kdcache.core.retry import is_transient

FIELDS = ["input_ids", "topk", "hidden_2"]


def batches(source: str, world: int = 2, **kw: Any) -> list[dict[str, torch.Tensor]]:
    """Every sample of a 2-rank epoch in global order, fields as tensors."""
    out = []
    for rank in range(world):
        ds = CacheDataset(
            source, fields=FIELDS, rank=rank, world_size=world, seed=7, shuffle_window=8,
            batch_size=3, **kw,
        )  # fmt: skip
        out.append(list(ds))
    return [s for step in zip(*out, strict=True) for s in step]


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


# ---- retries ---------------------------------------------------------------------------------
class Flaky(Exception):
    def __init__(self, status: int | None = None) -> None:
        super().__init__(f"flaky {status}")
        self.status = status


def test_retry_call_retries_transient_errors_only() -> None:
    calls = []

    def twice_then_ok() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("reset")
        return "ok"

    assert retry_call(twice_then_ok, retries=3, backoff=0, what="t") == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(ConnectionError):
        retry_call(twice_then_ok, retries=1, backoff=0, what="t")
    assert len(calls) == 2

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry_call(missing, retries=5, backoff=0, what="t")
    assert len(calls) == 1
    assert is_transient(Flaky(503)) and is_transient(Flaky(429)) and is_transient(TimeoutError())
    assert not is_transient(Flaky(403)) and not is_transient(PermissionError())


class FlakyStore(zarr.storage.MemoryStore):
    """Fails the first ``failures`` reads with a connection error."""

    failures = 0

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        if FlakyStore.failures > 0:
            FlakyStore.failures -= 1
            raise ConnectionError("connection reset by peer")
        return await super().get(key, prototype, byte_range)


def test_disk_cached_store_retries_remote_reads() -> None:
    data = np.arange(60, dtype="int32").reshape(6, 10)
    inner = FlakyStore()
    zarr.create_array(inner, shape=data.shape, chunks=(2, 10), dtype="int32")[:] = data
    FlakyStore.failures = 4
    store = DiskCachedStore(inner, cache=None, retries=3, backoff=0.001)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data)
    assert FlakyStore.failures == 0
    FlakyStore.failures = 10
    buf = zarr.core.buffer.default_buffer_prototype()
    with pytest.raises(ConnectionError):
        asyncio.run(DiskCachedStore(inner, None, retries=2, backoff=0.001).get("zarr.json", buf))


# ---- S3 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_cache(s3_server: dict[str, Any], cache_dir37: str) -> Iterator[str]:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("kd-bucket")
    cache_id = Path(cache_dir37).name
    fs.put(cache_dir37, f"kd-bucket/caches/{cache_id}", recursive=True)
    yield f"s3://kd-bucket/caches/{cache_id}"
    fs.rm("kd-bucket", recursive=True)


def test_s3_gives_the_local_batches(s3_cache: str, s3_server: dict, cache_dir37: str) -> None:
    assert_same(batches(s3_cache, storage_options=s3_server), batches(cache_dir37))


def test_s3_through_disk_cache_under_a_cap(
    s3_cache: str, s3_server: dict, cache_dir37: str, tmp_path: Path
) -> None:
    local = batches(cache_dir37)
    limit = 60_000  # a few shards' objects: the epoch must evict on the way
    got = batches(s3_cache, storage_options=s3_server, cache_dir=tmp_path, cache_limit_bytes=limit)
    assert_same(got, local)
    objects = [p for p in (tmp_path / "objects").rglob("*") if p.is_file()]
    assert objects and sum(p.stat().st_size for p in objects) <= limit
    assert not any(p.is_file() for p in (tmp_path / "pins").rglob("*")), "pins released"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_s3_with_dataloader_workers(s3_cache: str, s3_server: dict, tmp_path: Path) -> None:
    ds = CacheDataset(s3_cache, fields=["input_ids"], storage_options=s3_server, seed=7,
                      batch_size=4, cache_dir=tmp_path)  # fmt: skip
    seq = global_sequence([rank_batches(ds, 0, 4)])
    got = [
        r
        for b in ds.loader(num_workers=2, multiprocessing_context="fork")
        for r in b["row"].tolist()
    ]
    assert got == seq and sorted(set(got)) == list(range(37))


# ---- HTTP (the service) ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def http_cache(make_cache: CacheFactory, cache_dir37: str) -> Iterator[str]:
    service = pytest.importorskip("kdcache.service")
    import httpx

    root = make_cache.roots[cache_dir37]
    settings = service.Settings(root=str(root), admin_token="a-secret", worker_token="w-secret")
    with serve(service.create_app(settings)) as base:
        spec = make_cache.specs[cache_dir37]
        r = httpx.post(f"{base}/v1/jobs", json=spec, headers={"Authorization": "Bearer a-secret"})
        assert r.status_code in (200, 201) and r.json()["shards_done"] == 5, r.text
        yield f"{base}/v1/caches/{Path(cache_dir37).name}"


def test_http_gives_the_local_batches(http_cache: str, cache_dir37: str, tmp_path: Path) -> None:
    local = batches(cache_dir37)
    assert_same(batches(http_cache), local)
    assert_same(batches(http_cache, cache_dir=tmp_path, cache_limit_bytes=60_000), local)
    assert any(p.is_file() for p in (tmp_path / "objects").rglob("*"))
