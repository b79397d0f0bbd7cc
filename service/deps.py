"""FastAPI dependencies of the routes, as ``Annotated`` type aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kdcache.service.files import CacheFiles
from kdcache.service.settings import Settings
from kdcache.service.store import JobStore

__all__ = ["FilesDep", "SettingsDep", "StoreDep", "app_settings", "get_files", "get_store"]


async def get_store(request: Request) -> JobStore:
    """The job store the lifespan opened (``async``: FastAPI runs a plain ``def`` dependency in
    its thread pool, a thread hop per request for nothing)."""
    store: JobStore = request.app.state.store
    return store


async def get_files(request: Request) -> CacheFiles:
    """Read access to the caches under the storage root."""
    files: CacheFiles = request.app.state.files
    return files


async def app_settings(request: Request) -> Settings:
    """The settings the lifespan took (``get_settings``, or its override when the app
    started). Read from the app, not through ``Depends(get_settings)``: FastAPI analyses an
    overridden dependency's signature again on every request, a tenth of a small read's CPU."""
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(app_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
FilesDep = Annotated[CacheFiles, Depends(get_files)]
