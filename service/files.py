"""The raw files of caches under the storage root, and which keys may be served.

Served: every ``zarr.json`` (metadata), and the chunk keys and completion record of completed
shards only. A chunk key ``<array>/c/<i>/<j>...`` belongs to row-shard ``i``: every array is
sharded ``(rows_per_shard, *row_shape)``, so its first grid index is the shard. Nothing else is
served: no ``..``, no absolute keys, no dot-files (``.partial`` temp files), no other names.
A ``pca:R`` cache's basis (``hidden_pca/...`` and its record) is served with shard 0.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from kdcache.core.errors import CacheFormatError
from kdcache.core.format import MANIFEST_KEY, Manifest
from kdcache.core.hidden_basis import BASIS_RECORD_KEY
from kdcache.core.layout import CACHES_DIR, RECORDS_PREFIX, parse_chunk_key, parse_record_key
from kdcache.core.storage import is_remote

__all__ = [
    "BLOCK_BYTES",
    "CacheFiles",
    "FileStat",
    "KeyKind",
    "KeyDims",
    "classify_key",
    "key_dims",
    "valid_cache_id",
]

BLOCK_BYTES = 1 << 20
_PATHS_KEPT = 1 << 16
MAX_KEY_CHARS = 512
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
_CACHE_ID = re.compile(r"^[0-9a-f]{1,64}$")


def valid_cache_id(cache_id: str) -> bool:
    """True for a string shaped like a cache id (lowercase hex): safe as a path segment."""
    return bool(_CACHE_ID.match(cache_id))


@dataclass(frozen=True)
class KeyKind:
    """What a store key is: ``metadata`` (always served) or a shard's ``chunk`` / ``record``."""

    kind: Literal["metadata", "chunk", "record"]
    shard: int | None = None


def classify_key(
    key: str, manifest: dict[str, Any] | None, dims: KeyDims | None = None
) -> KeyKind | None:
    """The kind of ``key``, or None when it is never served (``dims``: the manifest's
    :func:`key_dims`, when the caller has them)."""
    if not key or len(key) > MAX_KEY_CHARS:
        return None
    parts = key.split("/")
    if not all(_SEGMENT.match(p) for p in parts):
        return None
    if parts[-1] == "zarr.json":
        return KeyKind("metadata")
    if key.startswith(RECORDS_PREFIX + "/"):
        shard = parse_record_key(key)
        return KeyKind("record", shard) if shard is not None else None
    if manifest is None:
        return None
    dims = dims if dims is not None else key_dims(manifest)
    if dims is None:
        return None
    if key == BASIS_RECORD_KEY or parse_chunk_key(key, dims.basis):
        return KeyKind("chunk", 0)  # a pca basis: fitted on the first rows, served with shard 0
    found = parse_chunk_key(key, dims.arrays)
    return KeyKind("chunk", found[1]) if found is not None else None


@dataclass(frozen=True)
class KeyDims:
    """Dimensions of a manifest's arrays and of its hidden-state bases, by name."""

    arrays: dict[str, int]
    basis: dict[str, int]


def key_dims(manifest: dict[str, Any] | None) -> KeyDims | None:
    """The :class:`KeyDims` of a manifest; None when there is none or it is malformed."""
    if manifest is None:
        return None
    try:
        m = Manifest.from_dict(manifest)
    except CacheFormatError:
        return None
    return KeyDims(
        {a.name: 1 + len(a.row_shape) for a in m.arrays()},
        {n: len(s) for n, s in m.basis_arrays()},
    )


@dataclass(frozen=True)
class FileStat:
    """Size, modification time and entity tag of one stored object (``path``: where a local
    one was found, so a read after the stat need not resolve it again)."""

    size: int
    mtime: float
    etag: str
    path: str = ""


class _Backend(Protocol):
    def stat(self, rel: str) -> FileStat | None: ...
    def read(self, rel: str, start: int, length: int, st: FileStat | None = None) -> bytes: ...
    def read_into(self, rel: str, reads: list[tuple[int, memoryview]], st: FileStat) -> int: ...
    def blocks(self, rel: str, start: int, length: int) -> Iterator[bytes]: ...


def _read_blocks(f: Any, start: int, length: int) -> Iterator[bytes]:
    f.seek(start)
    left = length
    while left > 0:
        block = f.read(min(BLOCK_BYTES, left))
        if not block:
            break
        left -= len(block)
        yield block


class _LocalBackend:
    def __init__(self, root: str) -> None:
        self.base = Path(root) / CACHES_DIR
        self._resolved: Path | None = None
        # rel -> its resolved path inside the root: resolving costs a lstat per path component,
        # most of a small request's file work, and served keys are read again and again
        self._paths: dict[str, str] = {}

    def _path(self, rel: str) -> str | None:
        found = self._paths.get(rel)
        if found is not None:
            return found
        try:
            path = (self.base / rel).resolve()
            if self._resolved is None and self.base.is_dir():
                self._resolved = self.base.resolve()
            base = self._resolved or self.base.resolve()
        except (OSError, RuntimeError, ValueError):  # e.g. a symlink loop
            return None
        # Defence in depth: the key rules already forbid '..'; symlinks must not lead out either.
        if not path.is_relative_to(base):
            return None
        if len(self._paths) >= _PATHS_KEPT:
            self._paths.clear()
        self._paths[rel] = found = str(path)
        return found

    def stat(self, rel: str) -> FileStat | None:
        path = self._path(rel)
        if path is None:
            return None
        try:
            # not following a last-component link: a resolved path that became one since
            st = os.stat(path, follow_symlinks=False)
        except (OSError, ValueError):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        tag = f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        return FileStat(st.st_size, st.st_mtime, tag, str(path))

    def read(self, rel: str, start: int, length: int, st: FileStat | None = None) -> bytes:
        path = st.path if st is not None and st.path else self._path(rel)
        if path is None:
            raise FileNotFoundError(rel)
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.pread(fd, length, start)
        finally:
            os.close(fd)

    def read_into(self, rel: str, reads: list[tuple[int, memoryview]], st: FileStat) -> int:
        path = st.path or self._path(rel)
        if path is None:  # as read(): never a path relative to the working directory
            raise FileNotFoundError(rel)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            for start, out in reads:
                while out:
                    n = os.preadv(fd, [out], start)
                    if n <= 0:
                        return got
                    got, start, out = got + n, start + n, out[n:]
            return got
        finally:
            os.close(fd)

    def blocks(self, rel: str, start: int, length: int) -> Iterator[bytes]:
        path = self._path(rel)
        if path is None:
            return
        with open(path, "rb") as f:
            yield from _read_blocks(f, start, length)


class _FsspecBackend:
    def __init__(self, root: str) -> None:
        import fsspec.core

        self.fs, path = fsspec.core.url_to_fs(root)
        self.base = f"{path.rstrip('/')}/{CACHES_DIR}"

    def stat(self, rel: str) -> FileStat | None:
        try:
            info = self.fs.info(f"{self.base}/{rel}")
        except (FileNotFoundError, OSError, ValueError):
            return None
        if info.get("type") not in ("file", None):
            return None
        size = int(info.get("size") or 0)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("created") or 0
        mtime = stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
        tag = str(info.get("ETag") or "").strip('"') or f"{size:x}-{int(mtime * 1e9):x}"
        return FileStat(size, mtime, f'"{tag}"')

    def read(self, rel: str, start: int, length: int, st: FileStat | None = None) -> bytes:
        data: bytes = self.fs.cat_file(f"{self.base}/{rel}", start=start, end=start + length)
        return data

    def read_into(self, rel: str, reads: list[tuple[int, memoryview]], st: FileStat) -> int:
        got = 0
        for start, out in reads:
            data = self.read(rel, start, len(out))
            out[: len(data)] = data
            got += len(data)
        return got

    def blocks(self, rel: str, start: int, length: int) -> Iterator[bytes]:
        with self.fs.open(f"{self.base}/{rel}", "rb") as f:
            yield from _read_blocks(f, start, length)


class CacheFiles:
    """Read access to the files of every cache under a storage root (local or fsspec URL)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.local = not is_remote(root)
        self._backend: _Backend = _LocalBackend(root) if self.local else _FsspecBackend(root)
        self._manifests: dict[str, dict[str, Any]] = {}
        self._dims: dict[str, KeyDims | None] = {}
        self._lock = threading.Lock()

    def stat(self, cache_id: str, key: str) -> FileStat | None:
        """The object's stat, or None when it does not exist (or the id is malformed)."""
        if not valid_cache_id(cache_id):
            return None
        return self._backend.stat(f"{cache_id}/{key}")

    def blocks(self, cache_id: str, key: str, start: int, length: int) -> Iterator[bytes]:
        """``length`` bytes from ``start``, in blocks of at most :data:`BLOCK_BYTES`."""
        return self._backend.blocks(f"{cache_id}/{key}", start, length)

    def read(
        self, cache_id: str, key: str, start: int, length: int, st: FileStat | None = None
    ) -> bytes:
        """``length`` bytes from ``start`` in one read (fewer when the object is shorter);
        ``st``: the object's :meth:`stat`, which saves finding it again."""
        return self._backend.read(f"{cache_id}/{key}", start, length, st)

    def read_into(
        self, cache_id: str, key: str, reads: list[tuple[int, memoryview]], st: FileStat
    ) -> int:
        """Fill each ``(start, out)`` of ``reads`` with the object's bytes from ``start``,
        opening it once; the bytes read in all (fewer than asked when the object is shorter)."""
        return self._backend.read_into(f"{cache_id}/{key}", reads, st)

    def dims(self, cache_id: str) -> KeyDims | None:
        """The :func:`key_dims` of the cache's manifest, worked out once."""
        found = self._dims.get(cache_id)
        if found is not None:
            return found
        manifest = self.manifest(cache_id)
        if manifest is None:
            return None
        found = key_dims(manifest)
        with self._lock:
            self._dims[cache_id] = found
        return found

    def manifest(self, cache_id: str) -> dict[str, Any] | None:
        """The kdcache manifest in the cache group's attributes; None before it exists.

        Cached once found: a cache's manifest never changes.
        """
        with self._lock:
            if cache_id in self._manifests:
                return self._manifests[cache_id]
        if self.stat(cache_id, "zarr.json") is None:
            return None
        try:
            raw = b"".join(self.blocks(cache_id, "zarr.json", 0, 1 << 24))
            found = json.loads(raw).get("attributes", {}).get(MANIFEST_KEY)
        except (OSError, ValueError, AttributeError):
            return None
        if not isinstance(found, dict):
            return None
        with self._lock:
            self._manifests[cache_id] = found
        return found
