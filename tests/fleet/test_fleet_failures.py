"""Workers that die or are stopped mid-shard: the job still completes with the embedded cache's
bytes, and readers never see rows of a shard that is not complete."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fleet_helpers import (
    Fleet,
    assert_same_cache,
    embedded_cache,
    records_by_writer,
    slow_spec,
    wait_for,
)

from kdcache.client import TeacherCache
from kdcache.core.errors import KDCacheError, ShardIncompleteError
from kdcache.core.reader import CacheReader
from kdcache.worker.lease import WorkerStats, run_worker

pytestmark = pytest.mark.integration

SLEEP = 0.3  # seconds per forward of one row: a shard of 4 rows takes ~1.2 s


def _mid_shard(fleet: Fleet, proc: subprocess.Popen[bytes], job_id: str) -> None:
    """Wait until ``proc`` runs a teacher forward of ``job_id`` (it holds a lease)."""
    marker = fleet.markers / str(proc.pid)
    wait_for(marker.exists, 60, f"worker {proc.pid} to start a shard", fleet.all_logs)
    assert proc.poll() is None, fleet.log_of(proc)
    assert fleet.job(job_id)["status"] == "running"


class PollingReaders(threading.Thread):
    """Reads every shard over HTTP (TeacherCache) and from the directory (CacheReader) while
    the job runs; a completed shard must give the reference values, any other must refuse."""

    def __init__(self, url: str, directory: Path, reference: str) -> None:
        super().__init__(daemon=True)
        self.url, self.directory = url, directory
        self.ref_cache, self.ref = TeacherCache(reference), CacheReader(reference)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.seen = {"complete": 0, "incomplete": 0}

    def _open(self) -> tuple[TeacherCache, CacheReader] | None:
        try:
            return TeacherCache(self.url), CacheReader(str(self.directory))
        except (KDCacheError, FileNotFoundError):
            return None  # not created yet

    def _check(self, remote: TeacherCache, local: CacheReader) -> None:
        m = self.ref.manifest
        for shard in range(m.num_shards):
            rows = list(range(*m.shard_rows(shard)))
            try:
                got = remote.batch(rows)
            except ShardIncompleteError:
                self.seen["incomplete"] += 1
            else:
                self.seen["complete"] += 1
                want = self.ref_cache.batch(rows)
                bad = [k for k in want if not torch.equal(got[k], want[k])]
                if bad:
                    self.errors.append(f"http: shard {shard} differs in {bad}")
            for spec in m.arrays():
                try:
                    arr = local.read(spec.name, rows)
                except ShardIncompleteError:
                    continue
                if not np.array_equal(arr, self.ref.read(spec.name, rows)):
                    self.errors.append(f"dir: shard {shard} differs in {spec.name}")

    def run(self) -> None:
        readers = None
        while not self.stop.wait(0.2):
            readers = readers or self._open()
            if readers is not None:
                try:
                    self._check(*readers)
                except Exception as err:  # recorded; the test asserts there is none
                    self.errors.append(f"{type(err).__name__}: {err}")


def test_killed_worker_shard_is_redone(
    fleet_factory: Callable[..., Fleet], slow_tokens: Path, tmp_path: Path
) -> None:
    spec = slow_spec(slow_tokens)
    reference = embedded_cache(spec, tmp_path / "embedded")
    fleet = fleet_factory(sleep=SLEEP)
    job = fleet.submit(spec)
    directory = fleet.root / "caches" / job["cache_id"]
    readers = PollingReaders(fleet.cache_url(job["cache_id"]), directory, reference)
    readers.start()
    try:
        victim = fleet.worker()
        _mid_shard(fleet, victim, job["id"])
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        survivor = fleet.worker(max_idle=1.5)
        done = fleet.wait_job(job["id"], timeout=90)
        assert fleet.wait_exit(survivor) == 0, fleet.log_of(survivor)
    finally:
        readers.stop.set()
        readers.join(timeout=30)
    assert done["shards_done"] == 3
    # the victim completed nothing: its shard was redone after its lease expired
    assert set(records_by_writer(str(directory)).values()) == {survivor.pid}
    assert_same_cache(str(directory), reference)
    assert readers.errors == []
    assert readers.seen["incomplete"] > 0, readers.seen


def test_sigterm_finishes_or_releases_the_shard(
    fleet_factory: Callable[..., Fleet], slow_tokens: Path, tmp_path: Path
) -> None:
    """First SIGTERM: the worker finishes its shard and exits 0. With --release-on-term: it gives
    the shard back at the next batch and exits 0. A third worker finishes the job."""
    spec = slow_spec(slow_tokens)
    fleet = fleet_factory(sleep=SLEEP)
    job = fleet.submit(spec)
    directory = str(fleet.root / "caches" / job["cache_id"])
    # each takes one shard: the finisher is stopped at its first, the releaser has 2 left
    finisher, releaser = fleet.worker(), fleet.worker("--release-on-term")
    pending = [finisher, releaser]

    def signal_those_mid_shard() -> bool:
        for proc in [p for p in pending if (fleet.markers / str(p.pid)).exists()]:
            proc.send_signal(signal.SIGTERM)  # at its first forward: in the middle of a shard
            pending.remove(proc)
        return not pending

    wait_for(signal_those_mid_shard, 60, "both workers to start a shard", fleet.all_logs)
    assert fleet.wait_exit(finisher) == 0, fleet.log_of(finisher)
    assert fleet.wait_exit(releaser) == 0, fleet.log_of(releaser)
    closer = run_worker(fleet.url, device="cpu", max_idle=1.5, poll_interval=0.2)  # in-process
    assert (closer.completed, closer.failed) == (2, 0), closer
    fleet.wait_job(job["id"], timeout=10)

    writers = records_by_writer(directory)
    finished, released = fleet.log_of(finisher), fleet.log_of(releaser)
    assert "finishing the current shard" in finished, finished
    assert "1 shards completed" in finished, finished
    assert list(writers.values()).count(finisher.pid) == 1, (writers, finished)
    assert "releasing shard" in released and "1 released" in released, released
    assert releaser.pid not in writers.values(), (writers, released)
    assert list(writers.values()).count(os.getpid()) == 2, writers
    assert_same_cache(directory, embedded_cache(spec, tmp_path / "embedded"))


def test_cancel_abandons_the_shard_in_hand(
    fleet_factory: Callable[..., Fleet],
    slow_tokens: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A heartbeat answering job_cancelled stops the shard between batches; nothing is
    completed and the worker goes on (here: ``once``, so it returns)."""
    fleet = fleet_factory()
    job = fleet.submit(slow_spec(slow_tokens, rows_per_shard=12))  # one shard of 12 forwards
    monkeypatch.setenv("KDCACHE_TEST_SLEEP", str(SLEEP))  # this process runs the worker
    monkeypatch.setenv("KDCACHE_TEST_MARKERS", str(fleet.markers))
    result: list[WorkerStats] = []
    thread = threading.Thread(
        target=lambda: result.append(run_worker(fleet.url, once=True, device="cpu")), daemon=True
    )
    thread.start()
    wait_for((fleet.markers / str(os.getpid())).exists, 60, "the shard to start", fleet.all_logs)
    t0 = time.monotonic()
    resp = httpx.post(f"{fleet.url}/v1/jobs/{job['id']}/cancel", timeout=10)
    assert resp.status_code == 200, resp.text
    thread.join(timeout=30)
    assert not thread.is_alive() and result, "the worker did not return"
    assert result[0].abandoned == 1 and result[0].completed == 0, result[0]
    assert time.monotonic() - t0 < 12 * SLEEP  # stopped before the shard's last forward
    assert fleet.job(job["id"])["status"] == "cancelled"
    assert records_by_writer(str(fleet.root / "caches" / job["cache_id"])) == {}
