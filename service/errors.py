"""The one place errors become HTTP responses.

The classes are :mod:`kdcache.core.errors`', so a client decodes an answer back into the class
the service raised. Every error response has the
body ``{"error": {"code", "message", "field"?, "problems"?}}``::

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
        ├── Unprocessable          422 invalid_request | invalid_record | unsupported
        └── InsufficientStorage    507 insufficient_storage (also any OSError ENOSPC)

Request validation errors are 422 ``invalid_request``; a locked or unreachable database is 503
``unavailable`` with ``Retry-After``; anything else is 500 ``internal`` (logged, no details).
"""

from __future__ import annotations

import errno
import json
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
    InsufficientStorage,
    KDCacheError,
    ManifestMismatchError,
    ServiceError,
    ShardIncompleteError,
    SpecError,
    TeacherError,
)

__all__ = ["error_body", "install_error_handlers"]

log = logging.getLogger(__name__)


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


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII escaped: a message quoting odd input (a lone surrogate) still
    encodes, so an error answer can never become a 500 itself."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _json(status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None) -> Any:
    return _AsciiJSON(body, status_code=status, headers=dict(headers or {}))


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
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        log.error("storage full: %s", exc)
        return _json(507, error_body(InsufficientStorage.code, f"storage full: {exc.strerror}"))
    log.error("unhandled error", exc_info=exc)
    return _json(500, error_body("internal", "internal server error"))


def install_error_handlers(app: FastAPI) -> None:
    """Map every error the service can raise to its status code and JSON body."""
    app.add_exception_handler(KDCacheError, _on_kdcache_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(OperationalError, _on_db_unavailable)
    app.add_exception_handler(Exception, _on_unexpected)
