"""The cache index: which caches the service knows, and which of their shards are complete.

A cache can have several jobs (a failed or cancelled one, then a resubmission); a shard is
complete once any of them completed it, and the latest job stands for the cache.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from kdcache.core.errors import NotFound
from kdcache.core.wire import CacheDetail, CacheSummary
from kdcache.service.db import Database, JobRow, ShardRow
from kdcache.service.views import JobStats, job_stats

__all__ = ["CacheIndex"]


class CacheIndex:
    """Cache queries over a :class:`~kdcache.service.db.Database`.

    Positive answers of :meth:`exists` and :meth:`shard_done` are remembered: jobs are never
    deleted and a done shard never becomes undone, so serving a chunk costs no query after the
    first (store keys are the hot path when students train over HTTP).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._known: set[str] = set()
        self._done: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def _latest_jobs(self, s: Session, cache_id: str | None = None) -> list[JobRow]:
        q = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        if cache_id is not None:
            q = q.where(JobRow.cache_id == cache_id)
        seen: dict[str, JobRow] = {}
        for row in s.scalars(q):
            seen.setdefault(row.cache_id, row)
        return list(seen.values())

    def summaries(self) -> list[CacheSummary]:
        with self.db.read() as s:
            rows = self._latest_jobs(s)
            stats = job_stats(s, [r.id for r in rows])
            out = []
            for r in rows:
                st = stats.get(r.id, JobStats())
                out.append(
                    CacheSummary(
                        cache_id=r.cache_id,
                        name=r.name,
                        job_id=r.id,
                        status=r.status,  # type: ignore[arg-type]
                        shards_done=st.shards_done,
                        shards_total=r.shards_total,
                        rows_done=st.rows_done,
                        num_rows=r.rows_total,
                    )
                )
            return out

    def completed_records(self, cache_id: str) -> tuple[JobRow, dict[int, dict[str, Any]]]:
        """The cache's latest job and every completed shard's record (over all its jobs)."""
        with self.db.read() as s:
            latest = self._latest_jobs(s, cache_id)
            if not latest:
                raise NotFound(f"no cache {cache_id!r}")
            q = (
                select(ShardRow.shard, ShardRow.record)
                .join(JobRow, JobRow.id == ShardRow.job_id)
                .where(JobRow.cache_id == cache_id, ShardRow.status == "done")
                .order_by(ShardRow.shard)
            )
            records: dict[int, dict[str, Any]] = {}
            for shard, rec in s.execute(q):
                if rec is not None:
                    records.setdefault(shard, rec)
            return latest[0], records

    def detail(self, cache_id: str, manifest: dict[str, Any] | None) -> CacheDetail:
        job, records = self.completed_records(cache_id)
        return CacheDetail(
            cache_id=cache_id,
            manifest=manifest,
            shards_total=job.shards_total,
            shards_done=len(records),
            complete=job.shards_total > 0 and len(records) == job.shards_total,
            completed=[records[k] for k in sorted(records)],
        )

    def known(self, cache_id: str, shard: int | None = None) -> bool:
        """True when memory alone says the cache exists (and ``shard`` is done): no query."""
        return cache_id in self._known and (shard is None or (cache_id, shard) in self._done)

    def exists(self, cache_id: str) -> bool:
        """True once a job for this cache was submitted."""
        if cache_id in self._known:
            return True
        with self.db.read() as s:
            q = select(JobRow.id).where(JobRow.cache_id == cache_id).limit(1)
            found = s.execute(q).first() is not None
        if found:
            with self._lock:
                self._known.add(cache_id)
        return found

    def shard_done(self, cache_id: str, shard: int) -> bool:
        """True once any job of this cache completed ``shard``."""
        if (cache_id, shard) in self._done:
            return True
        with self.db.read() as s:
            q = (
                select(ShardRow.shard)
                .join(JobRow, JobRow.id == ShardRow.job_id)
                .where(
                    JobRow.cache_id == cache_id,
                    ShardRow.shard == shard,
                    ShardRow.status == "done",
                )
                .limit(1)
            )
            done = s.execute(q).first() is not None
        if done:
            with self._lock:
                self._done.add((cache_id, shard))
        return done
