"""The dashboard at ``/``, the JSON it polls, each cache's report, and offline ``/docs``.

A browser cannot add an ``Authorization`` header to a page load, so when reads need a token the
dashboard takes it once as ``/?token=...``, stores it in an HttpOnly, SameSite=Strict cookie and
redirects to ``/`` (the token leaves the address bar and the history). Read routes accept that
cookie as well as the bearer header; the page's form asks for the token when there is none.
"""

from __future__ import annotations

import threading
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from kdcache.core.errors import NotFound, ServiceError
from kdcache.core.shards import ShardRecord
from kdcache.service.auth import TOKEN_COOKIE, ReadAuth
from kdcache.service.deps import SettingsDep, StoreDep
from kdcache.service.files import valid_cache_id
from kdcache.service.fleet_view import fleet_view
from kdcache.service.routes._common import error_responses

__all__ = ["mount_assets", "router"]

router = APIRouter(tags=["dashboard"])

SWAGGER_PREFIX = "/static/swagger"


class ReportUnavailable(ServiceError):
    """The service cannot draw reports: matplotlib is not installed (``kdcache[report]``)."""

    status_code, code = 501, "report_unavailable"


def _static() -> Path:
    return Path(str(resources.files("kdcache.service") / "static"))


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def dashboard(
    request: Request, token: Annotated[str | None, Query(max_length=1000)] = None
) -> Response:
    """The dashboard page; ``?token=`` becomes a cookie and the address loses it."""
    if token is not None:
        response = RedirectResponse("./", status_code=303)
        secure = request.url.scheme == "https"
        response.set_cookie(
            TOKEN_COOKIE, token, httponly=True, samesite="strict", secure=secure, path="/"
        )
        return response
    return HTMLResponse((_static() / "dashboard.html").read_text(), headers=_NO_STORE)


_NO_STORE = {"Cache-Control": "no-store"}


@router.get(
    "/v1/dashboard", dependencies=[ReadAuth], responses=error_responses(401, 403), tags=["jobs"]
)
def dashboard_state(store: StoreDep, settings: SettingsDep) -> dict[str, object]:
    """Jobs with progress, active leases and workers by last heartbeat (what ``/`` polls)."""
    return fleet_view(store, settings.lease_seconds)


class _Reports:
    """Rendered reports by (cache, shards done): a finished cache is drawn once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pages: dict[tuple[str, int], str] = {}

    def get(self, url: str, cache_id: str, records: dict[int, dict[str, Any]]) -> str:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ReportUnavailable(
                "this service cannot draw reports: install kdcache[report] (matplotlib)"
            ) from None
        from kdcache.core.cachestats import cache_stats
        from kdcache.core.reader import CacheReader
        from kdcache.core.report import render_report

        done = {k: ShardRecord.from_dict(v) for k, v in records.items()}
        reader = CacheReader(url, completed=lambda: done)
        key = (cache_id, len(done))
        with self.lock:  # one drawing at a time: matplotlib and two cores
            if key not in self.pages:
                self.pages = {k: v for k, v in self.pages.items() if k[0] != cache_id}
                self.pages[key] = render_report(cache_stats(reader)).html
            return self.pages[key]


def _json_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """Error responses of an HTML route: their body is still JSON (the one error handler)."""
    out = error_responses(*codes)
    for entry in out.values():
        entry["content"] = {"application/json": {}}
    return out


@router.get(
    "/v1/caches/{cache_id}/report",
    response_class=HTMLResponse,
    dependencies=[ReadAuth],
    responses={**_json_errors(401, 403, 404), 501: {"description": "matplotlib missing"}},
    tags=["caches"],
)
async def cache_report(cache_id: str, request: Request, store: StoreDep) -> HTMLResponse:
    """The cache's ``kdcache report`` page (self-contained HTML, plots embedded)."""
    if not valid_cache_id(cache_id):
        raise NotFound(f"no cache {cache_id!r}")
    _, records = await run_in_threadpool(store.caches.completed_records, cache_id)
    if not records:
        raise NotFound(f"cache {cache_id} has no completed shard yet: nothing to report")
    reports: _Reports = request.app.state.reports
    page = await run_in_threadpool(reports.get, store.cache_url(cache_id), cache_id, records)
    return HTMLResponse(page)


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> Response:
    """Swagger UI 5 (reads OpenAPI 3.1) from assets bundled in fastapi-offline: no CDN."""
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title="kdcache API",
        swagger_js_url=f"{root}{SWAGGER_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER_PREFIX}/favicon.png",
    )


def mount_assets(app: FastAPI) -> None:
    """Serve the dashboard's script and Swagger UI's assets; keep the reports' memo."""
    import fastapi_offline

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.state.reports = _Reports()
    app.mount(SWAGGER_PREFIX, StaticFiles(directory=assets), name="swagger")
    app.mount("/static", StaticFiles(directory=_static()), name="static")
