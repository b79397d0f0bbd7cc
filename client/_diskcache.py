"""A local disk cache of whole remote objects (Zarr shard files) under a size cap.

Layout under ``root``::

    objects/<namespace>/<key>      complete objects; the mtime is the last use (LRU order)
    tmp/<pid>-<uuid>               downloads in flight; renamed into objects/ when complete
    pins/<digest>/<pid>-<token>    one file per process that holds an object in use
    lock                           flock'ed while evicting or recovering

Objects are written to ``tmp/`` and renamed, so a reader never sees half an object. Eviction
removes least-recently-used objects until the total is under the cap and never removes one that a
live process has pinned. Several processes (DDP ranks, DataLoader workers) may share one ``root``;
files left by a process that died (temp files, pins) are removed by :meth:`DiskCache.recover`,
which runs when a cache is opened.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

__all__ = ["DiskCache"]

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


class DiskCache:
    """Whole objects on local disk keyed by ``namespace/key``; total size kept <= ``limit_bytes``.

    ``namespace`` separates caches (the kdcache cache id). Thread-safe; process-safe on one host.
    """

    def __init__(self, root: str | os.PathLike[str], limit_bytes: int, namespace: str) -> None:
        if limit_bytes < 1:
            raise ValueError(f"cache_limit_bytes must be positive; got {limit_bytes}")
        self.root = Path(root).absolute()
        self.limit_bytes = int(limit_bytes)
        self.namespace = namespace
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._pins = self.root / "pins"
        for d in (self._objects / namespace, self._tmp, self._pins):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._token = uuid.uuid4().hex[:12]
        self.recover()

    def path(self, key: str) -> Path:
        return self._objects / self.namespace / key

    def _pin_dir(self, path: Path) -> Path:
        rel = path.relative_to(self._objects).as_posix()
        return self._pins / hashlib.sha1(rel.encode()).hexdigest()[:24]

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        with open(self.root / "lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def get(self, key: str) -> Path | None:
        """The local file of ``key`` if cached (and mark it used), else None."""
        path = self.path(key)
        try:
            os.utime(path)
        except FileNotFoundError:
            return None
        return path

    def put(self, key: str, data: bytes) -> Path:
        """Store ``data`` as ``key`` atomically, then evict down to the cap."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / f"{os.getpid()}-{uuid.uuid4().hex}"
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.evict(keep=path)
        return path

    def fetch(self, key: str, download: Callable[[], bytes]) -> Path:
        """The local file of ``key``, downloading it first when it is not cached."""
        return self.get(key) or self.put(key, download())

    def pin(self, keys: Iterable[str]) -> None:
        """Mark objects in use by this process: eviction skips them until :meth:`unpin`."""
        # Under the flock, so an eviction never runs between its in-use check and its unlink.
        with self._lock, self._flock():
            for key in keys:
                n = self._held.get(key, 0)
                if n == 0:
                    d = self._pin_dir(self.path(key))
                    d.mkdir(parents=True, exist_ok=True)
                    (d / f"{os.getpid()}-{self._token}").touch()
                self._held[key] = n + 1

    def unpin(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                n = self._held.get(key, 0) - 1
                if n > 0:
                    self._held[key] = n
                    continue
                self._held.pop(key, None)
                pin = self._pin_dir(self.path(key)) / f"{os.getpid()}-{self._token}"
                pin.unlink(missing_ok=True)

    @contextlib.contextmanager
    def pinned(self, keys: Iterable[str]) -> Iterator[None]:
        held = list(keys)
        self.pin(held)
        try:
            yield
        finally:
            self.unpin(held)

    def _in_use(self, path: Path) -> bool:
        d = self._pin_dir(path)
        if not d.is_dir():
            return False
        live = False
        for pin in d.iterdir():
            pid = _owner_pid(pin.name)
            if pid is not None and _pid_alive(pid):
                live = True
            else:
                pin.unlink(missing_ok=True)
        return live

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self._objects.rglob("*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if p.is_file():
                out.append((st.st_mtime, st.st_size, p))
        return out

    def usage(self) -> int:
        """Bytes of complete objects under the root (every namespace)."""
        return sum(size for _, size, _ in self._entries())

    def evict(self, keep: Path | None = None) -> int:
        """Remove least-recently-used unpinned objects until under the cap; returns bytes freed.

        ``keep`` (the object just stored, about to be read) is never removed either.
        """
        with self._flock():
            entries = sorted(self._entries(), key=lambda e: e[0])
            total = sum(size for _, size, _ in entries)
            freed = 0
            for _, size, path in entries:
                if total - freed <= self.limit_bytes:
                    break
                if path == keep or self._in_use(path):
                    continue
                path.unlink(missing_ok=True)
                freed += size
        if total - freed > self.limit_bytes:
            log.warning(
                "disk cache %s holds %d bytes, over its cap of %d, because every object left is "
                "in use; raise cache_limit_bytes above one shuffle window of shards",
                self.root,
                total - freed,
                self.limit_bytes,
            )
        return freed

    def recover(self) -> int:
        """Remove what dead processes left (temp files, pins), then evict; returns files removed."""
        removed = 0
        with self._flock():
            for tmp in self._tmp.iterdir():
                pid = _owner_pid(tmp.name)
                if pid is None or not _pid_alive(pid):
                    tmp.unlink(missing_ok=True)
                    removed += 1
            for d in self._pins.iterdir():
                for pin in d.iterdir():
                    pid = _owner_pid(pin.name)
                    if pid is None or not _pid_alive(pid):
                        pin.unlink(missing_ok=True)
                        removed += 1
                with contextlib.suppress(OSError):
                    d.rmdir()
        if removed:
            log.info("disk cache %s: removed %d stale files of dead processes", self.root, removed)
        self.evict()
        return removed
