"""The shard writer: creates a cache's arrays once, then writes whole shards of every array.

Zarr's shard is the unit of writing: two processes writing parts of one shard object lose data,
so a lease covers exactly one shard of rows and :meth:`CacheWriter.write_shard` writes all of it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, TransposeCodec
from zarr.codecs.numcodecs import LZMA, Shuffle

from kdcache.core.errors import CacheFormatError, ManifestMismatchError
from kdcache.core.format import (
    MANIFEST_KEY,
    ROW_CHUNK_BYTES,
    XZ_ROW_CHUNK_BYTES,
    ArraySpec,
    Manifest,
    plan_chunks,
)
from kdcache.core.shards import ShardRecord, checksum, list_records, write_record
from kdcache.core.storage import Storage, open_storage
from kdcache.core.topk_codec import xz_codec

__all__ = ["CODECS", "CacheWriter", "compressors"]

log = logging.getLogger(__name__)

# Each inner chunk is Blosc-compressed, then gets a CRC-32C: a reader decoding a corrupt chunk
# raises instead of returning wrong numbers (Blosc itself checks nothing). Caches written
# before the checksum was added keep their codecs (they are read from each array's metadata).
# The teacher's outputs (top-k, samples; coded by core.topk_codec) use zstd level 3. Hidden
# states, token ids and masks use level 1: as small within 1% (zstd's gain on bf16/fp16 hidden
# states is entropy-coding the exponent byte, which level 1 does as well), decoded as fast, and
# 3-4x faster to write on the worker, where hidden states are most of the bytes.
CODECS: dict[str, Any] = {
    "name": "blosc",
    "cname": "zstd",
    "clevel": 3,
    "shuffle": "shuffle",
    "checksum": "crc32c",
    "clevel_by_array": {"topk/*": 3, "sample/*": 3, "*": 1},
}


def _clevel(name: str) -> int:
    """Zstd level of array ``name`` (see CODECS["clevel_by_array"])."""
    top = name.split("/", 1)[0] + "/*"
    levels: dict[str, int] = CODECS["clevel_by_array"]
    return levels.get(top, levels["*"])


def compressors(
    shuffle: str = CODECS["shuffle"], clevel: int = CODECS["clevel"]
) -> tuple[BloscCodec, Crc32cCodec]:
    """The codecs of every array kdcache writes (Blosc ``shuffle`` or ``bitshuffle`` at zstd
    level ``clevel``, CRC-32C)."""
    blosc = BloscCodec(
        cname=CODECS["cname"],
        clevel=clevel,
        shuffle="bitshuffle" if shuffle == "bitshuffle" else "shuffle",
    )
    return blosc, Crc32cCodec()


XZ_CHAINS = ("xz-ranks", "xz-ids", "xz-planes")
"""The codec chains of a ``lossless-xz`` cache's top-k arrays (core.topk_codec)."""


def _codecs(spec: ArraySpec) -> dict[str, Any]:
    """``filters`` and ``compressors`` of ``create_array`` for ``spec``."""
    if spec.compression == "blosc":
        return {"compressors": compressors(spec.shuffle, _clevel(spec.name))}
    if spec.compression == "blosc-ranks":  # (rows, T, w) chunks stored as (w, rows, T)
        return {
            "filters": [TransposeCodec(order=(2, 0, 1))],
            "compressors": compressors("bitshuffle", _clevel(spec.name)),
        }
    itemsize = np.dtype(spec.dtype).itemsize
    planes = Shuffle(elementsize=itemsize)
    if spec.compression == "xz-ranks":  # (rows, T, k) chunks stored as (k, rows, T): by rank
        return {
            "filters": [TransposeCodec(order=(2, 0, 1))],
            "compressors": (planes, LZMA(**xz_codec(1, literal_context=3)), Crc32cCodec()),
        }
    if spec.compression == "xz-ids":
        return {"compressors": (LZMA(**xz_codec(itemsize)), Crc32cCodec())}
    if spec.compression == "xz-planes":
        return {"compressors": (planes, LZMA(**xz_codec(1, literal_context=3)), Crc32cCodec())}
    raise ValueError(f"unknown compression {spec.compression!r} of {spec.name}")


def _create_array(group: zarr.Group, spec: ArraySpec, m: Manifest) -> None:
    itemsize = np.dtype(spec.dtype).itemsize
    row_target = ROW_CHUNK_BYTES if spec.compression.startswith("blosc") else XZ_ROW_CHUNK_BYTES
    chunks = plan_chunks(spec.row_shape, itemsize, m.rows_per_shard, row_target=row_target)
    shards = (m.rows_per_shard, *spec.row_shape)
    attrs: dict[str, Any] = (
        {"dtype": spec.logical_dtype} if spec.logical_dtype != spec.dtype else {}
    )
    if spec.coding:
        attrs["coding"] = spec.coding
    group.create_array(
        spec.name,
        shape=(m.num_rows, *spec.row_shape),
        dtype=spec.dtype,
        chunks=chunks,
        shards=shards,
        fill_value=0,
        **_codecs(spec),
        attributes=attrs,
    )


def _create_arrays(group: zarr.Group, m: Manifest) -> None:
    """Create the arrays not there yet; idempotent, and safe while other writers do the same."""
    for spec in m.arrays():
        if spec.name in group:
            continue
        try:
            _create_array(group, spec, m)
        except (zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError, FileExistsError):
            pass


GROUP_WAIT_S = 30.0
"""How long a writer that lost the race to create a cache waits for the winner's ``zarr.json``."""


def _group_appears(storage: Storage, timeout: float | None = None) -> bool:
    """Whether to open the cache again after losing the race to create it: ``zarr.json`` is
    there, or appears while the only other objects are a writer's temporary
    ``zarr.<hex>.partial`` (zarr's local store writes a temp file and renames it, so a racing
    writer sees the directory non-empty before the group exists), or the directory emptied.
    False: other files, or no group within ``timeout`` (default :data:`GROUP_WAIT_S`)."""
    deadline = time.monotonic() + (GROUP_WAIT_S if timeout is None else timeout)
    while not storage.exists("zarr.json"):
        others = [k for k in storage.list("") if k != "zarr.json"]
        if not others:
            return True
        if not all(k.startswith("zarr.") and k.endswith(".partial") for k in others):
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class CacheWriter:
    """Writes one cache. Safe to open from many workers at once: creation is idempotent."""

    def __init__(self, storage: Storage, manifest: Manifest, group: zarr.Group) -> None:
        self.storage = storage
        self.manifest = manifest
        self.group = group
        # Every shard object is written, even one that is all fill value (padding rows): a
        # missing object of a completed shard then always means lost data, never "zeros".
        self._arrays: dict[str, zarr.Array] = {
            s.name: group[s.name].with_config({"write_empty_chunks": True})  # type: ignore[union-attr]
            for s in manifest.arrays()
        }

    @classmethod
    def open(
        cls, url: str, manifest: Manifest, storage_options: dict[str, Any] | None = None
    ) -> CacheWriter:
        """Create the cache at ``url``, or open it when one with the same id is already there."""
        storage = open_storage(url, storage_options)
        store = storage.zarr_store(read_only=False)
        try:
            group = zarr.open_group(store, mode="r+", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            group = None
        if group is not None:
            existing = group.attrs.get(MANIFEST_KEY)
            if existing is None:
                raise CacheFormatError(f"{url} is a Zarr group but not a kdcache cache")
            found = Manifest.from_dict(dict(existing))  # type: ignore[arg-type]
            # Codecs may differ (an older cache without chunk checksums): the arrays' own
            # metadata says how to write, so this writer can finish that cache.
            if replace(found, codecs=manifest.codecs) != manifest:
                mine, theirs = manifest.to_dict(), found.to_dict()
                diff = [
                    f"{k}: {theirs[k]!r} there, {mine[k]!r} here"
                    for k in mine
                    if mine[k] != theirs[k]
                ]
                raise ManifestMismatchError(
                    f"{url} holds cache {found.cache_id} with a different manifest; refusing to "
                    "write into it (" + "; ".join(diff) + ")"
                )
            _create_arrays(group, found)  # the writer that made the group may still be at it
            return cls(storage, found, group)
        # Never mode="w": it would delete what a worker racing us has already written.
        try:
            group = zarr.open_group(store, mode="w-", attributes={MANIFEST_KEY: manifest.to_dict()})
        except (zarr.errors.ContainsGroupError, FileExistsError):  # another writer was first
            if not _group_appears(storage):  # not a writer: other files (retrying never ends)
                raise CacheFormatError(
                    f"{url} holds files but no Zarr group: not a kdcache cache"
                ) from None
            return cls.open(url, manifest, storage_options)
        _create_arrays(group, manifest)
        log.info("created cache %s at %s", manifest.cache_id, url)
        return cls(storage, manifest, group)

    def completed(self) -> dict[int, ShardRecord]:
        return list_records(self.storage)

    def missing_shards(self) -> list[int]:
        done = self.completed()
        return [s for s in range(self.manifest.num_shards) if s not in done]

    def write_shard(
        self, shard: int, data: dict[str, np.ndarray], *, writer: dict[str, Any] | None = None
    ) -> ShardRecord:
        """Write every array's rows of ``shard`` (whole Zarr shards) and return its record.

        The record is not yet published: call :meth:`commit` once it is also recorded elsewhere
        where that is wanted (the service records it in its database on ``complete``).
        """
        t0 = time.perf_counter()
        start, end = self.manifest.shard_rows(shard)
        expected = {s.name: s for s in self.manifest.arrays()}
        if set(data) != set(expected):
            raise ValueError(
                f"shard {shard}: arrays {sorted(data)} do not match the cache's {sorted(expected)}"
            )
        sums = {}
        for name, arr in data.items():
            spec = expected[name]
            want = (end - start, *spec.row_shape)
            if arr.shape != want or arr.dtype != np.dtype(spec.dtype):
                raise ValueError(
                    f"shard {shard}: {name} is {arr.shape} {arr.dtype}, "
                    f"expected {want} {spec.dtype}"
                )
            self._arrays[name][start:end] = arr
            sums[name] = checksum(arr)
        return ShardRecord(
            shard=shard,
            start=start,
            end=end,
            checksums=sums,
            tokens=(end - start) * self.manifest.seq_len,
            seconds=round(time.perf_counter() - t0, 6),
            writer=dict(writer or {}),
        )

    def commit(self, record: ShardRecord) -> None:
        """Publish a shard: from now on readers see its rows."""
        write_record(self.storage, record)

    def clean_partial(self) -> int:
        """Remove temp files a killed writer left behind; returns how many."""
        stale = [k for k in self.storage.list("") if k.endswith(".partial")]
        for key in stale:
            self.storage.delete(key)
        return len(stale)
