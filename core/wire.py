"""The REST API's wire models (v1), defined once: the service answers with them, the worker and
the client read them. See docs/rest-api.md.

Job states::

    pending -> running -> done
          \\         \\-> failed      (a shard failed for good, or too often)
           \\-------------> cancelled (POST /v1/jobs/{id}/cancel)

``ACTIVE`` states still lease shards; ``LIVE`` states are what a resubmission of the same cache
returns instead of making a new job; ``TERMINAL`` states never change again.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdcache.core.errors import Problem
from kdcache.core.shards import ShardRecord
from kdcache.core.spec import JobSpec

__all__ = [
    "ACTIVE_JOB_STATES",
    "JOB_STATES",
    "LIVE_JOB_STATES",
    "TERMINAL_JOB_STATES",
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
    "LeasePlan",
    "LeaseRequest",
    "PreparedIn",
    "MAX_RANGE_READS",
    "MAX_RANGE_READ_BYTES",
    "RANGE_LENGTHS_HEADER",
    "Problem",
    "RangeRead",
    "RangeReadRequest",
    "ShardRecord",
]

JobStatus = Literal["pending", "running", "done", "failed", "cancelled"]
JOB_STATES: tuple[JobStatus, ...] = ("pending", "running", "done", "failed", "cancelled")
ACTIVE_JOB_STATES: tuple[JobStatus, ...] = ("pending", "running")
LIVE_JOB_STATES: tuple[JobStatus, ...] = ("pending", "running", "done")
TERMINAL_JOB_STATES: tuple[JobStatus, ...] = ("done", "failed", "cancelled")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    """Answers: unknown fields from a newer service are ignored by older readers."""

    model_config = ConfigDict(extra="ignore")


class ErrorDetail(_Out):
    """What went wrong: a machine-readable ``code`` and a message for people."""

    code: str
    message: str
    field: str | None = None
    problems: list[Problem] | None = None


class ErrorBody(_Out):
    """The body of every error response."""

    error: ErrorDetail


class Job(_Out):
    """A job and its progress. Rates are over shards completed since the job started running."""

    id: str
    cache_id: str
    name: str
    status: JobStatus
    shards_total: int | None = Field(
        description="null while a jsonl/hf job's dataset is being tokenised (its prepare step)"
    )
    shards_done: int
    rows_total: int | None = Field(description="null until the dataset is tokenised")
    rows_done: int
    tokens_done: int
    tokens_per_s: float | None = Field(description="null until a shard completes under this job")
    eta_s: float | None = Field(description="seconds to done at the current rate; null: unknown")
    error: str | None
    spec: JobSpec = Field(description="the resolved spec (absolute paths on the service host)")
    cache_url: str = Field(description="where the cache lives under the service's storage root")
    created_at: datetime
    updated_at: datetime


class JobList(_Out):
    jobs: list[Job]


class LeaseRequest(_In):
    """A worker asks for work, from any job or from one job."""

    worker: str = Field(min_length=1, max_length=200, description="worker name, for the logs")
    job_id: str | None = Field(None, max_length=64)


class LeasePlan(_Out):
    """What the service resolved for a job at submit time, sent with each of its leases.

    A worker whose files ``stat`` the same as the service's (``files``: absolute path ->
    ``[size, mtime_ns, ctime_ns]`` of the teacher's config and weights, the dataset and the
    tokenizer) takes the fingerprints from here instead of hashing every weight file again
    (see :mod:`kdcache.core.leaseplan`).
    """

    teacher_fingerprint: str
    dataset_fingerprint: str
    tokenizer_fingerprint: str | None = None
    num_rows: int | None = None
    seq_len: int
    vocab_size: int | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    max_positions: int | None = None
    layer_map: dict[str, int] = Field(default_factory=dict)
    files: dict[str, tuple[int, int, int]] = Field(default_factory=dict)


class Lease(_Out):
    """One unit of work owned by the caller until ``deadline``: a shard to compute and write
    (``kind: shard``), or a document job's dataset to tokenise first (``kind: prepare``,
    ``shard`` -1, no rows)."""

    id: str
    job_id: str
    cache_id: str
    kind: Literal["shard", "prepare"] = "shard"
    shard: int
    start: int = Field(description="first row")
    end: int = Field(description="one past the last row")
    deadline: float = Field(description="epoch seconds; heartbeat before it")
    lease_seconds: float
    spec: JobSpec
    cache_url: str = Field(description="the cache to write into: <ROOT>/caches/<cache_id>")
    attempt: int = Field(description="1 for the first try of this shard")
    plan: LeasePlan | None = Field(
        None, description="the job's resolved plan; null for jobs submitted before it existed"
    )


class Heartbeat(_Out):
    deadline: float
    cancelled: bool = False


class PreparedIn(_In):
    """What a prepare lease found: the rows its dataset tokenised into."""

    num_rows: int = Field(ge=1)
    seq_len: int = Field(ge=2)


class CompleteRequest(_In):
    """A shard lease completes with its ``record``; a prepare lease with ``prepared``."""

    record: ShardRecord | None = None
    prepared: PreparedIn | None = None

    @model_validator(mode="after")
    def _one(self) -> CompleteRequest:
        if (self.record is None) == (self.prepared is None):
            raise ValueError("give exactly one of 'record' (a shard) or 'prepared'")
        return self


class FailRequest(_In):
    message: str = Field(max_length=100_000)
    retryable: bool = True
    release: bool = Field(
        False,
        description="the worker is stopping (SIGTERM, preemption): requeue without an attempt",
    )


class CacheSummary(_Out):
    cache_id: str
    name: str
    job_id: str
    status: JobStatus
    shards_done: int
    shards_total: int
    rows_done: int
    num_rows: int


class CacheList(_Out):
    caches: list[CacheSummary]


class CacheDetail(_Out):
    """A cache's manifest and completed shards (what kdcache.client reads over HTTP)."""

    cache_id: str
    manifest: dict[str, Any] | None = Field(description="null until a worker created the cache")
    shards_total: int
    shards_done: int
    complete: bool
    completed: list[dict[str, Any]] = Field(description="completion records, by shard")


MAX_RANGE_READS = 4096
MAX_RANGE_READ_BYTES = 256 << 20
RANGE_LENGTHS_HEADER = "X-Kdcache-Lengths"


class RangeRead(_In):
    """Bytes of one store key: ``[start, end)``, the last ``suffix`` bytes, or (neither) all."""

    key: str = Field(min_length=1, max_length=512)
    start: int | None = Field(None, ge=0)
    end: int | None = Field(None, ge=1, description="exclusive; at most the object's size")
    suffix: int | None = Field(None, ge=1, description="the last n bytes (all of a shorter one)")

    @model_validator(mode="after")
    def _one_form(self) -> RangeRead:
        if self.suffix is not None and (self.start is not None or self.end is not None):
            raise ValueError("give 'start' and 'end', or 'suffix', not both")
        if (self.start is None) != (self.end is None):
            raise ValueError("'start' and 'end' go together")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError("'end' must be greater than 'start'")
        return self


class RangeReadRequest(_In):
    """``POST /v1/caches/{id}/ranges``: many byte ranges of many keys in one request; the
    answer's body is the parts in this order, their lengths in ``X-Kdcache-Lengths``."""

    ranges: list[RangeRead] = Field(min_length=1, max_length=MAX_RANGE_READS)


class Health(_Out):
    status: str
    db: str
