"""File hashes remembered by what ``stat`` says, so weights are hashed once per host, not per run.

Hashing a 140 GB teacher takes minutes; ``kdcache run``, ``submit`` and every worker start would
each pay it. An entry keeps a file's SHA-256 with its (path, size, mtime_ns, ctime_ns, inode,
device): while all six are unchanged the file is not read again. A rewrite changes mtime and
ctime (ctime even when a tool restores mtime), a replacement changes the inode, so a changed
file is always hashed afresh and a changed teacher still changes the cache id.

Entries are one small JSON file per path under ``$KDCACHE_FINGERPRINT_CACHE`` (default
``$XDG_CACHE_HOME/kdcache/fingerprints``, i.e. ``~/.cache/...``; ``off`` disables). Each is written
to a temporary file and renamed into place, so concurrent processes never read half an entry;
an unreadable or stale entry only means hashing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "cached_hash"]

log = logging.getLogger(__name__)

ENV = "KDCACHE_FINGERPRINT_CACHE"


def cache_dir() -> Path | None:
    """Where entries live, or None when remembering is switched off."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false") else Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kdcache" / "fingerprints"


def _stat_key(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
    }


def cached_hash(path: str | os.PathLike[str], compute: Callable[[Path], str]) -> str:
    """``compute(path)``, or the digest remembered for this exact file version."""
    p = Path(path).resolve()
    folder = cache_dir()
    if folder is None:
        return compute(p)
    key = _stat_key(p)
    entry = folder / (hashlib.sha256(str(p).encode()).hexdigest()[:40] + ".json")
    try:
        data = json.loads(entry.read_text())
        if data.get("key") == key and isinstance(data.get("sha256"), str):
            return str(data["sha256"])
    except (OSError, ValueError):
        pass  # no entry yet, or a broken one: hash and (re)write it
    digest = compute(p)
    if _stat_key(p) != key:  # the file changed while being read: remember nothing
        return digest
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "sha256": digest}))
        os.replace(tmp, entry)
    except OSError as err:  # a read-only home must not stop a run
        log.debug("cannot remember the hash of %s in %s: %s", p, folder, err)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is unusable: there is nothing to clean up
    return digest
