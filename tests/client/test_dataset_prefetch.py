"""The read-ahead thread: order kept, a bound in bytes, errors handed over, and a clean stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from itertools import islice

import pytest

from kdcache.client._prefetch import Prefetcher
from kdcache.client.dataset import CacheDataset


def _settle(read: Callable[[], int], timeout: float = 2.0) -> int:
    """Wait until ``read()`` stops changing (the producer blocked), bounded by ``timeout``."""
    last, deadline = read(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now == last:
            return now
        last = now
    return last


def test_items_in_order_and_byte_bound() -> None:
    produced: list[int] = []

    def source() -> Iterator[int]:
        for i in range(10):
            produced.append(i)
            yield i

    pf = Prefetcher(source(), size_of=lambda _: 10, max_bytes=25)
    try:
        assert _settle(lambda: len(produced)) == 3, "may start an item only while < 25 B queued"
        assert pf.queued_bytes == 30
        assert next(pf) == 0
        assert _settle(lambda: len(produced)) == 4
        assert list(pf) == list(range(1, 10))
    finally:
        pf.close()


def test_producer_error_reaches_consumer_in_place() -> None:
    def source() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("disk went away")

    pf = Prefetcher(source(), size_of=lambda _: 1, max_bytes=100)
    assert next(pf) == 1 and next(pf) == 2
    with pytest.raises(OSError, match="disk went away"):
        next(pf)
    with pytest.raises(StopIteration):
        next(pf)
    pf.close()


def test_close_stops_a_blocked_producer() -> None:
    def endless() -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1

    pf = Prefetcher(endless(), size_of=lambda _: 1, max_bytes=4, name="kdcache-test-close")
    assert next(pf) == 0
    pf.close(timeout=5)
    assert not any(t.name == "kdcache-test-close" for t in threading.enumerate())


def test_dataset_iterator_close_stops_its_thread(cache_dir37: str) -> None:
    ds = CacheDataset(cache_dir37, shuffle_window=8, prefetch_bytes=1)
    it = iter(ds)
    assert len(list(islice(it, 3))) == 3
    assert any(t.name == "kdcache-prefetch" for t in threading.enumerate())
    it.close()
    assert not any(t.name == "kdcache-prefetch" for t in threading.enumerate())
