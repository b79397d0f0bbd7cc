"""The lease loop: a worker claims shards from the service, computes and writes them, reports back.

One worker per GPU, several per machine, all writing to the storage root directly::

    claim (POST /v1/leases) -> 204: sleep, claim again (exit after ``max_idle`` idle seconds)
                            -> 200 Lease: load the job's teacher (once per job), compute the
                               shard, write every array's shard, POST complete (the service
                               publishes the completion record); heartbeat meanwhile

A heartbeat answering ``lease_lost`` or ``job_cancelled`` abandons the shard at the next batch
boundary (the service has given it to someone else, or nobody wants it); it is never completed.
Bad jobs (:class:`DatasetError`, :class:`SpecError`, :class:`TeacherError`) fail the lease for
good; anything else fails it retryably, and the worker goes on. ``stop_event`` (the CLI's first
SIGTERM) finishes the current shard and returns; ``abort_event`` (a second SIGTERM, or the first
with ``--release-on-term``) hands the current shard back to the queue and returns.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from kdcache.core.errors import (
    Conflict,
    DatasetError,
    Forbidden,
    ManifestMismatchError,
    ServiceError,
    SpecError,
    TeacherError,
    Unauthorized,
)
from kdcache.core.layout import cache_url
from kdcache.core.leaseplan import plan_of_lease
from kdcache.core.prepared import PreparedRows, prepared_url
from kdcache.core.resolve import JobPlan
from kdcache.core.rest import ServiceLink
from kdcache.core.retry import RetryPolicy
from kdcache.core.shards import ShardRecord
from kdcache.core.spec import JobSpec, parse_spec
from kdcache.core.storage import open_storage
from kdcache.core.wire import Lease
from kdcache.core.writer import CacheWriter
from kdcache.worker.prepare import prepare_documents
from kdcache.worker.runner import PreparedJob, ShardRunner, prepare_job
from kdcache.worker.teachers import FeatureOutput, FusedTeacher, Teacher, TeacherOutput

__all__ = ["WorkerStats", "run_worker"]

log = logging.getLogger(__name__)

_PERMANENT = (DatasetError, SpecError, TeacherError)
_MAX_MESSAGE = 20_000  # the service caps error messages; keep the head, where the cause is


@dataclass
class WorkerStats:
    """What a worker did: shards completed, failed, abandoned (lost/cancelled) or released."""

    completed: int = 0
    failed: int = 0
    abandoned: int = 0
    released: int = 0
    rows: int = 0
    exit_reason: str = ""
    outcomes: list[str] = field(default_factory=list)


class _ShardAbandoned(Exception):
    """Private signal: stop computing this shard (lease lost, job cancelled or worker aborting)."""


class _Heartbeat(threading.Thread):
    """Extends a lease every ``lease_seconds / 3``; sets ``lost`` (the error code) when refused."""

    def __init__(self, service: ServiceLink, lease: Lease) -> None:
        super().__init__(name=f"kdcache-heartbeat-{lease.shard}", daemon=True)
        self.service, self.lease = service, lease
        self.lost: str | None = None
        self.lost_event = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = max(0.1, self.lease.lease_seconds / 3)
        while not self._stop_event.wait(interval):
            if not self.beat():
                return

    def beat(self) -> bool:
        """One heartbeat now; False once the lease is lost (then ``lost`` says why)."""
        if self.lost_event.is_set():
            return False
        try:
            resp = self.service.post(f"/v1/leases/{self.lease.id}/heartbeat", retry=False)
        except Conflict as err:
            self.lost = err.code
            self.lost_event.set()
            return False
        except ServiceError as err:  # the next beat tries again; the service decides
            log.warning("heartbeat of shard %d failed: %s", self.lease.shard, err)
            return True
        if bool(resp.json().get("cancelled")):
            self.lost = "job_cancelled"
            self.lost_event.set()
            return False
        return True

    def stop(self) -> None:
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)


class _GuardedTeacher:
    """A teacher that refuses the next batch once ``should_stop()`` (abandon between batches)."""

    def __init__(self, inner: Teacher, should_stop: Callable[[], bool]) -> None:
        self.inner, self.should_stop = inner, should_stop
        self.vocab_size = inner.vocab_size
        self.num_layers = inner.num_layers
        self.hidden_size = inner.hidden_size
        self.max_positions = inner.max_positions
        self.dtype = inner.dtype
        self.device = inner.device
        self.description = inner.description
        self.head = inner.head if isinstance(inner, FusedTeacher) else None

    def forward(self, ids: torch.Tensor, layers: Sequence[int]) -> TeacherOutput:
        if self.should_stop():
            raise _ShardAbandoned
        return self.inner.forward(ids, layers)

    def forward_features(self, ids: torch.Tensor, layers: Sequence[int]) -> FeatureOutput:
        if self.should_stop():
            raise _ShardAbandoned
        assert isinstance(self.inner, FusedTeacher)  # self.head is None otherwise
        return self.inner.forward_features(ids, layers)


def _checked_plan(lease: Lease, spec: JobSpec) -> JobPlan | None:
    """The service's plan of the lease's job when this host's files are the ones it hashed;
    None (resolve here, hashing the files) otherwise or for a lease without a plan."""
    return None if lease.plan is None else plan_of_lease(spec, lease.plan)


class _JobCache:
    """The last job's loaded teacher and open writer, so a teacher loads once per job."""

    def __init__(self, device: str | None, root_override: str | None) -> None:
        self.device, self.root_override = device, root_override
        self.job_id: str | None = None
        self.entry: tuple[PreparedJob, CacheWriter] | None = None

    def url(self, lease: Lease) -> str:
        """Where this worker writes the lease's cache."""
        if self.root_override:
            return cache_url(self.root_override, lease.cache_id)
        return lease.cache_url

    def get(self, lease: Lease) -> tuple[PreparedJob, CacheWriter]:
        if self.entry is not None and self.job_id == lease.job_id:
            return self.entry
        if self.entry is not None:  # free the previous teacher before loading the next
            self.entry = self.job_id = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        spec = parse_spec(lease.spec)
        if self.device:  # "cuda:0,cuda:1": one replica over those GPUs
            dev: str | list[str] = self.device.split(",") if "," in self.device else self.device
            spec = spec.model_copy(
                update={"teacher": spec.teacher.model_copy(update={"device": dev})}
            )
        log.info("loading job %s (cache %s)", lease.job_id, lease.cache_id)
        url = self.url(lease)
        # A document job's rows were tokenised once by its prepare lease and stored with the cache.
        source = PreparedRows(open_storage(prepared_url(url))) if spec.dataset.documents else None
        job = prepare_job(spec, plan=_checked_plan(lease, spec), source=source)
        if job.manifest.cache_id != lease.cache_id:
            raise ManifestMismatchError(
                f"this worker resolves job {lease.job_id} to cache {job.manifest.cache_id}, the "
                f"service to {lease.cache_id}: its teacher or dataset files differ here"
            )
        writer = CacheWriter.open(url, job.manifest)
        self.entry, self.job_id = (job, writer), lease.job_id
        return self.entry


def _compute_and_write(
    lease: Lease,
    jobs: _JobCache,
    should_stop: Callable[[], bool],
    still_owner: Callable[[], bool],
) -> ShardRecord:
    job, writer = jobs.get(lease)
    want = job.manifest.shard_rows(lease.shard)
    if want != (lease.start, lease.end):
        raise ManifestMismatchError(
            f"lease of shard {lease.shard} covers rows {lease.start}..{lease.end}, the cache's "
            f"shard is rows {want[0]}..{want[1]}"
        )
    runner = ShardRunner(replace(job, teacher=_GuardedTeacher(job.teacher, should_stop)), writer)
    data = runner.compute(lease.shard)
    # Ask the service right before writing: a lease that expired during a long compute may
    # belong to another worker now, whose arrays must not be overwritten.
    if should_stop() or not still_owner():
        raise _ShardAbandoned
    return runner.write(lease.shard, data, commit=False)


def _prepare(lease: Lease, jobs: _JobCache, should_stop: Callable[[], bool]) -> dict[str, Any]:
    """Tokenise a document job's dataset beside its cache; the complete body (raises
    _ShardAbandoned when stopped)."""
    spec = parse_spec(lease.spec)
    meta = prepare_documents(
        spec,
        open_storage(prepared_url(jobs.url(lease))),
        lease.cache_id,
        should_stop=should_stop,
        plan=_checked_plan(lease, spec),
    )
    if meta is None or should_stop():
        raise _ShardAbandoned
    return {"prepared": {"num_rows": meta.num_rows, "seq_len": meta.seq_len}}


def _work(service: ServiceLink, jobs: _JobCache, lease: Lease, abort: threading.Event) -> str:
    """Run one lease to its end; returns completed | failed | abandoned | released."""
    beat = _Heartbeat(service, lease)
    beat.start()
    t0 = time.perf_counter()
    fail: dict[str, Any] | None = None
    record: ShardRecord | None = None
    done: dict[str, Any] | None = None  # the body of POST complete
    should_stop = lambda: beat.lost_event.is_set() or abort.is_set()  # noqa: E731
    try:
        if lease.kind == "prepare":
            done = _prepare(lease, jobs, should_stop)
        else:
            record = _compute_and_write(lease, jobs, should_stop, beat.beat)
            done = {"record": asdict(record)}
    except _ShardAbandoned:
        pass
    except _PERMANENT as err:
        log.error("shard %d of job %s: %s", lease.shard, lease.job_id, err)
        fail = {"message": str(err)[:_MAX_MESSAGE], "retryable": False}
    except Exception as err:  # any other failure may be this machine's: let another worker retry
        log.exception("shard %d of job %s failed", lease.shard, lease.job_id)
        fail = {"message": f"{type(err).__name__}: {err}"[:_MAX_MESSAGE], "retryable": True}
    finally:
        beat.stop()
    if beat.lost is not None:
        log.warning("abandoned shard %d of job %s: %s", lease.shard, lease.job_id, beat.lost)
        return "abandoned"
    if done is None:
        outcome = "failed" if fail is not None else "released"
        if fail is None:  # the worker itself is stopping: hand the shard back to the queue
            fail = {
                "message": f"released by worker {os.getpid()} (stopping)",
                "retryable": True,
                "release": True,
            }
            log.warning("releasing shard %d of job %s", lease.shard, lease.job_id)
        try:
            service.post(f"/v1/leases/{lease.id}/fail", json=fail)
        except ServiceError as err:
            log.warning("fail of shard %d: %s", lease.shard, err)
        return outcome
    # Retried for as long as the link's policy says (default: until the service is back): the
    # shard is written, only its completion is missing.
    try:
        service.post(f"/v1/leases/{lease.id}/complete", json=done)
    except Conflict as err:
        log.warning("shard %d of job %s: %s at complete", lease.shard, lease.job_id, err.code)
        return "abandoned"
    except ServiceError as err:
        log.error("complete of shard %d: %s", lease.shard, err)
        return "failed"
    seconds = time.perf_counter() - t0
    if record is None:
        log.info("prepared job %s: %s in %.2fs", lease.job_id, done.get("prepared"), seconds)
        return "completed"
    log.info(
        "completed shard %d of job %s: %d rows in %.2fs (%.0f tokens/s)",
        lease.shard,
        lease.job_id,
        record.rows,
        seconds,
        record.tokens / seconds if seconds > 0 else 0.0,
    )
    return "completed"


def _claim(
    service: ServiceLink, worker_id: str, job_id: str | None, stop: threading.Event
) -> Lease | None:
    """The next lease, None when there is no work; a stopping worker stops waiting for the
    service."""
    try:
        resp = service.post(
            "/v1/leases", json={"worker": worker_id, "job_id": job_id}, interrupt=[stop]
        )
    except (Unauthorized, Forbidden) as err:
        raise type(err)(
            f"{service.server} refused the worker ({err.status}): set KDCACHE_TOKEN (or "
            "--token) to the service's worker token",
            code=err.code,
            body=err.body,
        ) from None
    if resp.status_code == 204:
        return None
    return Lease.model_validate(resp.json())


def run_worker(
    server: str,
    *,
    token: str | None = None,
    worker_id: str | None = None,
    device: str | None = None,
    root_override: str | None = None,
    job_id: str | None = None,
    poll_interval: float = 2.0,
    max_idle: float | None = None,
    once: bool = False,
    stop_event: threading.Event | None = None,
    abort_event: threading.Event | None = None,
    retry_for: float | None = None,
) -> WorkerStats:
    """Claim and run shards until stopped, idle for ``max_idle`` s, or (``once``) one lease.

    ``device`` overrides the spec's teacher device (one worker per GPU: ``cuda:N``);
    ``root_override`` writes to ``<root>/caches/<cache_id>`` instead of the lease's cache URL
    (the same storage mounted elsewhere). While the service is away (restarting, unreachable,
    answering 5xx) every call is retried with backoff for ``retry_for`` seconds (None: for as
    long as it takes; a computed shard waits to be completed). Raises :class:`ServiceError`
    when that runs out, or when the service refuses the token.
    """
    stop = stop_event or threading.Event()
    abort = abort_event or threading.Event()
    worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{device or 'auto'}"
    stats = WorkerStats()
    service = ServiceLink(server, token, retry=RetryPolicy(seconds=retry_for), interrupt=[abort])
    jobs = _JobCache(device, root_override)
    idle_since = time.monotonic()
    log.info("worker %s polling %s", worker_id, service.server)
    try:
        while True:
            if abort.is_set() or stop.is_set():
                stats.exit_reason = "stopped"
                break
            try:
                lease = _claim(service, worker_id, job_id, stop)
            except ServiceError:
                if stop.is_set() or abort.is_set():  # told to stop while the service was away
                    stats.exit_reason = "stopped"
                    break
                raise
            if lease is None:
                idle = time.monotonic() - idle_since
                if once or (max_idle is not None and idle >= max_idle):
                    stats.exit_reason = "idle"
                    break
                left = poll_interval if max_idle is None else min(poll_interval, max_idle - idle)
                stop.wait(max(0.0, left))
                continue
            log.info(
                "leased %s %d (rows %d..%d) of job %s, attempt %d",
                lease.kind,
                lease.shard,
                lease.start,
                lease.end,
                lease.job_id,
                lease.attempt,
            )
            outcome = _work(service, jobs, lease, abort)
            stats.outcomes.append(outcome)
            setattr(stats, outcome, getattr(stats, outcome) + 1)
            if outcome == "completed" and lease.kind == "shard":
                stats.rows += lease.end - lease.start
            idle_since = time.monotonic()
            if once:
                stats.exit_reason = "once"
                break
    finally:
        service.close()
    log.info(
        "worker %s exits (%s): %d completed, %d failed, %d abandoned, %d released",
        worker_id,
        stats.exit_reason,
        stats.completed,
        stats.failed,
        stats.abandoned,
        stats.released,
    )
    return stats
