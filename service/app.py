"""The FastAPI application: ``create_app(settings)``.

The lifespan opens the job store (creating or checking its schema) and the cache files of the
storage root; nothing lives in module globals, so tests build as many apps as they like.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from kdcache.core.format import FORMAT_VERSION
from kdcache.core.storage import is_remote
from kdcache.service.errors import install_error_handlers
from kdcache.service.files import CacheFiles
from kdcache.service.metrics import RequestHistogram
from kdcache.service.middleware import BodyLimitMiddleware, MetricsMiddleware
from kdcache.service.routes import caches, dashboard, jobs, leases, ops
from kdcache.service.settings import Settings, get_settings
from kdcache.service.store import JobStore

__all__ = ["create_app"]

log = logging.getLogger(__name__)

API_VERSION = "1"


def _settings_of(app: FastAPI) -> Settings:
    """The settings the app's routes see: an override (tests, ``create_app(s)``) or the env."""
    provider = app.dependency_overrides.get(get_settings, get_settings)
    settings: Settings = provider()
    return settings


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = _settings_of(app)
    if not is_remote(settings.root):
        Path(settings.root).mkdir(parents=True, exist_ok=True)
    store = JobStore(
        settings.db_url,
        settings.root,
        lease_seconds=settings.lease_seconds,
        max_attempts=settings.max_attempts,
        max_expiries=settings.max_expiries,
    )
    try:
        await run_in_threadpool(store.open)
    except BaseException:
        store.close()
        raise
    app.state.settings = settings
    app.state.store = store
    app.state.files = CacheFiles(settings.root)
    open_routes = settings.open_routes()
    if open_routes:
        log.warning("routes open to anyone (no token set): %s", ", ".join(open_routes))
    log.info("kdcache service: root %s, database %s", settings.root, store.engine.url)
    try:
        yield
    finally:
        store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The kdcache service. ``settings`` default: from the environment (``KDCACHE_*``)."""
    app = FastAPI(
        title="kdcache",
        summary="Teacher-activation cache service: jobs, leases, cache serving",
        version=f"{API_VERSION}.0 (cache format {FORMAT_VERSION})",
        lifespan=_lifespan,
        separate_input_output_schemas=False,
        docs_url=None,  # served by the dashboard router from bundled assets (offline)
        redoc_url=None,
    )
    if settings is not None:
        app.dependency_overrides[get_settings] = lambda: settings
    app.state.histogram = RequestHistogram()
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(MetricsMiddleware, histogram=app.state.histogram)
    for module in (jobs, leases, caches, ops, dashboard):
        app.include_router(module.router)
    dashboard.mount_assets(app)
    return app
