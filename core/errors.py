"""Every error kdcache raises on purpose: one tree, defined once, shared by every component.

Rooted at :class:`KDCacheError`. Each class also inherits the built-in that matches its meaning,
so callers that already catch ``ValueError`` or ``FileNotFoundError`` keep working::

    KDCacheError
    ├── SpecError(ValueError)                 a job spec is invalid; ``problems`` lists them all
    ├── TeacherError                          the teacher cannot be loaded or run
    ├── DatasetError(ValueError)              bad data (``row`` names the dataset row when known)
    ├── TemperatureNotCachedError(ValueError) a loss asked for a temperature the cache lacks
    ├── ManifestMismatchError(ValueError)     a cache is not what the run declared
    ├── CacheFormatError(ValueError)          a store is not a kdcache cache of a known version
    ├── CacheNotFoundError(FileNotFoundError) no cache at that path or URL
    ├── ShardIncompleteError(LookupError)     rows of a shard that is not complete yet
    ├── IntegrityError                        stored bytes do not match what was written
    ├── ResumeError(ValueError)               a saved dataset state cannot continue this run
    ├── SchemaVersionError(RuntimeError)      the job database's schema is not one we can use
    └── ServiceError                          an error with an HTTP status: raised by the service,
        │                                     decoded by every client (``status``, ``code``)
        ├── Unreachable(ConnectionError)      0    no answer (connection refused, timeout)
        ├── Unauthorized(PermissionError)     401  unauthorized
        ├── Forbidden(PermissionError)        403  forbidden
        ├── NotFound(LookupError)             404  not_found
        ├── Conflict                          409  conflict | lease_lost | job_cancelled
        ├── PayloadTooLarge                   413  payload_too_large
        ├── RangeNotSatisfiable               416  range_not_satisfiable
        ├── Unprocessable(ValueError)         422  invalid_request | invalid_record | unsupported
        ├── Unavailable                       503  unavailable (retry)
        └── InsufficientStorage(OSError)      507  insufficient_storage (the storage root is full)

The service maps these to HTTP responses in one handler (:mod:`kdcache.service.errors`);
:func:`error_from_response` turns a response back into the same class on the client side; the
CLI maps them to exit codes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CacheFormatError",
    "CacheNotFoundError",
    "Conflict",
    "DatasetError",
    "Forbidden",
    "InsufficientStorage",
    "IntegrityError",
    "KDCacheError",
    "ManifestMismatchError",
    "NotFound",
    "PayloadTooLarge",
    "Problem",
    "RangeNotSatisfiable",
    "ResumeError",
    "SchemaVersionError",
    "ServiceError",
    "ShardIncompleteError",
    "SpecError",
    "TeacherError",
    "TemperatureNotCachedError",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "Unreachable",
    "error_from_response",
]


class KDCacheError(Exception):
    """Root of every error kdcache raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem with a job spec or request: ``field`` is a dotted path (``outputs.topk``)."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class SpecError(KDCacheError, ValueError):
    """A job spec is invalid. ``problems`` holds every problem found, not just the first."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems) or "invalid job spec")


class TeacherError(KDCacheError):
    """The teacher cannot be loaded or run (missing directory, bad weights, bad callable)."""


class DatasetError(KDCacheError, ValueError):
    """The dataset holds something the teacher cannot run on; ``row`` is the dataset row,
    ``field`` the spec field at fault (``dataset.messages_field``) where one is."""

    def __init__(self, message: str, *, row: int | None = None, field: str | None = None) -> None:
        self.row = row
        self.field = field
        super().__init__(message)


class TemperatureNotCachedError(KDCacheError, ValueError):
    """A loss asked for the exact normaliser of a temperature the cache does not hold."""


class ManifestMismatchError(KDCacheError, ValueError):
    """A cache does not match what the caller declared (vocab, temperatures, layers, id)."""


class CacheFormatError(KDCacheError, ValueError):
    """A store is not a kdcache cache, or of a format version this code cannot read."""


class CacheNotFoundError(KDCacheError, FileNotFoundError):
    """No cache exists at the given path or URL."""


class ShardIncompleteError(KDCacheError, LookupError):
    """Rows were requested from a shard that has not been completed."""


class IntegrityError(KDCacheError):
    """Stored bytes of a completed shard do not match what was written (a corrupt or missing
    chunk, a checksum mismatch). The message names the shard and the store key."""


class ResumeError(KDCacheError, ValueError):
    """A saved dataset state cannot continue the same global order in this run."""


class SchemaVersionError(KDCacheError, RuntimeError):
    """The job database's schema is not one this kdcache can use."""


class ServiceError(KDCacheError):
    """An error with an HTTP status. The service raises it (one handler turns it into
    ``{"error": {"code", "message", "field"?}}``); clients get it back from
    :func:`error_from_response`. ``status`` is the HTTP status (0: no answer), ``code`` the
    machine-readable part, ``body`` the decoded answer when there was one."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status_code = status
        self.code = code or type(self).code
        self.field = field
        self.headers = dict(headers or {})
        self.body = body

    @property
    def status(self) -> int:
        return self.status_code


class Unreachable(ServiceError, ConnectionError):
    """The service did not answer (connection refused or reset, timeout)."""

    status_code, code = 0, "unreachable"


class Unauthorized(ServiceError, PermissionError):
    """No bearer token, or a malformed Authorization header."""

    status_code, code = 401, "unauthorized"

    def __init__(self, message: str, **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class Forbidden(ServiceError, PermissionError):
    """A bearer token that does not open this route."""

    status_code, code = 403, "forbidden"


class NotFound(ServiceError, LookupError):
    """No such job, lease, cache or key."""

    status_code, code = 404, "not_found"


class Conflict(ServiceError):
    """The request contradicts the current state (a lost lease, a cancelled job)."""

    status_code, code = 409, "conflict"


class PayloadTooLarge(ServiceError):
    """A request body above ``KDCACHE_MAX_BODY_BYTES``."""

    status_code, code = 413, "payload_too_large"


class RangeNotSatisfiable(ServiceError):
    """A Range header that selects nothing of an object of ``size`` bytes (or is malformed)."""

    status_code, code = 416, "range_not_satisfiable"

    def __init__(self, message: str, size: int | None = None, **kw: Any) -> None:
        if size is not None:
            kw.setdefault("headers", {"Content-Range": f"bytes */{size}"})
        super().__init__(message, **kw)


class Unprocessable(ServiceError, ValueError):
    """A well-formed request whose content the service cannot act on."""

    status_code, code = 422, "invalid_request"


class Unavailable(ServiceError):
    """The service (or its database) is busy or down for a moment: retry."""

    status_code, code = 503, "unavailable"


class InsufficientStorage(ServiceError, OSError):
    """The storage root is full (ENOSPC): nothing was published."""

    status_code, code = 507, "insufficient_storage"


_BY_STATUS: dict[int, type[ServiceError]] = {
    cls.status_code: cls
    for cls in (
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PayloadTooLarge,
        RangeNotSatisfiable,
        Unprocessable,
        Unavailable,
        InsufficientStorage,
    )
}


def error_from_response(status: int, body: Any, what: str = "") -> KDCacheError:
    """The error a service answer stands for: the :class:`ServiceError` subclass of its status
    (``code``, ``field`` and ``body`` kept), or a :class:`SpecError` when it lists problems.

    ``what`` (e.g. ``"POST /v1/jobs"``) starts the message.
    """
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    code = str(err.get("code") or f"http_{status}")
    message = str(err.get("message") or (body if isinstance(body, str) else "") or "no message")
    problems = err.get("problems")
    if status == 422 and isinstance(problems, list) and problems:
        return SpecError(
            Problem(str(p.get("field", "spec")), str(p.get("message", "")))
            for p in problems
            if isinstance(p, dict)
        )
    cls = _BY_STATUS.get(status, ServiceError)
    text = f"{what}: {status} {code}: {message}" if what else f"{status} {code}: {message}"
    field = err.get("field")
    return cls(
        text[:2000],
        status=status,
        code=code,
        field=str(field) if field is not None else None,
        body=body,
    )
