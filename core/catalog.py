"""The caches under a storage root (``ROOT/caches/<cache_id>``), for ``kdcache ls`` and
``kdcache inspect ROOT``."""

from __future__ import annotations

import re
from typing import Any

from kdcache.core.errors import KDCacheError
from kdcache.core.storage import open_storage

__all__ = ["describe_cache", "find_caches", "is_cache"]

_CACHE_META = re.compile(r"^(?:caches/)?([^/]+)/zarr\.json$")


def is_cache(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``url`` is itself a Zarr group (a cache), not a root holding caches."""
    return open_storage(url, storage_options).exists("zarr.json")


def find_caches(root: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """URLs of the caches under ``root`` (a storage root, or its ``caches`` folder), sorted.

    Lists every key under the root once (one directory walk or one object listing).
    """
    storage = open_storage(root, storage_options)
    base = root.rstrip("/")
    for prefix in ("caches", ""):
        keys = storage.list(prefix)
        ids = sorted({m.group(1) for k in keys if (m := _CACHE_META.match(k))})
        if ids:
            where = f"{base}/{prefix}" if prefix else base
            return [f"{where}/{i}" for i in ids]
    return []


def describe_cache(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Name, rows, size on disk and completeness of one cache; ``error`` if it cannot be read."""
    from kdcache.core.inspect import inspect_cache
    from kdcache.core.reader import CacheReader

    cache_id = url.rstrip("/").rsplit("/", 1)[-1]
    try:
        info = inspect_cache(url, CacheReader(url, storage_options=storage_options))
    except KDCacheError as err:
        return {"cache_id": cache_id, "url": url, "error": str(err)}
    m = info["manifest"]
    return {
        "cache_id": cache_id,  # the folder's name: what to type (a moved copy keeps its id)
        "url": url,
        "name": m["name"],
        "rows": m["num_rows"],
        "rows_done": info["rows_done"],
        "shards_done": info["shards_done"],
        "shards_total": info["shards_total"],
        "complete": info["complete"],
        "bytes": info["bytes"],
    }
