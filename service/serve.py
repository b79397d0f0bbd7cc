"""HTTP responses for raw cache keys: policy checks, conditional requests, ranges, bodies.

Least copying under uvicorn: ASGI servers other than those with the ``http.response.pathsend``
or ``zerocopysend`` extensions (uvicorn has neither) cannot ``sendfile(2)``, so every body passes
through user space once. A body of at most :data:`INLINE_BYTES` is read with one ``pread`` per
range in the route's worker thread and handed to the server as it is (no joins, no thread hop
per block); a larger one streams in :data:`~kdcache.service.files.BLOCK_BYTES` blocks.
Several ranges give ``206 multipart/byteranges`` (RFC 9110 §14.6).
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from email.utils import formatdate

from fastapi import Response
from fastapi.responses import StreamingResponse

from kdcache.core.errors import NotFound, RangeNotSatisfiable, Unprocessable
from kdcache.core.wire import MAX_RANGE_READ_BYTES, RANGE_LENGTHS_HEADER, RangeReadRequest
from kdcache.service.files import (
    CacheFiles,
    FileStat,
    classify_key,
    key_dims,
    valid_cache_id,
)
from kdcache.service.ranges import ByteRange, parse_ranges
from kdcache.service.store import JobStore

__all__ = [
    "INLINE_BYTES",
    "ShardGate",
    "body_response",
    "check_key",
    "ranges_response",
    "store_response",
]

INLINE_BYTES = 16 << 20


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _media_type(key: str) -> str:
    return "application/json" if key.endswith(".json") else "application/octet-stream"


class ShardGate:
    """Which keys of one cache may be served, asking the database once per cache and shard."""

    def __init__(self, files: CacheFiles, store: JobStore, cache_id: str) -> None:
        self.files, self.store, self.cache_id = files, store, cache_id
        if not valid_cache_id(cache_id) or not store.caches.exists(cache_id):
            raise NotFound(f"no cache {cache_id!r}")
        self._done: dict[int, bool] = {}
        self._manifest = files.manifest(cache_id)
        self._dims = key_dims(self._manifest)

    def check(self, key: str) -> FileStat:
        """The key's stat when it may be served; NotFound otherwise (never says why it is
        hidden beyond an incomplete shard)."""
        kind = classify_key(key, self._manifest, self._dims)
        missing = NotFound(f"no key {key!r} in cache {self.cache_id}")
        if kind is None:
            raise missing
        if kind.shard is not None:
            done = self._done.get(kind.shard)
            if done is None:
                done = self._done[kind.shard] = self.store.caches.shard_done(
                    self.cache_id, kind.shard
                )
            if not done:
                raise NotFound(f"shard {kind.shard} of cache {self.cache_id} is not complete")
        st = self.files.stat(self.cache_id, key)
        if st is None:
            raise missing
        return st


def check_key(files: CacheFiles, store: JobStore, cache_id: str, key: str) -> FileStat:
    """The stat of one key that may be served; NotFound otherwise."""
    return ShardGate(files, store, cache_id).check(key)


# (key, its stat, bytes before, start, length, bytes after): one part of a body
_Part = tuple[str, FileStat, bytes, int, int, bytes]


def _body_bytes(parts: Iterable[_Part]) -> int:
    return sum(len(b) + n + len(a) for _, _, b, _, n, a in parts)


async def _pieces(pieces: list[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def body_response(
    files: CacheFiles,
    cache_id: str,
    parts: Iterable[_Part],
    *,
    status_code: int,
    headers: dict[str, str],
    media_type: str,
) -> Response:
    """A response whose body is, per part ``(key, stat, before, start, length, after)``: the
    bytes ``before``, ``length`` bytes of ``key`` from ``start``, then ``after``.

    Read here (one ``pread`` per part) when the body is small, else streamed in blocks.
    """
    parts = list(parts)
    total = _body_bytes(parts)
    headers = {**headers, "Content-Length": str(total)}
    if total <= INLINE_BYTES:
        pieces: list[bytes] = []
        for key, st, before, start, length, after in parts:
            data = files.read(cache_id, key, start, length, st)
            if len(data) != length:  # the object shrank after its stat: never send a short body
                raise NotFound(f"{key!r} in cache {cache_id} changed while it was read")
            pieces += [p for p in (before, data, after) if p]
        return StreamingResponse(
            _pieces(pieces), status_code=status_code, headers=headers, media_type=media_type
        )

    def stream() -> Iterator[bytes]:
        for key, _, before, start, length, after in parts:
            if before:
                yield before
            yield from files.blocks(cache_id, key, start, length)
            if after:
                yield after

    return StreamingResponse(
        stream(), status_code=status_code, headers=headers, media_type=media_type
    )


def _multipart(
    key: str, st: FileStat, ranges: list[ByteRange], media: str
) -> tuple[str, list[_Part]]:
    boundary = secrets.token_hex(16)
    parts = []
    for i, r in enumerate(ranges):
        sep = "" if i == 0 else "\r\n"
        head = (
            f"{sep}--{boundary}\r\n"
            f"Content-Type: {media}\r\nContent-Range: {r.content_range}\r\n\r\n"
        ).encode("latin-1")
        tail = f"\r\n--{boundary}--\r\n".encode("latin-1") if i == len(ranges) - 1 else b""
        parts.append((key, st, head, r.start, r.length, tail))
    return f"multipart/byteranges; boundary={boundary}", parts


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
    """200, 206 (one range, or several as multipart/byteranges) or 304 for one key."""
    st = check_key(files, store, cache_id, key)
    headers = {
        "ETag": st.etag,
        "Last-Modified": formatdate(st.mtime, usegmt=True),
        "Accept-Ranges": "bytes",
    }
    if if_none_match is not None and _etag_matches(if_none_match, st.etag):
        return Response(status_code=304, headers=headers)
    ranges = parse_ranges(range_header, st.size)
    if ranges is not None and if_range is not None and if_range.strip() != st.etag:
        ranges = None  # the client's copy is stale: send the whole object
    media = _media_type(key)
    if ranges is None:
        status, parts = 200, [(key, st, b"", 0, st.size, b"")]
    elif len(ranges) == 1:
        status, parts = 206, [(key, st, b"", ranges[0].start, ranges[0].length, b"")]
        headers["Content-Range"] = ranges[0].content_range
    else:
        status = 206
        media, parts = _multipart(key, st, ranges, media)
    if head:
        headers["Content-Length"] = str(_body_bytes(parts))
        return Response(status_code=status, headers=headers, media_type=media)
    return body_response(
        files, cache_id, parts, status_code=status, headers=headers, media_type=media
    )


def ranges_response(
    files: CacheFiles, store: JobStore, cache_id: str, request: RangeReadRequest
) -> Response:
    """The byte ranges of ``request``, concatenated in its order (lengths in a header).

    Every key is checked as a single GET would be (404 for a key not served, an incomplete
    shard's included); a range past an object's end is 416 naming the key, so a short
    (truncated) object is never mistaken for its first bytes.
    """
    gate = ShardGate(files, store, cache_id)
    stats: dict[str, FileStat] = {}
    parts: list[_Part] = []
    for i, want in enumerate(request.ranges):
        st = stats.get(want.key)
        if st is None:
            st = stats[want.key] = gate.check(want.key)
        if want.start is not None and want.end is not None:
            if want.end > st.size:
                raise RangeNotSatisfiable(
                    f"ranges[{i}]: bytes {want.start}-{want.end - 1} of {want.key!r} end past "
                    f"its {st.size} bytes",
                    st.size,
                )
            start, length = want.start, want.end - want.start
        elif want.suffix is not None:
            length = min(want.suffix, st.size)
            start = st.size - length
        else:
            start, length = 0, st.size
        parts.append((want.key, st, b"", start, length, b""))
    total = _body_bytes(parts)
    if total > MAX_RANGE_READ_BYTES:
        raise Unprocessable(
            f"the ranges add up to {total} bytes; ask for at most {MAX_RANGE_READ_BYTES} per "
            "request",
            field="ranges",
        )
    headers = {RANGE_LENGTHS_HEADER: ",".join(str(p[4]) for p in parts)}
    return body_response(
        files,
        cache_id,
        parts,
        status_code=200,
        headers=headers,
        media_type="application/octet-stream",
    )
