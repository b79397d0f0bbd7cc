"""/v1/jobs: submit, list, status and cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response

from kdcache.core.wire import Job, JobList, JobStatus
from kdcache.service.auth import AdminAuth, ReadAuth
from kdcache.service.deps import SettingsDep, StoreDep
from kdcache.service.routes._common import error_responses
from kdcache.service.submit import plan_submission

__all__ = ["router"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_SPEC_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
    }
}


@router.post(
    "",
    status_code=201,
    response_model=Job,
    dependencies=[AdminAuth],
    responses={
        200: {"model": Job, "description": "a job for the same cache exists; that job"},
        **error_responses(401, 403, 413, 422),
    },
    openapi_extra=_SPEC_BODY,
)
def submit_job(
    body: Annotated[Any, Body()], store: StoreDep, settings: SettingsDep, response: Response
) -> Job:
    """Submit a JobSpec: 201 with a new job, or 200 with the live job of the same cache."""
    job, created = store.submit(plan_submission(body, settings.allowed_teacher_module))
    if not created:
        response.status_code = 200
    return job


@router.get(
    "", response_model=JobList, dependencies=[ReadAuth], responses=error_responses(401, 403, 422)
)
def list_jobs(
    store: StoreDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1 << 31)] = 0,
) -> JobList:
    """Jobs, newest first, optionally of one status."""
    return JobList(jobs=store.list_jobs(status, limit, offset))


@router.get(
    "/{job_id}",
    response_model=Job,
    dependencies=[ReadAuth],
    responses=error_responses(401, 403, 404),
)
def get_job(job_id: str, store: StoreDep) -> Job:
    """One job: status, shards done/total, rows and tokens done, tokens/s, ETA, error."""
    return store.get_job(job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=Job,
    dependencies=[AdminAuth],
    responses=error_responses(401, 403, 404, 409),
)
def cancel_job(job_id: str, store: StoreDep) -> Job:
    """Cancel a job: no more shards are leased; live leases learn it at their next heartbeat."""
    return store.cancel(job_id)
