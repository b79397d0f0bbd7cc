"""Remote caches (``s3://`` through fsspec, ``http(s)://`` through the service): retries and the
local disk cache of whole shard objects.

:class:`RemoteStorage` wraps the :class:`~kdcache.core.storage.Storage` of a remote cache: every
read is retried on transient errors, and its Zarr store (:class:`DiskCachedStore`) serves a key
from the :class:`~kdcache.client._diskcache.DiskCache` when the object is there, otherwise from
the remote with ranged reads. :func:`download_objects` fills the disk cache with the shard objects
a shuffle window needs, in parallel, while the window's keys are pinned.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from kdcache.client._diskcache import DiskCache
from kdcache.core.layout import shard_key
from kdcache.core.retry import RetryPolicy
from kdcache.core.storage import Storage

__all__ = [
    "DiskCachedStore",
    "RemoteStorage",
    "download_objects",
    "policy",
    "retry_call",
    "shard_object_keys",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


def policy(retries: int, backoff: float) -> RetryPolicy:
    """The core retry policy with ``retries`` retries after the first try, backoff doubling from
    ``backoff`` seconds."""
    return RetryPolicy(seconds=None, attempts=retries + 1, initial=backoff, max_delay=10.0)


def retry_call(fn: Callable[[], T], retries: int, backoff: float, what: str) -> T:
    """``fn()``, retried up to ``retries`` times on transient errors with exponential backoff."""
    return policy(retries, backoff).call(fn, what)


def _read_range(path: os.PathLike[str], byte_range: ByteRequest | None) -> bytes:
    with open(path, "rb") as f:
        if byte_range is None:
            return f.read()
        if isinstance(byte_range, RangeByteRequest):
            f.seek(byte_range.start)
            return f.read(byte_range.end - byte_range.start)
        if isinstance(byte_range, OffsetByteRequest):
            f.seek(byte_range.offset)
            return f.read()
        if isinstance(byte_range, SuffixByteRequest):
            f.seek(max(0, os.fstat(f.fileno()).st_size - byte_range.suffix))
            return f.read()
    raise ValueError(f"unexpected byte range {byte_range!r}")


class DiskCachedStore(WrapperStore[Any]):
    """Read-only Zarr store: keys in the disk cache are read locally, others remotely (retried)."""

    def __init__(
        self, store: Any, cache: DiskCache | None, retries: int = 3, backoff: float = 0.2
    ) -> None:
        super().__init__(store)
        self.cache = cache
        self.retries = retries
        self.backoff = backoff

    def _with_store(self, store: Any) -> DiskCachedStore:
        return DiskCachedStore(store, self.cache, self.retries, self.backoff)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        path = self.cache.get(key) if self.cache is not None else None
        if path is not None:
            try:
                data = await asyncio.to_thread(_read_range, path, byte_range)
                return prototype.buffer.from_bytes(data)
            except FileNotFoundError:  # evicted between lookup and open: read it remotely
                pass
        return await policy(self.retries, self.backoff).acall(
            lambda: self._store.get(key, prototype, byte_range), f"read {key}"
        )

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))


class RemoteStorage:
    """A remote cache's :class:`Storage`, read-only, with retries and an optional disk cache."""

    def __init__(
        self,
        inner: Storage,
        cache: DiskCache | None = None,
        retries: int = 3,
        backoff: float = 0.2,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.cache = cache
        self.retries = retries
        self.backoff = backoff

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry_call(fn, self.retries, self.backoff, f"{what} ({self.url})")

    def read_bytes(self, key: str) -> bytes:
        return self._retry(lambda: self.inner.read_bytes(key), f"read {key}")

    def write_bytes(self, key: str, data: bytes) -> None:
        raise PermissionError(f"{self.url} is opened read-only by the client")

    def exists(self, key: str) -> bool:
        return self._retry(lambda: self.inner.exists(key), f"exists {key}")

    def list(self, prefix: str) -> list[str]:
        return self._retry(lambda: self.inner.list(prefix), f"list {prefix}")

    def delete(self, key: str) -> None:
        raise PermissionError(f"{self.url} is opened read-only by the client")

    def size(self, key: str) -> int:
        return self._retry(lambda: self.inner.size(key), f"size {key}")

    def child(self, sub: str) -> Storage:
        return RemoteStorage(self.inner.child(sub), None, self.retries, self.backoff)

    def zarr_store(self, read_only: bool) -> DiskCachedStore:
        return DiskCachedStore(self.inner.zarr_store(True), self.cache, self.retries, self.backoff)


def shard_object_keys(arrays: Sequence[zarr.Array], shards: Iterable[int]) -> list[str]:
    """Store keys of the shard objects of ``shards`` (row shards) of each array."""
    out = []
    for shard in shards:
        for arr in arrays:
            out.append(shard_key(arr.path, shard, arr.ndim))
    return out


def download_objects(
    storage: RemoteStorage, keys: Sequence[str], pool: ThreadPoolExecutor | None = None
) -> int:
    """Put every key not yet cached into ``storage.cache``; returns bytes downloaded."""
    cache = storage.cache
    if cache is None:
        return 0
    todo = [k for k in keys if cache.get(k) is None]

    def one(key: str) -> int:
        try:
            data = storage.read_bytes(key)
        except FileNotFoundError:  # an all-fill-value shard is never written; zarr reads fill
            return 0
        cache.put(key, data)
        return len(data)

    if pool is None or len(todo) < 2:
        return sum(one(k) for k in todo)
    return sum(pool.map(one, todo))
