"""The slow set of issue 11: many worker SIGKILLs in one job, and a service SIGKILL + restart
mid-job. Each ends with a cache byte-identical (every shard object) to the embedded run's."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fleet_helpers import Fleet, assert_same_cache, embedded_cache, slow_spec, wait_for

from kdcache.core.layout import shard_key
from kdcache.core.reader import CacheReader

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = 10


def assert_same_bytes(got: str, want: str) -> None:
    """Every array's shard objects hold the same bytes in both caches."""
    a = CacheReader(got)
    for spec in a.manifest.arrays():
        ndim = 1 + len(spec.row_shape)
        for shard in range(a.manifest.num_shards):
            key = shard_key(spec.name, shard, ndim)
            assert (Path(got) / key).read_bytes() == (Path(want) / key).read_bytes(), key


def test_ten_worker_kills_in_one_job(
    fleet_factory: Callable[..., Fleet], slow_tokens: Path, tmp_path: Path
) -> None:
    fleet = fleet_factory(sleep=0.2)
    spec = slow_spec(slow_tokens, rows_per_shard=2)  # 6 shards of 2 rows
    job = fleet.submit(spec)
    killed = 0
    for _ in range(KILLS):
        for marker in fleet.markers.iterdir():
            marker.unlink()
        proc = fleet.worker(max_idle=60)
        marker = fleet.markers / str(proc.pid)
        wait_for(marker.exists, 120, f"worker {proc.pid} to start a shard", fleet.all_logs)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed += 1
    assert fleet.job(job["id"])["status"] == "running"
    for _ in range(2):
        fleet.worker(max_idle=5)
    done = fleet.wait_job(job["id"], timeout=300)
    print(f"worker SIGKILLs survived: {killed}; job {done['status']}")
    want = embedded_cache(spec, tmp_path / "embedded")
    got = str(fleet.root / "caches" / job["cache_id"])
    assert_same_cache(got, want)
    assert_same_bytes(got, want)


def _serve(fleet: Fleet, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "kdcache.cli", "serve", "--root", str(fleet.root)]
    return fleet._spawn([*cmd, "--port", str(port)], log)


def test_service_sigkill_and_restart_mid_job(
    fleet_factory: Callable[..., Fleet], slow_tokens: Path, tmp_path: Path
) -> None:
    """The service dies while a worker computes; it stays away longer than a lease; the worker
    keeps its shard, waits, and completes it when the service is back on the same port."""
    fleet = fleet_factory(sleep=0.5)
    spec = slow_spec(slow_tokens, rows_per_shard=4)  # 3 shards of 4 rows, ~2 s each
    job = fleet.submit(spec)
    worker = fleet.worker(max_idle=30)
    wait_for((fleet.markers / str(worker.pid)).exists, 120, "a shard started", fleet.all_logs)
    assert fleet.service is not None
    fleet.service.send_signal(signal.SIGKILL)
    fleet.service.wait(timeout=30)
    down_at = time.monotonic()
    outage = 8.0  # > the 2 s lease: the worker's shard is computed while nobody answers
    time.sleep(outage)
    assert worker.poll() is None, fleet.log_of(worker)  # still waiting for the service
    port = int(fleet.url.rsplit(":", 1)[1])
    fleet.service = _serve(fleet, port, fleet.logs / "service-restarted.log")
    wait_for(fleet._healthy, 60, "the restarted service", fleet.all_logs)
    survived = time.monotonic() - down_at
    done = fleet.wait_job(job["id"], timeout=300)
    assert fleet.wait_exit(worker, timeout=120) == 0, fleet.log_of(worker)
    log = fleet.log_of(worker)
    assert "3 shards completed" in log and "0 abandoned" in log, log  # the kept shard counted
    print(f"service outage survived: {survived:.1f} s; job {done['status']}")
    want = embedded_cache(spec, tmp_path / "embedded")
    got = str(fleet.root / "caches" / job["cache_id"])
    assert_same_cache(got, want)
    assert_same_bytes(got, want)
