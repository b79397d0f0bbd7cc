"""Reading a cache the kdcache service serves, in few requests over kept-alive connections.

:class:`ServiceStorage` is the :class:`~kdcache.core.storage.Storage` of
``http(s)://host/v1/caches/<id>/store``: every request goes through one
:class:`~kdcache.core.rest.ServiceLink` (a keep-alive pool per process, the bearer token, the
service's errors decoded, transient failures retried). Its Zarr store answers zarr-python's reads
from what :func:`prefetch_rows` fetched for a batch: first the shard indexes of every array
and shard the rows touch (one request, remembered afterwards: a completed shard never changes),
then every inner chunk those rows need (one more request, ``POST /v1/caches/{id}/ranges``).
zarr then decodes as always, so the CRC-32C of each chunk and of each shard index is still checked;
a read the prefetch did not foresee goes to the service with its own Range request.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation
from zarr.core.buffer import Buffer, BufferPrototype

from kdcache.core.errors import (
    IntegrityError,
    KDCacheError,
    NotFound,
    RangeNotSatisfiable,
    Unavailable,
    Unprocessable,
    Unreachable,
)
from kdcache.core.format import MANIFEST_KEY, Manifest
from kdcache.core.layout import shard_key
from kdcache.core.reader import CacheReader
from kdcache.core.rest import ServiceLink
from kdcache.core.retry import RetryPolicy
from kdcache.core.wire import MAX_RANGE_READS, RANGE_LENGTHS_HEADER

__all__ = ["ServiceStorage", "ServiceZarrStore", "prefetch_metadata", "prefetch_rows"]

_MISSING = 2**64 - 1  # shard index entry of a chunk never written (all fill value)
REQUEST_BYTES = 64 << 20  # at most this much asked for in one ranges request
_INDEXES = 16384  # shard indexes remembered (a few hundred bytes each)
INDEXES_AHEAD = 256  # shard indexes of other shards fetched along with those a read needs
_PARTS_BYTES = 512 << 20  # prefetched chunks waiting for zarr; the oldest go beyond this

# (key, start, end): bytes [start, end) of key; (key, None, None): the whole object
_Part = tuple[str, int | None, int | None]


class _Prefetched:
    """Bytes fetched ahead for zarr: shard indexes (kept) and chunks (taken once)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.indexes: OrderedDict[str, bytes] = OrderedDict()
        self.parts: OrderedDict[_Part, bytes] = OrderedDict()
        self.nbytes = 0

    def index(self, key: str) -> bytes | None:
        with self.lock:
            found = self.indexes.get(key)
            if found is not None:
                self.indexes.move_to_end(key)
            return found

    def keep_index(self, key: str, raw: bytes) -> None:
        with self.lock:
            self.indexes[key] = raw
            while len(self.indexes) > _INDEXES:
                self.indexes.popitem(last=False)

    def put(self, part: _Part, data: bytes) -> None:
        with self.lock:
            old = self.parts.pop(part, None)
            self.nbytes += len(data) - (len(old) if old is not None else 0)
            self.parts[part] = data
            while self.nbytes > _PARTS_BYTES and len(self.parts) > 1:
                self.nbytes -= len(self.parts.popitem(last=False)[1])

    def take(self, key: str, byte_range: ByteRequest | None) -> bytes | None:
        if isinstance(byte_range, SuffixByteRequest):
            raw = self.index(key)
            return raw if raw is not None and len(raw) == byte_range.suffix else None
        if isinstance(byte_range, RangeByteRequest):
            part: _Part = (key, byte_range.start, byte_range.end)
        elif byte_range is None:
            part = (key, None, None)
        else:
            return None
        with self.lock:
            data = self.parts.pop(part, None)
            if data is not None:
                self.nbytes -= len(data)
            return data


def _range_header(byte_range: ByteRequest | None) -> dict[str, str]:
    if byte_range is None:
        return {}
    if isinstance(byte_range, RangeByteRequest):
        return {"Range": f"bytes={byte_range.start}-{byte_range.end - 1}"}
    if isinstance(byte_range, SuffixByteRequest):
        return {"Range": f"bytes=-{byte_range.suffix}"}
    return {"Range": f"bytes={byte_range.offset}-"}


class ServiceStorage:
    """A served cache's storage, read-only; ``base`` is the service, ``cache_id`` the cache."""

    def __init__(
        self,
        base: str,
        cache_id: str,
        token: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        link: ServiceLink | None = None,
        prefix: str = "",
    ) -> None:
        self.link = link or ServiceLink(base, token, retry=retry)
        self.cache_id = cache_id
        self.prefix = prefix
        self.path = f"/v1/caches/{cache_id}"
        self.url = f"{self.link.server}{self.path}/store" + (f"/{prefix}" if prefix else "")
        self.prefetched = _Prefetched()
        self._store = ServiceZarrStore(self)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def fetch(self, reads: Sequence[dict[str, Any]]) -> list[bytes]:
        """The bytes of each read (``{"key", "start", "end"}``, ``{"key", "suffix"}``, or
        ``{"key", "size"}`` for a whole object of about ``size`` bytes), in as few
        ``POST .../ranges`` requests as the service's limits allow."""
        out: list[bytes] = []
        for batch in _batches(reads):
            resp = self.link.post(f"{self.path}/ranges", json={"ranges": batch})
            lengths = [int(n) for n in resp.headers[RANGE_LENGTHS_HEADER].split(",")]
            body = resp.content
            if len(lengths) != len(batch) or sum(lengths) != len(body):
                raise IntegrityError(
                    f"{self.url}: a ranges answer of {len(body)} bytes does not match its "
                    f"{RANGE_LENGTHS_HEADER} ({len(lengths)} parts for {len(batch)} asked)"
                )
            at = 0
            for n in lengths:
                out.append(body[at : at + n])
                at += n
        return out

    def get(self, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
        """Bytes of ``key`` (a range of them), or None when the service has no such key."""
        try:
            resp = self.link.get(
                f"{self.path}/store/{self._key(key)}", headers=_range_header(byte_range)
            )
        except NotFound:
            return None
        except RangeNotSatisfiable as err:
            raise IntegrityError(
                f"{self.url}/{key}: {err}; the object is shorter than its shard index says "
                "(corrupt or partial)"
            ) from None
        return resp.content

    def read_bytes(self, key: str) -> bytes:
        data = self.get(key)
        if data is None:
            raise FileNotFoundError(f"{self.url}/{key}")
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        raise PermissionError(f"{self.url} is served read-only")

    def exists(self, key: str) -> bool:
        if self.prefetched.index(self._key(key)) is not None:  # fetched from it: it exists
            return True
        try:
            self.link.request("HEAD", f"{self.path}/store/{self._key(key)}")
        except NotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError(
            f"the service does not list keys; GET {self.path} lists the completed shards"
        )

    def delete(self, key: str) -> None:
        raise PermissionError(f"{self.url} is served read-only")

    def size(self, key: str) -> int:
        try:
            resp = self.link.request("HEAD", f"{self.path}/store/{self._key(key)}")
        except NotFound:
            raise FileNotFoundError(f"{self.url}/{key}") from None
        return int(resp.headers["content-length"])

    def child(self, sub: str) -> ServiceStorage:
        return ServiceStorage(
            self.link.server, self.cache_id, link=self.link, prefix=self._key(sub).strip("/")
        )

    def zarr_store(self, read_only: bool) -> ServiceZarrStore:
        return self._store


def _batches(reads: Sequence[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``reads`` cut into requests of at most MAX_RANGE_READS parts and ~REQUEST_BYTES
    (a whole-object read counts its ``size`` hint, which is not sent)."""
    batches: list[list[dict[str, Any]]] = [[]]
    size = 0
    for read in reads:
        if "end" in read:
            n = read["end"] - read["start"]
        else:
            n = read["suffix"] if "suffix" in read else read.get("size", 0)
        if batches[-1] and (len(batches[-1]) >= MAX_RANGE_READS or size + n > REQUEST_BYTES):
            batches.append([])
            size = 0
        batches[-1].append({k: v for k, v in read.items() if k != "size"})
        size += n
    return [b for b in batches if b]


class ServiceZarrStore(Store):
    """zarr-python's read-only view of a :class:`ServiceStorage`."""

    supports_writes = False
    supports_deletes = False
    supports_partial_writes = False
    supports_listing = False

    def __init__(self, storage: ServiceStorage) -> None:
        super().__init__(read_only=True)
        self.storage = storage

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServiceZarrStore) and other.storage is self.storage

    def __hash__(self) -> int:
        return id(self.storage)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        data = self.storage.prefetched.take(self.storage._key(key), byte_range)
        if data is None:
            data = await asyncio.to_thread(self.storage.get, key, byte_range)
        return None if data is None else prototype.buffer.from_bytes(data)

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(k, prototype, r) for k, r in key_ranges)))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.storage.exists, key)

    async def set(self, key: str, value: Buffer) -> None:
        raise PermissionError(f"{self.storage.url} is served read-only")

    async def delete(self, key: str) -> None:
        raise PermissionError(f"{self.storage.url} is served read-only")

    async def list(self) -> AsyncIterator[str]:
        raise NotImplementedError("the service does not list keys")
        yield ""  # an async generator

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        raise NotImplementedError("the service does not list keys")
        yield ""

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        raise NotImplementedError("the service does not list keys")
        yield ""


@dataclass(frozen=True)
class _Geometry:
    """Where an array's inner chunks sit in its shard objects (kdcache's sharded layout)."""

    grid: tuple[int, ...]  # inner chunks per shard along each axis
    rows_per_chunk: int

    @classmethod
    def of(cls, arr: zarr.Array) -> _Geometry | None:
        codecs: tuple[Any, ...] = tuple(getattr(arr.metadata, "codecs", ()))
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        index = sharding.index_codecs
        if (
            sharding.index_location != ShardingCodecIndexLocation.end
            or len(index) != 2
            or not isinstance(index[0], BytesCodec)
            or not isinstance(index[1], Crc32cCodec)
            or arr.shards is None
        ):
            return None
        inner = tuple(sharding.chunk_shape)
        grid = tuple(s // i for s, i in zip(arr.shards, inner, strict=True))
        return cls(grid, inner[0])

    @property
    def index_bytes(self) -> int:
        return 16 * int(np.prod(self.grid)) + 4

    def parse(self, raw: bytes) -> np.ndarray | None:
        """(offset, length) of each inner chunk, or None when the index fails its CRC-32C."""
        if len(raw) != self.index_bytes:
            return None
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if google_crc32c.value(body) != crc:
            return None
        return np.frombuffer(body, dtype="<u8").reshape(*self.grid, 2)


def _service_storage(storage: Any) -> ServiceStorage | None:
    """The ServiceStorage under ``storage`` (a RemoteStorage wraps it in ``inner``)."""
    for _ in range(3):
        if isinstance(storage, ServiceStorage):
            return storage
        storage = getattr(storage, "inner", None)
    return None


def prefetch_metadata(storage: ServiceStorage) -> None:
    """Fetch what zarr reads to open the cache, the group's and every array's ``zarr.json``, in
    two requests rather than one per array (a cache has 5 to 10 arrays; one request costs
    the service as much CPU as a batch's chunks). A service that cannot be reached or refuses
    the token raises here, as the open would; anything else is left to the normal open, which
    reports it as it always did."""
    root = storage._key("zarr.json")
    try:
        raw = storage.get("zarr.json")
        if raw is None:
            return
        manifest = Manifest.from_dict(json.loads(raw)["attributes"][MANIFEST_KEY])
        keys = [storage._key(f"{spec.name}/zarr.json") for spec in manifest.arrays()]
        found = storage.fetch([{"key": key} for key in keys])
    except (Unreachable, Unavailable, PermissionError):
        raise  # the open would fail the same way, after as many retries again
    except (KDCacheError, ValueError, KeyError, TypeError):
        return
    storage.prefetched.put((root, None, None), raw)
    for key, data in zip(keys, found, strict=True):
        storage.prefetched.put((key, None, None), data)


def prefetch_rows(reader: CacheReader, names: Iterable[str], rows: np.ndarray) -> None:
    """Fetch, in one or few requests, every byte zarr needs to read ``rows`` of ``names``.

    A no-op for caches not read from the service. Anything unexpected (rows out of range,
    incomplete shards, a missing or corrupt object) is left to the normal read, which reports
    it as it always did.
    """
    storage = _service_storage(reader.storage)
    idx = np.unique(np.asarray(rows, dtype=np.int64).reshape(-1))
    if storage is None or idx.size == 0 or idx[0] < 0 or idx[-1] >= reader.manifest.num_rows:
        return
    per = reader.manifest.rows_per_shard
    shards = idx // per
    completed = reader.completed()
    arrays = [(n, reader.arrays[n]) for n in names if n in reader.arrays]
    first, per_array = int(shards[0]), INDEXES_AHEAD // max(1, len(arrays))
    wanted: list[tuple[_Geometry, str, np.ndarray]] = []
    ahead: dict[str, _Geometry] = {}  # indexes of the next shards: cheap to fetch with these
    for name, arr in arrays:
        geo = _Geometry.of(arr)
        if geo is None:
            continue
        for shard in np.unique(shards).tolist():
            if shard in completed:
                local = idx[shards == shard] - shard * per
                wanted.append((geo, shard_key(name, shard, arr.ndim), local))
        for shard in range(first, first + per_array):
            if shard in completed:
                ahead[shard_key(name, shard, arr.ndim)] = geo
    try:
        _fetch_indexes(storage, wanted, ahead)
        _fetch_chunks(storage, wanted)
    except (NotFound, RangeNotSatisfiable, IntegrityError, Unprocessable):
        return  # the normal read path finds and names the problem


def _fetch_indexes(
    storage: ServiceStorage,
    wanted: list[tuple[_Geometry, str, np.ndarray]],
    ahead: dict[str, _Geometry],
) -> None:
    """The shard indexes ``wanted`` lacks, with those of ``ahead`` not known yet."""
    todo = {
        key: geo for geo, key, _ in wanted if storage.prefetched.index(storage._key(key)) is None
    }
    if not todo:
        return
    for key, geo in ahead.items():
        if key not in todo and storage.prefetched.index(storage._key(key)) is None:
            todo[key] = geo
    reads = [{"key": storage._key(k), "suffix": g.index_bytes} for k, g in todo.items()]
    found: list[bytes] = storage.fetch(reads)
    for (key, geo), raw in zip(todo.items(), found, strict=True):
        if geo.parse(raw) is not None:  # a corrupt index is left for zarr to report
            storage.prefetched.keep_index(storage._key(key), bytes(raw))


def _fetch_chunks(storage: ServiceStorage, wanted: list[tuple[_Geometry, str, np.ndarray]]) -> None:
    parts: list[_Part] = []
    sizes: list[int] = []
    for geo, key, local in wanted:
        raw = storage.prefetched.index(storage._key(key))
        index = geo.parse(raw) if raw is not None else None
        if index is None:
            continue
        row_chunks = np.unique(local // geo.rows_per_chunk).tolist()
        full_key = storage._key(key)
        if len(row_chunks) == geo.grid[0]:  # zarr reads a fully selected shard whole
            written = index[index[..., 0] != _MISSING]
            end = int((written[:, 0] + written[:, 1]).max()) if written.size else 0
            parts.append((full_key, None, None))
            sizes.append(end + geo.index_bytes)
            continue
        for coords in product(row_chunks, *(range(g) for g in geo.grid[1:])):
            start, nbytes = (int(v) for v in index[coords])
            if start != _MISSING:
                parts.append((full_key, start, start + nbytes))
                sizes.append(nbytes)
    if not parts:
        return
    reads = [
        {"key": k, "size": n} if s is None else {"key": k, "start": s, "end": e}
        for (k, s, e), n in zip(parts, sizes, strict=True)
    ]
    fetched: list[bytes] = storage.fetch(reads)
    for part, data in zip(parts, fetched, strict=True):
        storage.prefetched.put(part, data)
