"""Where things live, said once: caches under a storage root, and the keys inside a cache.

::

    <root>/caches/<cache_id>/                  one cache (a Zarr v3 group)
        zarr.json                              group metadata + the manifest
        <array>/zarr.json                      array metadata
        <array>/c/<shard>/0[/0]                the shard object of row-shard <shard>
        _kdcache/shards/<shard:08d>.json       completion record of a shard
        _kdcache/job.json                      the job spec that made the cache (embedded runs)

Every array is sharded ``(rows_per_shard, *row_shape)``, so a chunk key's first grid index is the
row-shard and the others are 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "CACHES_DIR",
    "JOB_SPEC_KEY",
    "MAX_SHARD_INDEX",
    "RECORDS_PREFIX",
    "cache_url",
    "parse_chunk_key",
    "parse_record_key",
    "record_key",
    "shard_key",
]

CACHES_DIR = "caches"
RECORDS_PREFIX = "_kdcache/shards"
JOB_SPEC_KEY = "_kdcache/job.json"
MAX_SHARD_INDEX = (1 << 31) - 1  # a shard index beyond this names no shard of any cache
_RECORD = re.compile(r"^_kdcache/shards/([0-9]{1,10})\.json$")
_INDEX = re.compile(r"^[0-9]{1,10}$")


def cache_url(root: str | os.PathLike[str], cache_id: str) -> str:
    """Where a cache lives under a storage root: ``<root>/caches/<cache_id>`` (a local root is
    made absolute)."""
    r = str(root).rstrip("/")
    if "://" in r and not r.startswith("file://"):
        return f"{r}/{CACHES_DIR}/{cache_id}"
    return str(Path(r.removeprefix("file://")).absolute() / CACHES_DIR / cache_id)


def shard_key(array: str, shard: int, ndim: int) -> str:
    """Store key of an array's shard object (default chunk key encoding, "/" separated)."""
    return "/".join([array, "c", str(shard), *["0"] * (ndim - 1)])


def record_key(shard: int) -> str:
    """Store key of a shard's completion record."""
    return f"{RECORDS_PREFIX}/{shard:08d}.json"


def parse_record_key(key: str) -> int | None:
    """The shard of a completion record key written by :func:`record_key`, else None."""
    m = _RECORD.match(key)
    if m is None:
        return None
    shard = int(m.group(1))
    return shard if key == record_key(shard) and shard <= MAX_SHARD_INDEX else None


def parse_chunk_key(key: str, ndims: Mapping[str, int]) -> tuple[str, int] | None:
    """``(array, shard)`` of a chunk key ``<array>/c/<i>/<j>...`` of one of ``ndims``' arrays
    (name -> ndim), else None. Indices are plain decimals; none beyond
    :data:`MAX_SHARD_INDEX`."""
    parts = key.split("/")
    if "c" not in parts:
        return None
    cut = parts.index("c")
    array, index = "/".join(parts[:cut]), parts[cut + 1 :]
    if ndims.get(array) != len(index) or not all(_INDEX.match(p) for p in index):
        return None
    values = [int(p) for p in index]
    if max(values) > MAX_SHARD_INDEX:
        return None
    return array, values[0]
