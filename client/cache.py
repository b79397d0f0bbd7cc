"""TeacherCache: random access to a cache's rows as torch tensors.

The source is a local directory, an ``s3://`` URL (fsspec), or an ``http(s)://`` URL of a cache
served by the kdcache service (``http://host:port/v1/caches/<id>``). Over HTTP completion comes from
the service, and the chunks a batch needs are fetched in one or few requests over kept-alive
connections (:mod:`kdcache.client._service`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdcache.client._fields import expand_fields, stored_arrays, to_tensors
from kdcache.client._remote import RemoteStorage, policy
from kdcache.client._service import ServiceStorage, prefetch_metadata, prefetch_rows
from kdcache.core.errors import CacheNotFoundError, KDCacheError, NotFound
from kdcache.core.format import ARRAY_LOSS_MASK, Manifest
from kdcache.core.hidden_basis import Basis, read_basis, read_basis_record
from kdcache.core.reader import CacheReader
from kdcache.core.rest import ServiceLink
from kdcache.core.shards import ShardRecord
from kdcache.core.storage import Storage, is_remote, open_storage

__all__ = ["TeacherCache", "hidden_bases", "open_reader"]

# arrays a cache may hold beyond its manifest's (written by newer kdcache; older caches lack them)
_OPTIONAL_ARRAYS = (ARRAY_LOSS_MASK,)

_SERVICE_CACHE = re.compile(r"^(https?://.+?)/v1/caches/([0-9a-fA-F]+)/?$")


def _service_completed(link: ServiceLink, cache_id: str) -> Mapping[int, ShardRecord]:
    try:
        body = link.get(f"/v1/caches/{cache_id}").json()
    except NotFound:
        raise CacheNotFoundError(f"the service at {link.server} has no cache {cache_id}") from None
    return {int(r["shard"]): ShardRecord.from_dict(r) for r in body.get("completed", [])}


def _attach_optional(reader: CacheReader) -> CacheReader:
    """Let ``reader`` read the optional arrays its cache has."""
    for name in _OPTIONAL_ARRAYS:
        if name in reader.arrays:
            continue
        try:
            reader.arrays[name] = reader.group[name]  # type: ignore[assignment]
        except KeyError:
            pass
    return reader


def open_reader(
    source: str | os.PathLike[str],
    *,
    token: str | None = None,
    storage_options: dict[str, Any] | None = None,
    wrap_storage: Callable[[Storage], Storage] | None = None,
) -> CacheReader:
    """A core :class:`CacheReader` for a local path, ``s3://`` URL or service cache URL.

    ``wrap_storage`` wraps the cache's storage before it is read (a disk cache); by default a
    remote cache's reads are retried under the core retry policy.
    """
    src = str(source)
    wrap = wrap_storage or (RemoteStorage if is_remote(src) else (lambda s: s))
    m = _SERVICE_CACHE.match(src)
    if m is None:
        return _attach_optional(CacheReader(src, storage=wrap(open_storage(src, storage_options))))
    base, cache_id = m.group(1), m.group(2)
    token = token if token is not None else os.environ.get("KDCACHE_TOKEN")
    storage = ServiceStorage(base, cache_id, token, retry=policy(3, 0.2))
    prefetch_metadata(storage)  # 2 requests, not one per array
    reader = CacheReader(
        storage.url,
        storage=wrap_storage(storage) if wrap_storage is not None else storage,
        completed=lambda: _service_completed(storage.link, cache_id),
    )
    return _attach_optional(reader)


def hidden_bases(reader: CacheReader) -> Basis:
    """A ``pca:R`` cache's stored basis per layer (empty for other caches), checked against
    its published record when the record is readable (over HTTP: once shard 0 is complete)."""
    m = reader.manifest
    if not m.basis_arrays():
        return {}
    try:
        record = read_basis_record(reader.storage)
    except (OSError, KDCacheError):
        record = None
    return read_basis(reader.group, m, record)


class TeacherCache:
    """Random access by row to a cache, as torch tensors ready for the losses.

    ``decode_hidden``: for a ``pca:R`` cache, ``hidden_<l>`` decoded to (T, d) float32 rather
    than its codes (T, R); :meth:`hidden_basis` gives the basis either way.
    """

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        token: str | None = None,
        storage_options: dict[str, Any] | None = None,
        decode_hidden: bool = False,
    ) -> None:
        self.source = str(source)
        self.reader = open_reader(source, token=token, storage_options=storage_options)
        self.decode_hidden = bool(decode_hidden)
        self._bases: Basis | None = None

    def hidden_basis(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A ``pca:R`` cache's (basis (R, d), mean (d,)) float32 for ``layer``: codes c decode
        to ``mean + c @ basis``; a student state s projects into the basis as
        ``(s - mean) @ basis.T``."""
        bases = self._hidden_bases()
        if layer not in bases:
            raise KeyError(
                f"no pca basis for layer {layer}: the cache's hidden codec is "
                f"{self.manifest.hidden_codec!r}, its layers {self.manifest.hidden_layers}"
            )
        vecs, mean = bases[layer]
        return torch.from_numpy(vecs), torch.from_numpy(mean)

    def _hidden_bases(self) -> Basis:
        if self._bases is None:
            self._bases = hidden_bases(self.reader)
        return self._bases

    @property
    def manifest(self) -> Manifest:
        return self.reader.manifest

    @property
    def cache_id(self) -> str:
        return self.manifest.cache_id

    @property
    def fields(self) -> list[str]:
        """Every field key this cache can give."""
        return expand_fields(self.manifest, None)

    @property
    def is_complete(self) -> bool:
        return self.reader.is_complete

    def __len__(self) -> int:
        return self.manifest.num_rows

    def read(
        self, fields: Iterable[str] | None, rows: Sequence[int] | np.ndarray
    ) -> dict[str, np.ndarray]:
        """Raw numpy arrays (stored dtypes) for ``rows``, keyed by field (a ``loss_mask`` only
        where the cache stores one)."""
        keys = expand_fields(self.manifest, fields)
        idx = np.asarray(rows, dtype=np.int64)
        names = stored_arrays(keys, self.reader.arrays)
        prefetch_rows(self.reader, names.values(), idx)  # over HTTP: one or few requests
        return {f: self.reader.read(name, idx) for f, name in names.items()}

    def batch(
        self, rows: Sequence[int] | np.ndarray, fields: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Tensors for ``rows`` with a leading batch dimension: keys as in the module docs."""
        idx = np.asarray(rows, dtype=np.int64).reshape(-1)
        keys = expand_fields(self.manifest, fields)
        bases = self._hidden_bases() if self.decode_hidden else None
        return to_tensors(self.manifest, idx, self.read(keys, idx), keys, bases=bases)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        """One row without the batch dimension."""
        n = len(self)
        if not -n <= row < n:
            raise IndexError(f"row {row} out of range for {n} rows")
        b = self.batch([row % n])
        return {k: v[0] for k, v in b.items()}

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"TeacherCache({self.source!r}, rows={m.num_rows}, seq_len={m.seq_len}, "
            f"topk={m.topk}, layers={m.hidden_layers})"
        )
