"""The service's own errors, and the one place errors become HTTP responses.

Every error response has the body ``{"error": {"code", "message", "field"?, "problems"?}}``::

    KDCacheError (kdcache.core.errors)
    ├── SpecError                  422 invalid_spec, ``problems`` lists every problem
    ├── CacheNotFoundError         404 not_found
    ├── ShardIncompleteError       404 not_found
    ├── ManifestMismatchError      409 conflict
    ├── other core errors          422 (code from the class)
    ├── SchemaVersionError         refuses start-up; never an HTTP response
    └── ServiceError               its own status and code
        ├── Unauthorized           401 unauthorized (missing or malformed Authorization)
        ├── Forbidden              403 forbidden (wrong token)
        ├── NotFound               404 not_found
        ├── Conflict               409 conflict | lease_lost | job_cancelled
        ├── PayloadTooLarge        413 payload_too_large
        ├── RangeNotSatisfiable    416 range_not_satisfiable
        └── Unprocessable          422 invalid_request | invalid_record | unsupported

Request validation errors are 422 ``invalid_request``; a locked or unreachable database is 503
``unavailable`` with ``Retry-After``; anything else is 500 ``internal`` (logged, no details).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdcache.core.errors import (
    CacheFormatError,
    CacheNotFoundError,
    DatasetError,
    KDCacheError,
    ManifestMismatchError,
    ShardIncompleteError,
    SpecError,
    TeacherError,
)

__all__ = [
    "Conflict",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "RangeNotSatisfiable",
    "SchemaVersionError",
    "ServiceError",
    "Unauthorized",
    "Unprocessable",
    "error_body",
    "install_error_handlers",
]

log = logging.getLogger(__name__)


class SchemaVersionError(KDCacheError, RuntimeError):
    """The job database's schema is not one this kdcache can use."""


class ServiceError(KDCacheError):
    """An error with an HTTP status; ``code`` is the machine-readable part of the body."""

    status_code = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or type(self).code
        self.field = field
        self.headers = dict(headers or {})


class Unauthorized(ServiceError):
    """No bearer token, or a malformed Authorization header."""

    status_code, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
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

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message, headers={"Content-Range": f"bytes */{size}"})


class Unprocessable(ServiceError, ValueError):
    """A well-formed request whose content the service cannot act on."""

    status_code, code = 422, "invalid_request"


def error_body(
    code: str, message: str, field: str | None = None, problems: Sequence[Any] | None = None
) -> dict[str, Any]:
    """The JSON body of every error response."""
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    if problems is not None:
        err["problems"] = list(problems)
    return {"error": err}


def _json(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> Any:
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


_CORE: dict[type[KDCacheError], tuple[int, str]] = {
    CacheNotFoundError: (404, "not_found"),
    ShardIncompleteError: (404, "not_found"),
    ManifestMismatchError: (409, "conflict"),
    CacheFormatError: (422, "invalid_cache"),
    DatasetError: (422, "invalid_dataset"),
    TeacherError: (422, "invalid_teacher"),
}


def _loc_field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "request"


async def _on_kdcache_error(_request: Request, exc: Exception) -> Any:
    if isinstance(exc, ServiceError):
        return _json(
            exc.status_code, error_body(exc.code, exc.message, exc.field), headers=exc.headers
        )
    if isinstance(exc, SpecError):
        problems = [{"field": p.field, "message": p.message} for p in exc.problems]
        field = exc.problems[0].field if exc.problems else None
        return _json(422, error_body("invalid_spec", str(exc).replace("\n", "; "), field, problems))
    status, code = next(
        (v for k, v in _CORE.items() if isinstance(exc, k)), (422, "invalid_request")
    )
    return _json(status, error_body(code, str(exc)))


async def _on_validation_error(_request: Request, exc: Exception) -> Any:
    if not isinstance(exc, RequestValidationError):  # registered for this class only
        raise exc
    problems = [
        {"field": _loc_field(e.get("loc", ())), "message": str(e.get("msg", "invalid"))}
        for e in exc.errors()
    ]
    message = "; ".join(f"{p['field']}: {p['message']}" for p in problems) or "invalid request"
    field = problems[0]["field"] if problems else None
    return _json(422, error_body("invalid_request", message, field, problems))


async def _on_http_error(_request: Request, exc: Exception) -> Any:
    if not isinstance(exc, StarletteHTTPException):  # registered for this class only
        raise exc
    if exc.status_code == 400:
        # FastAPI's "error parsing the body" (e.g. not UTF-8): as invalid as malformed JSON (422).
        return _json(422, error_body("invalid_request", f"unreadable body: {exc.detail}", "body"))
    codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    code = codes.get(exc.status_code, "http_error")
    return _json(exc.status_code, error_body(code, str(exc.detail)), headers=exc.headers)


async def _on_db_unavailable(_request: Request, exc: Exception) -> Any:
    log.warning("job database unavailable: %s", exc)
    return _json(
        503,
        error_body("unavailable", "the job database is busy or unreachable; retry"),
        headers={"Retry-After": "1"},
    )


async def _on_unexpected(_request: Request, exc: Exception) -> Any:
    log.error("unhandled error", exc_info=exc)
    return _json(500, error_body("internal", "internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the service can raise to its status code and JSON body."""
    app.add_exception_handler(KDCacheError, _on_kdcache_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(OperationalError, _on_db_unavailable)
    app.add_exception_handler(Exception, _on_unexpected)
