"""/v1/caches: the cache index, one cache's manifest and completed shards, raw Zarr keys."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response

from kdcache.core.errors import NotFound
from kdcache.core.wire import RANGE_LENGTHS_HEADER, CacheDetail, CacheList, RangeReadRequest
from kdcache.service.auth import ReadAuth
from kdcache.service.deps import FilesDep, StoreDep
from kdcache.service.files import valid_cache_id
from kdcache.service.routes._common import error_responses
from kdcache.service.serve import ranges_response, respond, store_response

__all__ = ["router"]

router = APIRouter(prefix="/v1/caches", tags=["caches"], dependencies=[ReadAuth])

_RAW = {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


@router.get("", response_model=CacheList, responses=error_responses(401, 403))
def list_caches(store: StoreDep) -> CacheList:
    """Every cache the service knows, with its latest job's progress."""
    return CacheList(caches=store.caches.summaries())


@router.get("/{cache_id}", response_model=CacheDetail, responses=error_responses(401, 403, 404))
def get_cache(cache_id: str, store: StoreDep, files: FilesDep) -> CacheDetail:
    """The manifest and the completion record of every completed shard."""
    if not valid_cache_id(cache_id):
        raise NotFound(f"no cache {cache_id!r}")
    return store.caches.detail(cache_id, files.manifest(cache_id))


_STORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the whole object", **_RAW},
    206: {
        "description": "the requested byte range; several as multipart/byteranges",
        **_RAW,
    },
    304: {"description": "not modified (If-None-Match)"},
    **error_responses(401, 403, 404, 416),
}


@router.head(
    "/{cache_id}/store/{key:path}",
    response_class=Response,
    responses=_STORE_RESPONSES,
    operation_id="head_store_key",
)
@router.get(
    "/{cache_id}/store/{key:path}",
    response_class=Response,
    responses=_STORE_RESPONSES,
    operation_id="get_store_key",
)
async def get_store_key(
    cache_id: str,
    key: str,
    request: Request,
    store: StoreDep,
    files: FilesDep,
    range_: Annotated[str | None, Header(alias="Range")] = None,
    if_none_match: Annotated[str | None, Header(max_length=1000)] = None,
    if_range: Annotated[str | None, Header(max_length=1000)] = None,
) -> Response:
    """Raw bytes of a Zarr key: metadata always, chunks and records of completed shards only.

    Byte ranges (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) give 206, several of them
    ``multipart/byteranges``; ranges that select nothing give 416.
    """
    return await respond(
        store_response,
        files,
        store,
        cache_id,
        key,
        head=request.method == "HEAD",
        range_header=range_,
        if_none_match=if_none_match,
        if_range=if_range,
    )


@router.post(
    "/{cache_id}/ranges",
    response_class=Response,
    responses={
        200: {
            "description": f"the parts, concatenated in order; lengths in {RANGE_LENGTHS_HEADER}",
            **_RAW,
        },
        **error_responses(401, 403, 404, 416, 422),
    },
)
async def read_ranges(
    cache_id: str, body: RangeReadRequest, store: StoreDep, files: FilesDep
) -> Response:
    """Many byte ranges of many keys in one request (what ``kdcache.client`` reads with)."""
    return await respond(ranges_response, files, store, cache_id, body)
