"""Where caches live: a local directory or an fsspec URL (``s3://bucket/prefix``, ``http(s)://``).

A :class:`Storage` is a cache's root. It gives the Zarr store for the arrays and small atomic
files for what must live beside them (shard completion records), which Zarr never sees.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import zarr.storage

__all__ = ["FsspecStorage", "LocalStorage", "Storage", "is_remote", "open_storage"]


@runtime_checkable
class Storage(Protocol):
    """The root of one cache (or of many: ``child`` descends)."""

    url: str

    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def size(self, key: str) -> int: ...
    def child(self, sub: str) -> Storage: ...
    def zarr_store(self, read_only: bool) -> zarr.storage.StoreLike: ...


def is_remote(url: str | os.PathLike[str]) -> bool:
    """True for URLs that fsspec opens (``s3://``, ``http://`` ...), False for local paths."""
    s = str(url)
    return "://" in s and not s.startswith("file://")


class LocalStorage:
    """A directory on a local or shared file system; writes are atomic (temp file + rename)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(str(root).removeprefix("file://")).absolute()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def read_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).exists()

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def child(self, sub: str) -> LocalStorage:
        return LocalStorage(self.root / sub)

    def zarr_store(self, read_only: bool) -> zarr.storage.LocalStore:
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)
        return zarr.storage.LocalStore(self.root, read_only=read_only)


class FsspecStorage:
    """Object storage or HTTP through fsspec; each object is written whole (atomic on S3)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec.core

        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(self.url, **self.storage_options)

    def _key(self, key: str) -> str:
        return f"{self.path}/{key}"

    def read_bytes(self, key: str) -> bytes:
        data: bytes = self.fs.cat_file(self._key(key))
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._key(key), data)

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._key(key)))

    def list(self, prefix: str) -> list[str]:
        try:
            found = self.fs.find(self._key(prefix))
        except FileNotFoundError:
            return []
        root = self.fs._strip_protocol(self.path).rstrip("/") + "/"
        return sorted(str(p)[len(root) :] if str(p).startswith(root) else str(p) for p in found)

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._key(key))
        except FileNotFoundError:
            pass

    def size(self, key: str) -> int:
        return int(self.fs.size(self._key(key)))

    def child(self, sub: str) -> FsspecStorage:
        return FsspecStorage(f"{self.url}/{sub}", self.storage_options)

    def zarr_store(self, read_only: bool) -> zarr.storage.FsspecStore:
        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=read_only
        )


def open_storage(
    url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Storage:
    """A :class:`Storage` for a local path or an fsspec URL."""
    if is_remote(url):
        return FsspecStorage(str(url), storage_options)
    return LocalStorage(url)
