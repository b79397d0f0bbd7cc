"""What every router shares: declared error responses for OpenAPI."""

from __future__ import annotations

from typing import Any

from kdcache.core.wire import ErrorBody

__all__ = ["error_responses"]

_DESCRIPTIONS = {
    401: "missing or malformed Authorization header",
    403: "the bearer token does not grant this route",
    404: "not found",
    409: "conflicts with the current state (see error.code)",
    413: "request body too large",
    416: "range not satisfiable",
    422: "invalid request (error.field names the field)",
    503: "the job database is busy or unreachable; retry",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for these codes (plus 422 and 503), all ErrorBody."""
    every = sorted({*codes, 422, 503})
    return {c: {"model": ErrorBody, "description": _DESCRIPTIONS[c]} for c in every}
