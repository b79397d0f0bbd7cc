"""/v1/leases: workers claim shards, heartbeat, complete and fail them."""

from __future__ import annotations

from fastapi import APIRouter, Response

from kdcache.core.wire import (
    CompleteRequest,
    FailRequest,
    Heartbeat,
    Job,
    Lease,
    LeaseRequest,
)
from kdcache.service.auth import WorkerAuth
from kdcache.service.deps import StoreDep
from kdcache.service.routes._common import error_responses

__all__ = ["router"]

router = APIRouter(prefix="/v1/leases", tags=["leases"], dependencies=[WorkerAuth])


@router.post(
    "",
    response_model=Lease,
    responses={
        204: {"description": "no shard to work on"},
        **error_responses(401, 403, 404, 413, 422),
    },
)
def claim_lease(body: LeaseRequest, store: StoreDep) -> Lease | Response:
    """Lease the next pending shard (oldest job first), or 204 when there is none."""
    lease = store.leases.claim(body.worker, body.job_id)
    return lease if lease is not None else Response(status_code=204)


@router.post(
    "/{lease_id}/heartbeat",
    response_model=Heartbeat,
    responses=error_responses(401, 403, 404, 409),
)
def heartbeat(lease_id: str, store: StoreDep) -> Heartbeat:
    """Extend the lease; 409 lease_lost or job_cancelled means: stop and drop the shard."""
    return store.leases.heartbeat(lease_id)


@router.post(
    "/{lease_id}/complete",
    response_model=Job,
    responses=error_responses(401, 403, 404, 409, 413, 422),
)
def complete_lease(lease_id: str, body: CompleteRequest, store: StoreDep) -> Job:
    """Record the written shard (its checksums) and publish it to readers; or, for a prepare
    lease, the prepared dataset's rows (the job's shards are made from them)."""
    return store.leases.finish(lease_id, body)


@router.post(
    "/{lease_id}/fail",
    response_model=Job,
    responses=error_responses(401, 403, 404, 409, 413, 422),
)
def fail_lease(lease_id: str, body: FailRequest, store: StoreDep) -> Job:
    """Give the shard back: retried up to KDCACHE_MAX_ATTEMPTS, then the job fails."""
    return store.leases.fail(lease_id, body.message, body.retryable, release=body.release)
