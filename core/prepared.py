"""Prepared rows: a document dataset tokenised once, stored beside its cache for the fleet.

A ``jsonl`` or ``hf`` job submitted to the service cannot be split into shards before its text is
tokenised (packing decides the row count). The first unit of work (the "prepare" lease) tokenises
it and stores the rows at ``<root>/prepared/<cache_id>`` (beside ``<root>/caches/<cache_id>``,
whose Zarr group only a shard writer creates), one object per shard of rows, so every later shard
lease reads exactly its rows instead of tokenising the whole dataset again::

    shards/<8 digits>.npz   input_ids (n, T) int32, loss_mask (n, T) bool
    meta.json               rows, seq_len, rows_per_shard, cache id, and the SHA-256 of every
                            shard object; written LAST

``meta.json`` is the commit point: a preparer killed before writing it leaves objects that the
next preparer overwrites with the same bytes (tokenising is deterministic); readers refuse a
prepared store without it, and a shard object whose hash differs from ``meta.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kdcache.core.errors import CacheFormatError, IntegrityError
from kdcache.core.format import shard_rows
from kdcache.core.storage import Storage

__all__ = [
    "PREPARED_META",
    "PreparedMeta",
    "PreparedRows",
    "prepared_url",
    "read_prepared_meta",
    "write_prepared",
]

PREPARED_META = "meta.json"


def prepared_url(cache_url: str) -> str:
    """The prepared rows of the cache ``<root>/caches/<id>``: ``<root>/prepared/<id>``."""
    head, sep, cache_id = str(cache_url).rstrip("/").rpartition("/caches/")
    if not sep or not cache_id or "/" in cache_id:
        raise ValueError(f"{cache_url} is not a cache location <root>/caches/<cache_id>")
    return f"{head}/prepared/{cache_id}"


def _shard_key(shard: int) -> str:
    return f"shards/{shard:08d}.npz"


@dataclass(frozen=True)
class PreparedMeta:
    """What a prepared store holds; ``sha256[i]`` is the hash of shard object i's bytes."""

    cache_id: str
    num_rows: int
    seq_len: int
    rows_per_shard: int
    sha256: list[str]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return len(self.sha256)


def read_prepared_meta(storage: Storage) -> PreparedMeta | None:
    """The store's ``meta.json``, or None while nothing is prepared (or it is unreadable)."""
    try:
        raw = json.loads(storage.read_bytes(PREPARED_META))
        meta = PreparedMeta(**raw)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if meta.num_shards != -(-meta.num_rows // meta.rows_per_shard):
        return None
    return meta


def _encode(ids: np.ndarray, mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, input_ids=ids.astype(np.int32), loss_mask=mask.astype(bool))
    return buf.getvalue()


def write_prepared(
    storage: Storage,
    *,
    cache_id: str,
    num_rows: int,
    seq_len: int,
    rows_per_shard: int,
    shards: Iterator[tuple[np.ndarray, np.ndarray]],
    source: dict[str, Any] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> PreparedMeta | None:
    """Store ``shards`` ((ids, loss_mask) per shard of rows, in order), then ``meta.json``.

    Returns None (and writes no ``meta.json``) when ``should_stop()`` turns true between shards.
    """
    hashes: list[str] = []
    for i, (ids, mask) in enumerate(shards):
        start, end = shard_rows(i, rows_per_shard, num_rows)
        if ids.shape != (end - start, seq_len) or mask.shape != ids.shape:
            raise ValueError(f"prepared shard {i}: shapes {ids.shape}, {mask.shape}")
        if should_stop():
            return None
        data = _encode(ids, mask)
        storage.write_bytes(_shard_key(i), data)
        hashes.append(hashlib.sha256(data).hexdigest())
    meta = PreparedMeta(cache_id, num_rows, seq_len, rows_per_shard, hashes, dict(source or {}))
    if meta.num_shards != -(-num_rows // rows_per_shard):
        raise ValueError(f"{meta.num_shards} prepared shards for {num_rows} rows")
    storage.write_bytes(PREPARED_META, json.dumps(asdict(meta), indent=1).encode())
    return meta


class PreparedRows:
    """Rows of a prepared store: a :class:`~kdcache.worker.datasets.DatasetSource`.

    Reads (and checks) whole shard objects and keeps the last one, so reading a lease's rows
    fetches one object.
    """

    def __init__(self, storage: Storage, meta: PreparedMeta | None = None) -> None:
        found = meta or read_prepared_meta(storage)
        if found is None:
            raise CacheFormatError(f"{storage.url} holds no prepared rows ({PREPARED_META})")
        self.storage, self.meta = storage, found
        self.num_rows: int = found.num_rows
        self.seq_len: int = found.seq_len
        self.fingerprint_extra: dict[str, Any] = {"source": "prepared", **found.source}
        self._last: tuple[int, dict[str, np.ndarray]] | None = None

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if self._last is not None and self._last[0] == shard:
            return self._last[1]
        key = _shard_key(shard)
        try:
            data = self.storage.read_bytes(key)
        except FileNotFoundError:
            raise IntegrityError(f"{self.storage.url}: prepared {key} is missing") from None
        if hashlib.sha256(data).hexdigest() != self.meta.sha256[shard]:
            raise IntegrityError(f"{self.storage.url}: prepared {key} fails its checksum")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {"input_ids": z["input_ids"], "loss_mask": z["loss_mask"]}
        self._last = (shard, arrays)
        return arrays

    def _read(self, name: str, start: int, end: int) -> np.ndarray:
        if not 0 <= start <= end <= self.num_rows:
            raise IndexError(f"rows {start}..{end} out of range 0..{self.num_rows}")
        per = self.meta.rows_per_shard
        parts = []
        row = start
        while row < end:
            shard = row // per
            stop = min(end, (shard + 1) * per)
            parts.append(self._shard(shard)[name][row - shard * per : stop - shard * per])
            row = stop
        if not parts:
            dtype = np.int32 if name == "input_ids" else bool
            return np.empty((0, self.seq_len), dtype=dtype)
        return np.concatenate(parts)

    def rows(self, start: int, end: int) -> np.ndarray:
        """(end - start, T) int64 token ids."""
        return self._read("input_ids", start, end).astype(np.int64)

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        """(end - start, T) bool, as the preparer computed it."""
        return self._read("loss_mask", start, end).copy()
