"""Read ahead in a background thread, holding at most a bounded number of bytes.

The producer is an iterator whose items are decoded blocks of rows; the thread runs it while the
consumer (the training loop) works on earlier items. Zarr and Blosc release the GIL while they
read and decode, so the two overlap.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Prefetcher"]

T = TypeVar("T")

_END = object()


class Prefetcher(Generic[T]):
    """Iterate ``source`` in a daemon thread; ``next()`` returns its items in order.

    The thread starts the next item only while fewer than ``max_bytes`` (as measured by
    ``size_of``) are queued, so memory stays below ``max_bytes`` + one item being read + the
    item being consumed. An exception in the producer is raised by the consumer's ``next()``.
    Call :meth:`close` (or exhaust it) to stop the thread.
    """

    def __init__(
        self,
        source: Iterator[T],
        size_of: Callable[[T], int],
        max_bytes: int,
        name: str = "kdcache-prefetch",
    ) -> None:
        self._source = source
        self._size_of = size_of
        self._max_bytes = max(1, int(max_bytes))
        self._queue: collections.deque[tuple[object, int]] = collections.deque()
        self._queued = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def _put(self, item: object, size: int) -> None:
        with self._cond:
            self._queue.append((item, size))
            self._queued += size
            self._cond.notify_all()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop or self._queued < self._max_bytes)
                    if self._stop:
                        return
                item = next(self._source, _END)
                if item is _END:
                    break
                self._put(item, self._size_of(item))  # type: ignore[arg-type]
        except BaseException as err:  # handed to the consumer, which re-raises it
            self._put(err, 0)
            return
        self._put(_END, 0)

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        with self._cond:
            self._cond.wait_for(lambda: bool(self._queue))
            item, size = self._queue.popleft()
            self._queued -= size
            self._cond.notify_all()
        if item is _END:
            self._queue.appendleft((_END, 0))
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.appendleft((_END, 0))
            raise item
        return item  # type: ignore[return-value]

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread after the item it is reading; drop what is queued."""
        with self._cond:
            self._stop = True
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        close = getattr(self._source, "close", None)
        if close is not None and not self._thread.is_alive():
            close()
