"""Request and response bodies of the REST API (v1); see docs/rest-api.md."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kdcache.core.spec import JobSpec

__all__ = [
    "CacheDetail",
    "CacheList",
    "CacheSummary",
    "CompleteRequest",
    "ErrorBody",
    "ErrorDetail",
    "FailRequest",
    "Health",
    "Heartbeat",
    "Job",
    "JobList",
    "JobStatus",
    "Lease",
    "LeaseRequest",
    "Problem",
    "RecordIn",
]

JobStatus = Literal["pending", "running", "done", "failed", "cancelled"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(BaseModel):
    """One problem with a request, naming its field (``outputs.topk``)."""

    field: str
    message: str


class ErrorDetail(BaseModel):
    """What went wrong: a machine-readable ``code`` and a message for people."""

    code: str
    message: str
    field: str | None = None
    problems: list[Problem] | None = None


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


class Job(BaseModel):
    """A job and its progress. Rates are over shards completed since the job started running."""

    id: str
    cache_id: str
    name: str
    status: JobStatus
    shards_total: int
    shards_done: int
    rows_total: int
    rows_done: int
    tokens_done: int
    tokens_per_s: float | None = Field(description="null until a shard completes under this job")
    eta_s: float | None = Field(description="seconds to done at the current rate; null: unknown")
    error: str | None
    spec: JobSpec = Field(description="the resolved spec (absolute paths on the service host)")
    cache_url: str = Field(description="where the cache lives under the service's storage root")
    created_at: datetime
    updated_at: datetime


class JobList(BaseModel):
    jobs: list[Job]


class LeaseRequest(_In):
    """A worker asks for work, from any job or from one job."""

    worker: str = Field(min_length=1, max_length=200, description="worker name, for the logs")
    job_id: str | None = Field(None, max_length=64)


class Lease(BaseModel):
    """One shard to compute and write, owned by the caller until ``deadline``."""

    id: str
    job_id: str
    cache_id: str
    shard: int
    start: int = Field(description="first row")
    end: int = Field(description="one past the last row")
    deadline: float = Field(description="epoch seconds; heartbeat before it")
    lease_seconds: float
    spec: JobSpec
    cache_url: str = Field(description="the cache to write into: <ROOT>/caches/<cache_id>")
    attempt: int = Field(description="1 for the first try of this shard")


class Heartbeat(BaseModel):
    deadline: float
    cancelled: bool = False


class RecordIn(_In):
    """A shard completion record (kdcache.core.shards.ShardRecord)."""

    shard: int = Field(ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    checksums: dict[str, str] = Field(description="array name -> SHA-256 of its shard rows")
    tokens: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0)
    writer: dict[str, Any] = Field(default_factory=dict)


class CompleteRequest(_In):
    record: RecordIn


class FailRequest(_In):
    message: str = Field(max_length=100_000)
    retryable: bool = True
    release: bool = Field(
        False,
        description="the worker is stopping (SIGTERM, preemption): requeue without an attempt",
    )


class CacheSummary(BaseModel):
    cache_id: str
    name: str
    job_id: str
    status: JobStatus
    shards_done: int
    shards_total: int
    rows_done: int
    num_rows: int


class CacheList(BaseModel):
    caches: list[CacheSummary]


class CacheDetail(BaseModel):
    """A cache's manifest and completed shards (what kdcache.client reads over HTTP)."""

    cache_id: str
    manifest: dict[str, Any] | None = Field(description="null until a worker created the cache")
    shards_total: int
    shards_done: int
    complete: bool
    completed: list[dict[str, Any]] = Field(description="completion records, by shard")


class Health(BaseModel):
    status: str
    db: str
