"""Bearer-token checks for the three route classes: admin, worker and read.

A class whose token is unset is open. The admin token is accepted wherever the worker or read
token is. A missing or malformed ``Authorization`` header is 401, a wrong token 403.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, params
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kdcache.core.errors import Forbidden, Unauthorized
from kdcache.service.deps import SettingsDep
from kdcache.service.settings import RouteClass, Settings

__all__ = ["TOKEN_COOKIE", "AdminAuth", "ReadAuth", "WorkerAuth", "check_token"]

TOKEN_COOKIE = "kdcache_token"
"""Read routes also take the token from this cookie: the dashboard's browser sets it."""

_bearer = HTTPBearer(
    auto_error=False,
    description="KDCACHE_ADMIN_TOKEN, KDCACHE_WORKER_TOKEN or KDCACHE_READ_TOKEN, by route",
)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def check_token(settings: Settings, route_class: RouteClass, given: str | None) -> None:
    """Raise unless ``given`` opens ``route_class`` (always passes for an open class)."""
    want = settings.token(route_class)
    if want is None:
        return
    if not given:
        raise Unauthorized(f"this route needs 'Authorization: Bearer <{route_class} token>'")
    accepted = {want, settings.token("admin")} - {None}
    if not any(hmac.compare_digest(given.encode(), t.encode()) for t in accepted if t):
        raise Forbidden(f"the token does not grant {route_class} access")


async def _require_admin(settings: SettingsDep, creds: Credentials) -> None:
    check_token(settings, "admin", creds.credentials if creds else None)


async def _require_worker(settings: SettingsDep, creds: Credentials) -> None:
    check_token(settings, "worker", creds.credentials if creds else None)


async def _require_read(settings: SettingsDep, creds: Credentials, request: Request) -> None:
    given = creds.credentials if creds else request.cookies.get(TOKEN_COOKIE)
    check_token(settings, "read", given)


# The checks are ``async`` (they do no I/O) so that FastAPI does not hop to its thread pool.
AdminAuth: params.Depends = Depends(_require_admin)
WorkerAuth: params.Depends = Depends(_require_worker)
ReadAuth: params.Depends = Depends(_require_read)
