"""The local disk cache of remote shard objects: size cap, LRU order, pins that eviction never
crosses (in this process or another), and recovery from what a crashed process left behind."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdcache.client._diskcache import DiskCache


def _put(cache: DiskCache, key: str, size: int = 100) -> None:
    cache.put(key, bytes([len(key)]) * size)
    time.sleep(0.01)  # distinct mtimes: the LRU order is by last use


def test_cap_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, limit_bytes=250, namespace="c1")
    _put(cache, "a/c/0")
    _put(cache, "b/c/0")
    assert cache.get("a/c/0") is not None  # a is now more recent than b
    time.sleep(0.01)
    _put(cache, "x/c/0")
    assert cache.get("b/c/0") is None, "b was least recently used"
    assert cache.get("a/c/0") is not None and cache.get("x/c/0") is not None
    assert cache.usage() == 200 <= cache.limit_bytes
    assert cache.path("a/c/0").read_bytes() == bytes([5]) * 100


def test_pinned_objects_are_never_evicted(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cache = DiskCache(tmp_path, limit_bytes=150, namespace="c1")
    _put(cache, "a")
    with cache.pinned(["a"]), caplog.at_level(logging.WARNING):
        _put(cache, "b")  # over the cap: a is in use and b was just stored, so both stay
        assert cache.get("a") is not None and cache.get("b") is not None
        assert "in use" in caplog.text and cache.usage() == 200
        _put(cache, "c")  # b goes, a stays although it is the least recently used
        assert cache.get("a") is not None and cache.get("b") is None
    _put(cache, "d")  # a is free again and least recently used
    assert cache.get("a") is None and cache.get("c") is None
    assert cache.usage() == 100


def test_put_is_atomic_and_namespaced(tmp_path: Path) -> None:
    one = DiskCache(tmp_path, limit_bytes=10_000, namespace="one")
    two = DiskCache(tmp_path, limit_bytes=10_000, namespace="two")
    one.put("k", b"first")
    assert two.get("k") is None
    assert list((tmp_path / "tmp").iterdir()) == []
    assert one.fetch(
        "k", lambda: pytest.fail("must not download a cached object")
    ).read_bytes() == (b"first")
    assert two.fetch("k", lambda: b"second").read_bytes() == b"second"


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from kdcache.client._diskcache import DiskCache
    cache = DiskCache(sys.argv[1], limit_bytes=10_000, namespace="c1")
    cache.put("held", b"h" * 100)
    cache.pin(["held"])
    (cache.root / "tmp" / f"{os.getpid()}-halfdownloaded").write_bytes(b"partial")
    print("ready", flush=True)
    if sys.argv[2] == "crash":
        os._exit(1)
    time.sleep(60)
    """
)


def test_pins_of_other_live_processes_are_respected(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), "live"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        cache = DiskCache(tmp_path, limit_bytes=150, namespace="c1")
        assert len(list((tmp_path / "tmp").iterdir())) == 1, "a live download is not stale"
        _put(cache, "new1")
        _put(cache, "new2")
        assert cache.get("held") is not None, "another process holds it"
        assert cache.get("new1") is None and cache.get("new2") is not None
    finally:
        child.kill()
        child.wait(10)
    cache = DiskCache(tmp_path, limit_bytes=150, namespace="c1")  # the holder is dead
    assert cache.get("held") is None and cache.get("new2") is not None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_recovery_after_a_crash(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), "crash"], capture_output=True, timeout=60
    )
    assert done.returncode == 1 and b"ready" in done.stdout
    assert len(list((tmp_path / "tmp").iterdir())) == 1
    assert any((tmp_path / "pins").rglob("*-*"))
    cache = DiskCache(tmp_path, limit_bytes=10_000, namespace="c1")
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not any(p.is_file() for p in (tmp_path / "pins").rglob("*"))
    assert cache.get("held") is not None, "complete objects survive the crash"
    assert cache.path("held").read_bytes() == b"h" * 100
