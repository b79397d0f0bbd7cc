"""The job store: submitting, listing and cancelling jobs, and the metrics snapshot.

It, the lease book (:mod:`kdcache.service.leasing`) and the cache index
(:mod:`kdcache.service.cache_index`) are peers over one :class:`~kdcache.service.db.Database`;
the Job view they all answer with is :mod:`kdcache.service.views`'.
"""

from __future__ import annotations

import logging
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError
from sqlalchemy.orm import Session

from kdcache.core.errors import Conflict, NotFound
from kdcache.core.layout import cache_url
from kdcache.core.leaseplan import to_lease_plan
from kdcache.core.prepared import prepared_url, read_prepared_meta
from kdcache.core.resolve import JobPlan
from kdcache.core.storage import open_storage
from kdcache.core.wire import ACTIVE_JOB_STATES, JOB_STATES, LIVE_JOB_STATES, Job
from kdcache.service.cache_index import CacheIndex
from kdcache.service.db import PREPARE_SHARD, Database, JobRow, LeaseRow, ShardRow
from kdcache.service.leasing import LeaseBook
from kdcache.service.shardrows import carried_records, prepare_row, shard_rows_of
from kdcache.service.views import JobStats, job_stats, job_view, view

__all__ = ["JobStore", "MetricsSnapshot"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counters derived from the database (the same from every service process)."""

    jobs: dict[str, int]
    shards_done: int
    tokens_written: int
    lease_expiries: int


class JobStore:
    """Jobs and shards in a database; safe to share between threads and processes."""

    def __init__(
        self,
        db_url: str | Database,
        root: str,
        *,
        lease_seconds: float = 120.0,
        max_attempts: int = 3,
        max_expiries: int | None = None,
    ) -> None:
        self.root = root
        self.db = db_url if isinstance(db_url, Database) else Database(db_url)
        self.engine = self.db.engine
        # Peers over the same database, kept here for the routes' convenience: neither calls
        # back into the job store.
        self.leases = LeaseBook(
            self.db,
            root,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            max_expiries=max_expiries,
        )
        self.caches = CacheIndex(self.db)

    def open(self) -> None:
        """Create or check the schema (refuses a newer one)."""
        self.db.open()

    def close(self) -> None:
        self.db.close()

    @property
    def dialect(self) -> str:
        return self.db.dialect

    def read(self) -> AbstractContextManager[Session]:
        return self.db.read()

    def write(self) -> AbstractContextManager[Session]:
        return self.db.write()

    def cache_url(self, cache_id: str) -> str:
        return cache_url(self.root, cache_id)

    def ping(self) -> None:
        self.db.ping()

    def view(self, s: Session, row: JobRow) -> Job:
        return view(s, row, self.root)

    # -- jobs ----------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        with self.read() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job {job_id!r}")
            return self.view(s, row)

    def list_jobs(self, status: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        """Jobs, newest first."""
        with self.read() as s:
            q = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc())
            if status is not None:
                q = q.where(JobRow.status == status)
            rows = list(s.scalars(q.limit(limit).offset(offset)))
            stats = job_stats(s, [r.id for r in rows])
            now = time.time()
            return [job_view(r, stats.get(r.id, JobStats()), self.root, now) for r in rows]

    def _live_job(self, s: Session, cache_id: str) -> JobRow | None:
        q = select(JobRow).where(JobRow.cache_id == cache_id, JobRow.status.in_(LIVE_JOB_STATES))
        return s.scalars(q.limit(1)).first()

    def _prepared(self, plan: JobPlan) -> JobPlan:
        """``plan`` with its rows, when its document dataset was tokenised by an earlier job."""
        if plan.num_rows is not None:
            return plan
        try:
            meta = read_prepared_meta(open_storage(prepared_url(self.cache_url(plan.cache_id))))
        except OSError as err:
            log.warning("cannot read prepared rows of %s: %s", plan.cache_id, err)
            return plan
        if (
            meta is None
            or meta.cache_id != plan.cache_id
            or meta.rows_per_shard != plan.spec.rows_per_shard
        ):
            return plan
        # the plan's row length stays: a generate job's rows are longer than its prompts
        return replace(plan, num_rows=meta.num_rows)

    def submit(self, plan: JobPlan) -> tuple[Job, bool]:
        """The live job of ``plan``'s cache (False), or a new one (True).

        A new job keeps every shard already complete for this cache (from earlier failed or
        cancelled jobs, or completion records in the cache itself). A document job whose rows
        are not known yet gets one shard, the prepare step (:data:`PREPARE_SHARD`); its real
        shards are made when that completes.
        """
        cache_id, per = plan.cache_id, plan.spec.rows_per_shard
        with self.read() as s:
            live = self._live_job(s, cache_id)
            if live is not None:
                return self.view(s, live), False
        plan = self._prepared(plan)
        lease_plan = to_lease_plan(plan).model_dump(mode="json")
        num_rows, num_shards = plan.num_rows or 0, plan.num_shards or 0
        carried = carried_records(self.db, self.root, cache_id, num_rows, per) if num_rows else {}
        now = time.time()
        job_id = uuid.uuid4().hex
        all_done = num_shards > 0 and len(carried) == num_shards
        try:
            with self.write() as s:
                live = self._live_job(s, cache_id)
                if live is not None:
                    return self.view(s, live), False
                s.add(
                    JobRow(
                        id=job_id,
                        cache_id=cache_id,
                        name=plan.spec.name,
                        status="done" if all_done else "pending",
                        spec=plan.spec.model_dump(mode="json"),
                        plan=lease_plan,
                        shards_total=num_shards,
                        rows_total=num_rows,
                        seq_len=plan.seq_len,
                        created_at=now,
                        updated_at=now,
                        finished_at=now if all_done else None,
                    )
                )
                s.flush()
                if num_rows:
                    s.add_all(shard_rows_of(job_id, num_shards, per, num_rows, carried))
                else:
                    s.add(prepare_row(job_id))
        except DBIntegrityError:
            # Another submit of the same cache won the race (PostgreSQL; SQLite serialises).
            with self.read() as s:
                live = self._live_job(s, cache_id)
                if live is None:
                    raise
                return self.view(s, live), False
        log.info(
            "job %s: cache %s, %s (%d already done)",
            job_id,
            cache_id,
            f"{num_shards} shards" if num_rows else "rows known once prepared",
            len(carried),
        )
        return self.get_job(job_id), True

    def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job; leased shards learn it at their next heartbeat."""
        with self.write() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"no job {job_id!r}")
            if row.status == "done":
                raise Conflict(f"job {job_id} is done; nothing to cancel")
            if row.status in ACTIVE_JOB_STATES:
                now = time.time()
                row.status, row.updated_at, row.finished_at = "cancelled", now, now
                log.info("job %s cancelled", job_id)
            return self.view(s, row)

    # -- operations ----------------------------------------------------------------------------

    def metrics(self) -> MetricsSnapshot:
        with self.read() as s:
            jobs: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
            for state, n in s.execute(select(JobRow.status, func.count()).group_by(JobRow.status)):
                jobs[state] = int(n)
            fresh = (ShardRow.status == "done") & ~ShardRow.carried
            fresh &= ShardRow.shard != PREPARE_SHARD
            shards, tokens = s.execute(
                select(func.count(), func.coalesce(func.sum(ShardRow.tokens), 0)).where(fresh)
            ).one()
            expiries = s.execute(
                select(func.count()).select_from(LeaseRow).where(LeaseRow.state == "expired")
            ).scalar_one()
            return MetricsSnapshot(jobs, int(shards), int(tokens), int(expiries))
