"""Leases: workers claim shards, heartbeat, and complete or fail them.

A shard has at most one owner: ``shards.lease_id``. Every change of owner happens inside one
write transaction that holds the write lock from its start (SQLite ``BEGIN IMMEDIATE``) or the
shard's row lock (PostgreSQL ``SELECT ... FOR UPDATE SKIP LOCKED``), so two claims can never
read the same pending shard and both take it. A lease whose deadline passed still owns its shard
until another claim takes it over (then it is ``expired`` and counts as one attempt); a heartbeat
before that revives it.
"""

from __future__ import annotations

import errno
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session

from kdcache.core.errors import (
    Conflict,
    InsufficientStorage,
    KDCacheError,
    NotFound,
    ServiceError,
    Unavailable,
    Unprocessable,
)
from kdcache.core.layout import cache_url
from kdcache.core.prepared import PreparedMeta, prepared_url, read_prepared_meta
from kdcache.core.reader import CacheReader
from kdcache.core.shards import ShardRecord, write_record
from kdcache.core.storage import open_storage
from kdcache.core.wire import ACTIVE_JOB_STATES, CompleteRequest, Heartbeat, Job, Lease, PreparedIn
from kdcache.service.db import PREPARE_SHARD, Database, JobRow, LeaseRow, ShardRow
from kdcache.service.shardrows import carried_records, shard_rows_of
from kdcache.service.views import view as job_of

__all__ = ["LeaseBook"]

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000


def _lease_lost(lease_id: str) -> Conflict:
    return Conflict(
        f"lease {lease_id} no longer owns its shard (it expired and was re-leased, or the "
        "shard is done); drop the shard",
        code="lease_lost",
    )


def _unit(shard: int) -> str:
    """How logs and errors name a unit of work: ``shard 3``, or ``prepare`` (shard -1)."""
    return "prepare" if shard == PREPARE_SHARD else f"shard {shard}"


def _job_stopped(job: JobRow) -> Conflict:
    return Conflict(f"job {job.id} is {job.status}; stop working on it", code="job_cancelled")


@dataclass
class _Owned:
    lease: LeaseRow
    shard: ShardRow
    job: JobRow

    @property
    def is_owner(self) -> bool:
        return self.shard.lease_id == self.lease.id and self.shard.status == "leased"


class LeaseBook:
    """Claims, heartbeats, completions and failures of shards, over a :class:`Database`.

    A shard's failures count against ``max_attempts``; its lease expiries (a worker died or
    stalled) against their own, larger ``max_expiries`` budget (default: ``10 * max_attempts``),
    so workers killed while starting up never fail a job that others keep working on.
    """

    def __init__(
        self,
        db: Database,
        root: str,
        *,
        lease_seconds: float = 120.0,
        max_attempts: int = 3,
        max_expiries: int | None = None,
    ) -> None:
        self.db = db
        self.root = root
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_expiries = max_expiries if max_expiries is not None else 10 * max_attempts
        self.started_at = time.time()

    def _lock(self) -> bool:
        return self.db.dialect != "sqlite"

    def cache_url(self, cache_id: str) -> str:
        return cache_url(self.root, cache_id)

    def _load(self, s: Session, lease_id: str, *, lock: bool = True) -> _Owned:
        """The lease, its shard (row-locked on PostgreSQL when ``lock``) and its job."""
        lease = s.get(LeaseRow, lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}")
        shard = s.get(ShardRow, (lease.job_id, lease.shard), with_for_update=lock and self._lock())
        job = s.get(JobRow, lease.job_id)
        if shard is None or job is None:
            raise NotFound(f"lease {lease_id!r} names a shard that no longer exists")
        return _Owned(lease, shard, job)

    @staticmethod
    def _release(shard: ShardRow) -> None:
        shard.status, shard.lease_id, shard.deadline = "pending", None, None

    @staticmethod
    def _fail_job(job: JobRow, message: str, now: float) -> None:
        job.status, job.error = "failed", message[:MAX_ERROR_CHARS]
        job.updated_at = job.finished_at = now
        log.warning("job %s failed: %s", job.id, job.error)

    # -- claim ---------------------------------------------------------------------------------

    @staticmethod
    def next_shard_query(now: float, job_id: str | None, *, skip_locked: bool) -> Select[Any]:
        """The next claimable shard: oldest active job, lowest pending (or expired) shard.

        ``skip_locked`` (PostgreSQL) adds ``FOR UPDATE OF shards SKIP LOCKED``.
        """
        q = (
            select(ShardRow)
            .join(JobRow, JobRow.id == ShardRow.job_id)
            .where(
                JobRow.status.in_(ACTIVE_JOB_STATES),
                or_(
                    ShardRow.status == "pending",
                    and_(ShardRow.status == "leased", ShardRow.deadline < now),
                ),
            )
            .order_by(JobRow.created_at, JobRow.id, ShardRow.shard)
            .limit(1)
        )
        if job_id is not None:
            q = q.where(ShardRow.job_id == job_id)
        if skip_locked:
            q = q.with_for_update(skip_locked=True, of=ShardRow)
        return q

    def _next(self, s: Session, now: float, job_id: str | None) -> ShardRow | None:
        # Right after a (re)start, leases granted before it get one whole lease period to
        # heartbeat: their workers may have spent the outage waiting to complete a shard.
        expire_before = now if now >= self.started_at + self.lease_seconds else float("-inf")
        q = self.next_shard_query(expire_before, job_id, skip_locked=self._lock())
        return s.scalars(q).first()

    @staticmethod
    def _expiries(s: Session, job_id: str, shard: int) -> int:
        q = (
            select(func.count())
            .select_from(LeaseRow)
            .where(LeaseRow.job_id == job_id, LeaseRow.shard == shard, LeaseRow.state == "expired")
        )
        return int(s.execute(q).scalar_one())

    def _expire(self, s: Session, shard: ShardRow, job: JobRow, now: float) -> bool:
        """Take an expired lease's shard back; True when that used up the shard's expiry budget
        (``max_expiries``, apart from the failure attempts: a killed worker is no failure)."""
        old = s.get(LeaseRow, shard.lease_id) if shard.lease_id else None
        if old is not None:
            old.state = "expired"
        self._release(shard)
        s.flush()
        expiries = self._expiries(s, job.id, shard.shard)
        worker = old.worker if old is not None else "?"
        log.warning(
            "job %s %s: lease of %s expired (%d of %d)",
            job.id,
            _unit(shard.shard),
            worker,
            expiries,
            self.max_expiries,
        )
        if expiries < self.max_expiries:
            return False
        self._fail_job(
            job,
            f"{_unit(shard.shard)}: its lease expired {expiries} times without a completion "
            f"(last worker {worker}); every worker that took it died or stalled",
            now,
        )
        return True

    def claim(self, worker: str, job_id: str | None = None) -> Lease | None:
        """Lease the next pending shard (oldest job first, lowest shard first), or None."""
        if job_id is not None:
            with self.db.read() as s:
                if s.get(JobRow, job_id) is None:
                    raise NotFound(f"no job {job_id!r}")
        now = time.time()
        with self.db.write() as s:
            # Each pass leases a shard, or fails a job (which leaves the active set): it ends.
            while (shard := self._next(s, now, job_id)) is not None:
                job = s.get(JobRow, shard.job_id)
                if job is None:
                    return None
                if shard.status == "leased" and self._expire(s, shard, job, now):
                    continue
                return self._grant(s, shard, job, worker, now)
        return None

    def _grant(self, s: Session, shard: ShardRow, job: JobRow, worker: str, now: float) -> Lease:
        lease_id = uuid.uuid4().hex
        deadline = now + self.lease_seconds
        shard.status, shard.lease_id, shard.deadline = "leased", lease_id, deadline
        # failures and expiries both count as tries of the shard (releases do not)
        attempt = shard.attempts + self._expiries(s, job.id, shard.shard) + 1
        s.add(
            LeaseRow(
                id=lease_id,
                job_id=job.id,
                shard=shard.shard,
                worker=worker,
                attempt=attempt,
                state="active",
                created_at=now,
                deadline=deadline,
            )
        )
        if job.status == "pending":
            job.status, job.started_at = "running", now
        job.updated_at = now
        log.info("job %s %s leased to %s (attempt %d)", job.id, _unit(shard.shard), worker, attempt)
        return Lease(
            id=lease_id,
            job_id=job.id,
            cache_id=job.cache_id,
            kind="prepare" if shard.shard == PREPARE_SHARD else "shard",
            shard=shard.shard,
            start=shard.start,
            end=shard.end,
            deadline=deadline,
            lease_seconds=self.lease_seconds,
            spec=job.spec,  # type: ignore[arg-type]  # validated into JobSpec by pydantic
            cache_url=self.cache_url(job.cache_id),
            attempt=attempt,
            plan=job.plan,  # type: ignore[arg-type]  # validated into LeasePlan by pydantic
        )

    # -- heartbeat, complete, fail -------------------------------------------------------------

    @staticmethod
    def _refusal(o: _Owned) -> Conflict | None:
        """Why this lease may not act any more (its job stopped, or it lost its shard)."""
        if o.job.status not in ACTIVE_JOB_STATES:
            return _job_stopped(o.job)
        if not o.is_owner:
            return _lease_lost(o.lease.id)
        return None

    def heartbeat(self, lease_id: str) -> Heartbeat:
        """Extend a lease that still owns its shard; 409 when lost or the job stopped."""
        deadline = time.time() + self.lease_seconds
        with self.db.write() as s:
            o = self._load(s, lease_id)
            refusal = self._refusal(o)
            if refusal is None:
                o.shard.deadline = o.lease.deadline = deadline
            elif o.is_owner:  # the job stopped: hand the shard back (a resubmission redoes it)
                self._release(o.shard)
                o.lease.state = "released"
        if refusal is not None:
            raise refusal
        return Heartbeat(deadline=deadline, cancelled=False)

    def _check_record(self, o: _Owned, rec: ShardRecord) -> None:
        for name in ("shard", "start", "end"):
            want = getattr(o.shard, name)
            if getattr(rec, name) != want:
                raise Unprocessable(
                    f"the record's {name} is {getattr(rec, name)}, the lease's is {want}",
                    code="invalid_record",
                    field=f"record.{name}",
                )
        url = self.cache_url(o.job.cache_id)
        try:
            manifest = CacheReader(url).manifest
        except (KDCacheError, OSError, ValueError, KeyError) as err:
            raise Unprocessable(
                f"cannot open the cache at {url}: {err}", code="invalid_record", field="record"
            ) from None
        arrays = {a.name for a in manifest.arrays()}
        if manifest.cache_id != o.job.cache_id:
            raise Unprocessable(
                f"the cache at {url} holds cache {manifest.cache_id}, not {o.job.cache_id}",
                code="invalid_record",
                field="record",
            )
        if set(rec.checksums) != arrays:
            raise Unprocessable(
                f"checksums name {sorted(rec.checksums)}; the cache's arrays are {sorted(arrays)}",
                code="invalid_record",
                field="record.checksums",
            )

    def finish(self, lease_id: str, body: CompleteRequest) -> Job:
        """POST complete: a shard lease's record, or a prepare lease's rows."""
        if body.prepared is not None:
            return self.complete_prepare(lease_id, body.prepared)
        if body.record is None:
            raise Unprocessable(
                "give 'record' or 'prepared'", code="invalid_record", field="record"
            )
        return self.complete(lease_id, body.record)

    def _check_prepared(self, o: _Owned, got: PreparedIn) -> PreparedMeta:
        if o.shard.shard != PREPARE_SHARD:
            raise Unprocessable(
                f"lease {o.lease.id} is for shard {o.shard.shard}: complete it with its record",
                code="invalid_record",
                field="prepared",
            )
        url = prepared_url(self.cache_url(o.job.cache_id))
        meta = read_prepared_meta(open_storage(url))
        per = int(o.job.spec["rows_per_shard"])
        found = None if meta is None else (meta.cache_id, meta.num_rows, meta.rows_per_shard)
        if meta is None or found != (o.job.cache_id, got.num_rows, per):
            raise Unprocessable(
                f"the prepared rows at {url} ({found or 'none'}) are not "
                f"{(o.job.cache_id, got.num_rows, per)} (cache, rows, rows per shard)",
                code="invalid_record",
                field="prepared",
            )
        return meta

    def complete_prepare(self, lease_id: str, got: PreparedIn) -> Job:
        """A prepare lease is done: the job learns its rows and gets its shards.

        The prepared store's ``meta.json`` (read here, not taken from the worker) decides the
        row count. Idempotent like :meth:`complete`.
        """
        with self.db.read() as s:
            o = self._load(s, lease_id, lock=False)
            if o.lease.state == "done" and o.job.rows_total == got.num_rows:
                return job_of(s, o.job, self.root)
            if (refusal := self._refusal(o)) is not None:
                raise refusal
        meta = self._check_prepared(o, got)  # reads storage: outside the write transaction
        per, n = meta.rows_per_shard, meta.num_rows
        carried = carried_records(self.db, self.root, o.job.cache_id, n, per)
        with self.db.write() as s:
            o = self._load(s, lease_id)
            refusal = self._refusal(o)
            if refusal is None:
                now = time.time()
                o.shard.status, o.shard.lease_id, o.shard.deadline = "done", None, None
                o.shard.completed_at, o.lease.state = now, "done"
                job = o.job
                job.rows_total, job.shards_total = n, meta.num_shards
                job.seq_len, job.updated_at = meta.seq_len, now
                s.add_all(shard_rows_of(job.id, meta.num_shards, per, n, carried))
                if len(carried) == meta.num_shards:
                    job.status, job.finished_at = "done", now
                log.info("job %s prepared: %d rows, %d shards", job.id, n, meta.num_shards)
                s.flush()
                view = job_of(s, job, self.root)
        if refusal is not None:
            raise refusal
        return view

    def complete(self, lease_id: str, rec: ShardRecord) -> Job:
        """Record a written shard and publish its completion record into the cache.

        Idempotent: the same lease completing again with the same checksums (its first answer
        was lost) gets the job back, not a conflict.
        """
        with self.db.read() as s:
            o = self._load(s, lease_id, lock=False)
            if o.lease.state == "done" and (o.shard.record or {}).get("checksums") == rec.checksums:
                return job_of(s, o.job, self.root)
            if (refusal := self._refusal(o)) is not None:
                raise refusal
        self._check_record(o, rec)  # reads the cache: outside the write transaction
        record = rec
        try:
            with self.db.write() as s:
                o = self._load(s, lease_id)
                refusal = self._refusal(o)
                if refusal is None:
                    self._mark_done(s, o, record, time.time())
                    # Published inside the transaction: a failed write rolls the completion back.
                    write_record(open_storage(self.cache_url(o.job.cache_id)), record)
                    view = job_of(s, o.job, self.root)
        except OSError as err:
            raise self._unpublished(lease_id, record.shard, err) from err
        if refusal is not None:
            raise refusal
        return view

    def _unpublished(self, lease_id: str, shard: int, err: OSError) -> ServiceError:
        """The record could not be written (a full disk, a lost mount): count a failed attempt
        so the job is retried or failed, never left running with nobody on the shard."""
        full = err.errno in (errno.ENOSPC, errno.EDQUOT)
        what = "the storage root is full" if full else "the storage root cannot be written"
        message = f"cannot publish the record of shard {shard}: {what} ({err.strerror or err})"
        log.error("%s", message)
        try:
            self.fail(lease_id, message, retryable=True)
        except ServiceError:  # the lease moved on meanwhile; nothing to count
            pass
        cls = InsufficientStorage if full else Unavailable
        return cls(message)

    def _mark_done(self, s: Session, o: _Owned, record: ShardRecord, now: float) -> None:
        o.shard.status, o.shard.lease_id, o.shard.deadline = "done", None, None
        o.shard.record = asdict(record)
        o.shard.tokens, o.shard.completed_at = record.tokens, now
        o.lease.state = "done"
        o.job.updated_at = now
        s.flush()
        left = s.scalars(
            select(ShardRow.shard)
            .where(ShardRow.job_id == o.job.id, ShardRow.status != "done")
            .limit(1)
        ).first()
        if left is None:
            o.job.status, o.job.finished_at = "done", now
            log.info("job %s done", o.job.id)

    def fail(
        self, lease_id: str, message: str, retryable: bool = True, *, release: bool = False
    ) -> Job:
        """A worker gave up on its shard: retry it, or fail the job with the message.

        ``release``: the worker is stopping, not failing; the shard goes back to the queue and
        no attempt is counted, so preemptions never fail a job.
        """
        now = time.time()
        with self.db.write() as s:
            o = self._load(s, lease_id)
            refusal = self._refusal(o)
            if refusal is None:
                o.lease.state = "failed"
                self._release(o.shard)
                o.job.updated_at = now
                text = message.strip() or "(no message)"
                unit = _unit(o.shard.shard)
                if release:
                    log.info("job %s %s released: %s", o.job.id, unit, text[:200])
                elif retryable:
                    o.shard.attempts += 1
                    log.warning("job %s %s failed: %s", o.job.id, unit, text[:200])
                if not release and (not retryable or o.shard.attempts >= self.max_attempts):
                    self._fail_job(o.job, f"{unit}: {text}", now)
                view = job_of(s, o.job, self.root)
        if refusal is not None:
            raise refusal
        return view
