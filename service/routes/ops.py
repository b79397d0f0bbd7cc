"""/healthz and /metrics (open: no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from kdcache.core.wire import Health
from kdcache.service.deps import StoreDep
from kdcache.service.metrics import CONTENT_TYPE, RequestHistogram, render_metrics

__all__ = ["router"]

router = APIRouter(tags=["operations"])


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "the job database is unreachable"}},
)
def healthz(store: StoreDep) -> Health | JSONResponse:
    """Liveness and database reachability."""
    try:
        store.ping()
    except SQLAlchemyError as err:
        body = Health(status="unavailable", db=f"error: {type(err).__name__}")
        return JSONResponse(body.model_dump(), status_code=503)
    return Health(status="ok", db="ok")


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}},
)
def metrics(request: Request, store: StoreDep) -> Response:
    """Prometheus text exposition."""
    histogram: RequestHistogram = request.app.state.histogram
    return Response(render_metrics(store.metrics(), histogram), media_type=CONTENT_TYPE)
