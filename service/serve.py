"""HTTP responses for raw cache keys: policy checks, conditional requests, ranges, bodies.

Least copying under uvicorn: ASGI servers other than those with the ``http.response.pathsend``
or ``zerocopysend`` extensions (uvicorn has neither) cannot ``sendfile(2)``, so every body passes
through user space once. A body of at most :data:`INLINE_BYTES` is read straight into one
buffer (``preadv``, one open per object) and sent in one message; a larger one streams in
:data:`~kdcache.service.files.BLOCK_BYTES` blocks. Several ranges give ``206
multipart/byteranges`` (RFC 9110 §14.6).

Most of a small read's cost is the framework around it, not the file work, so
:func:`respond` serves on the event loop itself (no hop to a worker thread and back) when it
needs only local files of at most :data:`LOOP_BYTES` and what the service already remembers
(the cache exists, the shards are complete); otherwise it runs in the thread pool.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Iterator
from email.utils import formatdate
from typing import Any

from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from kdcache.core.errors import NotFound, RangeNotSatisfiable, Unprocessable
from kdcache.core.wire import MAX_RANGE_READ_BYTES, RANGE_LENGTHS_HEADER, RangeReadRequest
from kdcache.service.files import CacheFiles, FileStat, classify_key, valid_cache_id
from kdcache.service.ranges import ByteRange, parse_ranges
from kdcache.service.store import JobStore

__all__ = [
    "INLINE_BYTES",
    "LOOP_BYTES",
    "ShardGate",
    "body_response",
    "ranges_response",
    "respond",
    "store_response",
]

INLINE_BYTES = 16 << 20
LOOP_BYTES = 4 << 20  # read on the event loop: ~1 ms from the page cache, little more from NVMe


class _WouldWait(Exception):
    """Serving would wait on the database, a remote store or a large read: use a thread."""


async def respond(serve: Callable[..., Response], *args: Any, **kw: Any) -> Response:
    """``serve(*args, **kw, wait=...)`` on the event loop with ``wait=False`` when it needs
    nothing slow, else in the thread pool with ``wait=True``."""
    try:
        return serve(*args, **kw, wait=False)
    except _WouldWait:
        return await run_in_threadpool(lambda: serve(*args, **kw, wait=True))


def _etag_matches(header: str, etag: str) -> bool:
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


def _media_type(key: str) -> str:
    return "application/json" if key.endswith(".json") else "application/octet-stream"


class ShardGate:
    """Which keys of one cache may be served, asking the database once per cache and shard.

    ``wait=False``: raise :class:`_WouldWait` rather than query the database or a remote store.
    """

    def __init__(
        self, files: CacheFiles, store: JobStore, cache_id: str, *, wait: bool = True
    ) -> None:
        self.files, self.store, self.cache_id, self.wait = files, store, cache_id, wait
        if not valid_cache_id(cache_id):
            raise NotFound(f"no cache {cache_id!r}")
        if not wait and not (files.local and store.caches.known(cache_id)):
            raise _WouldWait
        if not store.caches.exists(cache_id):
            raise NotFound(f"no cache {cache_id!r}")
        self._done: dict[int, bool] = {}
        self._manifest = files.manifest(cache_id)
        self._dims = files.dims(cache_id)

    def check(self, key: str) -> FileStat:
        """The key's stat when it may be served; NotFound otherwise (never says why it is
        hidden beyond an incomplete shard)."""
        kind = classify_key(key, self._manifest, self._dims)
        missing = NotFound(f"no key {key!r} in cache {self.cache_id}")
        if kind is None:
            raise missing
        if kind.shard is not None:
            if not self.wait and not self.store.caches.known(self.cache_id, kind.shard):
                raise _WouldWait
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


# (key, its stat, bytes before, start, length, bytes after): one part of a body
_Part = tuple[str, FileStat, bytes, int, int, bytes]


def _body_bytes(parts: Iterable[_Part]) -> int:
    return sum(len(b) + n + len(a) for _, _, b, _, n, a in parts)


def _read_body(files: CacheFiles, cache_id: str, parts: list[_Part], total: int) -> memoryview:
    """The whole body in one buffer: the separators copied in, the objects read into place."""
    body = memoryview(bytearray(total))
    reads: dict[str, tuple[FileStat, list[tuple[int, memoryview]]]] = {}
    at = 0
    for key, st, before, start, length, after in parts:
        body[at : at + len(before)] = before
        at += len(before)
        reads.setdefault(key, (st, []))[1].append((start, body[at : at + length]))
        at += length
        body[at : at + len(after)] = after
        at += len(after)
    for key, (st, into) in reads.items():
        try:
            got = files.read_into(cache_id, key, into, st)
        except FileNotFoundError:
            got = -1
        if got != sum(len(out) for _, out in into):
            # the object shrank or went after its stat: never send a short body
            raise NotFound(f"{key!r} in cache {cache_id} changed while it was read")
    return body


def body_response(
    files: CacheFiles,
    cache_id: str,
    parts: Iterable[_Part],
    *,
    status_code: int,
    headers: dict[str, str],
    media_type: str,
    wait: bool = True,
) -> Response:
    """A response whose body is, per part ``(key, stat, before, start, length, after)``: the
    bytes ``before``, ``length`` bytes of ``key`` from ``start``, then ``after``.

    Read here into one buffer when the body is small, else streamed in blocks.
    """
    parts = list(parts)
    total = _body_bytes(parts)
    if not wait and total > LOOP_BYTES:
        raise _WouldWait
    headers = {**headers, "Content-Length": str(total)}
    if total <= INLINE_BYTES:
        body = _read_body(files, cache_id, parts, total)
        return Response(body, status_code=status_code, headers=headers, media_type=media_type)

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
    wait: bool = True,
) -> Response:
    """200, 206 (one range, or several as multipart/byteranges) or 304 for one key."""
    st = ShardGate(files, store, cache_id, wait=wait).check(key)
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
        files, cache_id, parts, status_code=status, headers=headers, media_type=media, wait=wait
    )


def ranges_response(
    files: CacheFiles,
    store: JobStore,
    cache_id: str,
    request: RangeReadRequest,
    *,
    wait: bool = True,
) -> Response:
    """The byte ranges of ``request``, concatenated in its order (lengths in a header).

    Every key is checked as a single GET would be (404 for a key not served, an incomplete
    shard's included); a range past an object's end is 416 naming the key, so a short
    (truncated) object is never mistaken for its first bytes.
    """
    gate = ShardGate(files, store, cache_id, wait=wait)
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
        wait=wait,
    )
