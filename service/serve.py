"""HTTP responses for raw cache keys: policy checks, conditional requests, ranges, streaming."""

from __future__ import annotations

from email.utils import formatdate

from fastapi import Response
from fastapi.responses import StreamingResponse

from kdcache.core.errors import NotFound
from kdcache.service.files import CacheFiles, FileStat, classify_key, valid_cache_id
from kdcache.service.ranges import parse_range
from kdcache.service.store import JobStore

__all__ = ["store_response"]


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _media_type(key: str) -> str:
    return "application/json" if key.endswith(".json") else "application/octet-stream"


def _check(files: CacheFiles, store: JobStore, cache_id: str, key: str) -> FileStat:
    """The key's stat when it may be served; NotFound otherwise (never says why it is hidden)."""
    if not valid_cache_id(cache_id) or not store.caches.exists(cache_id):
        raise NotFound(f"no cache {cache_id!r}")
    kind = classify_key(key, files.manifest(cache_id))
    missing = NotFound(f"no key {key!r} in cache {cache_id}")
    if kind is None:
        raise missing
    if kind.shard is not None and not store.caches.shard_done(cache_id, kind.shard):
        raise NotFound(f"shard {kind.shard} of cache {cache_id} is not complete")
    st = files.stat(cache_id, key)
    if st is None:
        raise missing
    return st


def store_response(
    files: CacheFiles,
    store: JobStore,
    cache_id: str,
    key: str,
    *,
    head: bool,
    range_header: str | None,
    if_none_match: str | None,
    if_range: str | None,
) -> Response:
    """200, 206 or 304 for one key, streamed from storage in blocks."""
    st = _check(files, store, cache_id, key)
    headers = {
        "ETag": st.etag,
        "Last-Modified": formatdate(st.mtime, usegmt=True),
        "Accept-Ranges": "bytes",
    }
    if if_none_match is not None and _etag_matches(if_none_match, st.etag):
        return Response(status_code=304, headers=headers)
    rng = parse_range(range_header, st.size)
    if rng is not None and if_range is not None and if_range.strip() != st.etag:
        rng = None  # the client's copy is stale: send the whole object
    status, start, length = 200, 0, st.size
    if rng is not None:
        status, start, length = 206, rng.start, rng.length
        headers["Content-Range"] = rng.content_range
    headers["Content-Length"] = str(length)
    media = _media_type(key)
    if head:
        return Response(status_code=status, headers=headers, media_type=media)
    return StreamingResponse(
        files.blocks(cache_id, key, start, length),
        status_code=status,
        headers=headers,
        media_type=media,
    )
