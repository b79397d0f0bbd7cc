"""The one retry policy: which failures are worth another try, and how long to keep trying.

Built on tenacity (exponential backoff with jitter, a stop after so many seconds or tries, or
never). Every caller of the service and every remote read uses it: the worker's link (default:
retry for as long as the service is away), :class:`kdcache.client.CacheClient`, and reads of
remote caches (``TeacherCache``/``CacheDataset`` over HTTP or S3).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from kdcache.core.errors import KDCacheError, ServiceError

__all__ = ["RetryPolicy", "is_transient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_STATUS = frozenset({0, 408, 429, 500, 502, 503, 504})
_PERMANENT = (FileNotFoundError, PermissionError, KDCacheError, KeyError, TypeError, ValueError)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: no answer, a timeout, 408/429, or a 5xx other than 507 (storage full).

    Anything that says the request itself is wrong (4xx, a missing key, a bad value, a kdcache
    error other than a transient :class:`ServiceError`) is not.
    """
    if isinstance(err, ServiceError):
        return err.status in _TRANSIENT_STATUS
    if isinstance(err, _PERMANENT) or not isinstance(err, Exception):
        return False
    response = getattr(err, "response", None)  # httpx.HTTPStatusError keeps it there
    status = (
        getattr(err, "status", None)
        or getattr(err, "status_code", None)
        or getattr(response, "status_code", None)
    )
    if isinstance(status, int) and 400 <= status < 600:
        return status in _TRANSIENT_STATUS
    return True


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures with exponential backoff (``initial`` doubling to ``max_delay``,
    jittered) until ``seconds`` have passed or ``attempts`` tries were made; None = no limit.

    ``RetryPolicy(seconds=None)`` retries forever (a worker waiting out a service restart);
    ``RetryPolicy.none()`` tries once.
    """

    seconds: float | None = 60.0
    attempts: int | None = None
    initial: float = 0.5
    max_delay: float = 10.0

    @classmethod
    def none(cls) -> RetryPolicy:
        return cls(seconds=None, attempts=1)

    def _kwargs(self, what: str, interrupt: Sequence[threading.Event]) -> dict[str, Any]:
        stops: list[Any] = []
        if self.seconds is not None:
            stops.append(tenacity.stop_after_delay(self.seconds))
        if self.attempts is not None:
            stops.append(tenacity.stop_after_attempt(self.attempts))
        if interrupt:
            stops.append(lambda _state: any(e.is_set() for e in interrupt))
        stop = tenacity.stop_any(*stops) if stops else tenacity.stop_never

        def before_sleep(state: tenacity.RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome is not None else None
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "%s failed (%s: %s); try %d again in %.1fs",
                what,
                type(err).__name__,
                err,
                state.attempt_number + 1,
                delay,
            )

        return {
            "stop": stop,
            "wait": tenacity.wait_exponential_jitter(
                initial=self.initial, max=self.max_delay, jitter=self.initial
            ),
            "retry": tenacity.retry_if_exception(is_transient),
            "before_sleep": before_sleep,
            "reraise": True,
        }

    def call(
        self, fn: Callable[[], T], what: str, *, interrupt: Sequence[threading.Event] = ()
    ) -> T:
        """``fn()``, retried on transient errors; the last error propagates.

        Any of ``interrupt`` (set from another thread) ends the waiting early.
        """
        kw = self._kwargs(what, interrupt)
        if interrupt:
            kw["sleep"] = lambda seconds: _sleep_unless(seconds, interrupt)
        return tenacity.Retrying(**kw)(fn)

    async def acall(self, fn: Callable[[], Awaitable[T]], what: str) -> T:
        """The async twin of :meth:`call`."""

        async def attempt() -> T:
            return await fn()

        retrying = tenacity.AsyncRetrying(**self._kwargs(what, ()))
        return await retrying(attempt)


def _sleep_unless(seconds: float, events: Sequence[threading.Event]) -> None:
    end = time.monotonic() + seconds
    while not any(e.is_set() for e in events) and (left := end - time.monotonic()) > 0:
        events[0].wait(min(left, 0.2))
