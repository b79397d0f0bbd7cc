"""The API's Job view of a job row: progress sums over its shards, rate and ETA.

Shared by the job store, the lease book (complete and fail answer with the job) and the cache
index (summaries), which are peers over one :class:`~kdcache.service.db.Database`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from kdcache.core.layout import cache_url
from kdcache.core.wire import Job
from kdcache.service.db import PREPARE_SHARD, JobRow, ShardRow

__all__ = ["JobStats", "job_stats", "job_view", "view"]


def _iso(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(frozen=True)
class JobStats:
    """Sums over a job's done shards; ``fresh_*`` only those completed under this job."""

    shards_done: int = 0
    rows_done: int = 0
    tokens_done: int = 0
    fresh_rows: int = 0
    fresh_tokens: int = 0


def job_stats(s: Session, job_ids: Sequence[str]) -> dict[str, JobStats]:
    """:class:`JobStats` of each job, in one query."""
    if not job_ids:
        return {}
    done = (ShardRow.status == "done") & (ShardRow.shard != PREPARE_SHARD)  # rows, not prepare
    fresh = done & ~ShardRow.carried
    rows = ShardRow.end - ShardRow.start
    q = (
        select(
            ShardRow.job_id,
            func.sum(case((done, 1), else_=0)),
            func.sum(case((done, rows), else_=0)),
            func.sum(case((done, ShardRow.tokens), else_=0)),
            func.sum(case((fresh, rows), else_=0)),
            func.sum(case((fresh, ShardRow.tokens), else_=0)),
        )
        .where(ShardRow.job_id.in_(job_ids))
        .group_by(ShardRow.job_id)
    )
    return {r[0]: JobStats(*(int(v or 0) for v in r[1:])) for r in s.execute(q)}


def job_view(row: JobRow, stats: JobStats, root: str, now: float | None = None) -> Job:
    """The API's Job, with rate and ETA from the shards completed under this job."""
    now = time.time() if now is None else now
    tokens_per_s = eta_s = None
    if row.started_at is not None and stats.fresh_tokens > 0:
        until = row.finished_at if row.finished_at is not None else now
        elapsed = max(until - row.started_at, 1e-3)
        tokens_per_s = stats.fresh_tokens / elapsed
        if row.status == "running" and stats.fresh_rows > 0:
            eta_s = (row.rows_total - stats.rows_done) / (stats.fresh_rows / elapsed)
    if row.status == "done":
        eta_s = 0.0
    return Job(
        id=row.id,
        cache_id=row.cache_id,
        name=row.name,
        status=row.status,  # type: ignore[arg-type]  # the DB holds only valid states
        shards_total=row.shards_total or None,  # 0: a document job not prepared yet
        shards_done=stats.shards_done,
        rows_total=row.rows_total or None,
        rows_done=stats.rows_done,
        tokens_done=stats.tokens_done,
        tokens_per_s=tokens_per_s,
        eta_s=eta_s,
        error=row.error,
        spec=row.spec,  # type: ignore[arg-type]  # validated into JobSpec by pydantic
        cache_url=cache_url(root, row.cache_id),
        created_at=_iso(row.created_at),
        updated_at=_iso(row.updated_at),
    )


def view(s: Session, row: JobRow, root: str) -> Job:
    """The Job of one row, its stats read in ``s``."""
    return job_view(row, job_stats(s, [row.id]).get(row.id, JobStats()), root)
