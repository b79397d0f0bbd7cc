"""FastAPI dependencies of the routes, as ``Annotated`` type aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from kdcache.service.files import CacheFiles
from kdcache.service.settings import Settings, get_settings
from kdcache.service.store import JobStore

__all__ = ["FilesDep", "SettingsDep", "StoreDep", "get_files", "get_store"]


async def get_store(request: Request) -> JobStore:
    """The job store the lifespan opened (``async``: FastAPI runs a plain ``def`` dependency in
    its thread pool, a thread hop per request for nothing)."""
    store: JobStore = request.app.state.store
    return store


async def get_files(request: Request) -> CacheFiles:
    """Read access to the caches under the storage root."""
    files: CacheFiles = request.app.state.files
    return files


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[JobStore, Depends(get_store)]
FilesDep = Annotated[CacheFiles, Depends(get_files)]
