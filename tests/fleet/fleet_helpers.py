"""Helpers of the fleet tests: a real ``kdcache serve`` (uvicorn) on 127.0.0.1 and real worker
subprocesses (:class:`Fleet`), a deliberately slow module teacher, embedded reference caches.

Every wait is bounded and fails with the process logs; ``Fleet.close`` kills every process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _net import free_port

from kdcache.core.reader import CacheReader

SLOW_VOCAB = 64
LEASE_SECONDS = 2

# ids (B, T) -> (logits (B, T, V), hidden_states [emb, block 1]); sleeps per forward and leaves a
# marker file per process, so a test knows a worker is in the middle of a shard.
SLOW_TEACHER = """
import os, time
from pathlib import Path

import torch
from torch import nn


class SlowTeacher(nn.Module):
    vocab_size, hidden_size, num_layers = 64, 16, 1

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 16)
        self.block = nn.Linear(16, 16)
        self.head = nn.Linear(16, 64)

    def forward(self, ids):
        markers = os.environ.get("KDCACHE_TEST_MARKERS")
        if markers:
            Path(markers, str(os.getpid())).touch()
        time.sleep(float(os.environ.get("KDCACHE_TEST_SLEEP", "0")))
        h0 = self.emb(ids) * 2.0
        h1 = torch.tanh(self.block(h0))
        return self.head(h1) * 3.0, (h0, h1)


def make():
    return SlowTeacher()
"""


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


def wait_for(
    cond: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str] = str
) -> Any:
    """Poll ``cond`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs()}")
        time.sleep(0.1)


@dataclass
class Fleet:
    """A running service plus the workers a test starts; ``close`` kills them all."""

    root: Path
    logs: Path
    env: dict[str, str]
    url: str = ""
    service: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_files: dict[int, Path] = field(default_factory=dict)

    @property
    def markers(self) -> Path:
        """Where the slow teacher leaves one file per process that ran a forward."""
        return Path(self.env["KDCACHE_TEST_MARKERS"])

    def cache_url(self, cache_id: str) -> str:
        return f"{self.url}/v1/caches/{cache_id}"

    def start(self, timeout: float = 30.0) -> Fleet:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = self.logs / "service.log"
        cmd = [sys.executable, "-m", "kdcache.cli", "serve", "--root", str(self.root)]
        self.service = self._spawn([*cmd, "--port", str(port)], log)
        wait_for(self._healthy, timeout, f"the service at {self.url}", self.all_logs)
        return self

    def _healthy(self) -> bool:
        assert self.service is not None
        if self.service.poll() is not None:
            pytest.fail(f"the service exited with {self.service.returncode}\n{self.all_logs()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        self.log_files[proc.pid] = log
        return proc

    def worker(self, *extra: str, max_idle: float = 3.0) -> subprocess.Popen[bytes]:
        n = len(self.workers)
        cmd = [sys.executable, "-m", "kdcache.cli", "worker", "--server", self.url]
        cmd += ["--max-idle", str(max_idle), "--poll-interval", "0.2", *extra]
        proc = self._spawn(cmd, self.logs / f"worker-{n}.log")
        self.workers.append(proc)
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        return _tail(self.log_files[proc.pid], 100_000)

    def all_logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(self.logs.glob("*.log")))

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kdcache.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        resp = httpx.post(f"{self.url}/v1/jobs", json=spec, timeout=30.0)
        assert resp.status_code in (200, 201), resp.text
        return dict(resp.json())

    def job(self, job_id: str) -> dict[str, Any]:
        resp = httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=10.0)
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def wait_job(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for a job to end; it must end done."""

        def ended() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job["status"] in ("done", "failed", "cancelled") else None

        job = wait_for(ended, timeout, f"job {job_id} to end", self.all_logs)
        assert job["status"] == "done", f"{job}\n{self.all_logs()}"
        return dict(job)

    def wait_exit(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {proc.pid} still running after {timeout}s\n{self.all_logs()}")

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        if self.service is not None and self.service.poll() is None:
            self.service.send_signal(signal.SIGTERM)
            try:
                self.service.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait(timeout=10)


def fleet_env(module_dir: Path, markers: Path | None = None, sleep: float = 0.0) -> dict[str, str]:
    """The environment of the service and workers: short leases, the slow teacher importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDCACHE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(module_dir), env.get("PYTHONPATH", "")]).strip(
        os.pathsep
    )
    env["KDCACHE_LEASE_SECONDS"] = str(LEASE_SECONDS)
    env["KDCACHE_MAX_ATTEMPTS"] = "5"
    env["KDCACHE_TEACHER_MODULES"] = "fleet_slow_teacher"
    env["KDCACHE_TEST_SLEEP"] = str(sleep)
    if markers is not None:
        env["KDCACHE_TEST_MARKERS"] = str(markers)
    return env


def slow_spec(tokens: Path, rows_per_shard: int = 4) -> dict[str, Any]:
    """A job of the slow teacher: 3 shards of 4 rows, one row per forward."""
    return {
        "name": "slow",
        "teacher": {"module": "fleet_slow_teacher:make", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 1,
        "rows_per_shard": rows_per_shard,
    }


def new_fleet(
    base: Path, module_dir: Path, sleep: float = 0.0, env: dict[str, str] | None = None
) -> Fleet:
    """A fleet (not started) keeping its storage root, logs and markers under ``base``."""
    logs, markers = base / "logs", base / "markers"
    logs.mkdir(parents=True, exist_ok=True)
    markers.mkdir(parents=True, exist_ok=True)
    full_env = {**fleet_env(module_dir, markers, sleep), **(env or {})}
    return Fleet(root=base / "root", logs=logs, env=full_env)


def embedded_cache(spec: dict[str, Any], root: Path, *, threads: int | None = None) -> str:
    """The cache ``kdcache run`` makes of ``spec`` (in this process), as a directory.

    ``threads``: torch's intra-op threads for the run, to match workers started with
    ``OMP_NUM_THREADS``: a float32 sum over the vocabulary split over another number of threads
    rounds differently in the last bit, so bit-equal caches need the same thread count.
    """
    import torch

    from kdcache.core.spec import parse_spec
    from kdcache.worker.runner import run_job

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return run_job(parse_spec(spec), root)
    finally:
        torch.set_num_threads(before)


def assert_same_cache(got: str, want: str) -> None:
    """Two caches hold the same manifest, completed shards and arrays, value for value."""
    a, b = CacheReader(got), CacheReader(want)
    assert a.manifest == b.manifest
    assert a.is_complete and b.is_complete
    ca, cb = a.completed(), b.completed()
    assert sorted(ca) == sorted(cb)
    for s in ca:
        assert ca[s].checksums == cb[s].checksums, f"shard {s} checksums differ"
    for spec in a.manifest.arrays():
        x, y = a.read(spec.name, slice(None)), b.read(spec.name, slice(None))
        assert x.dtype == y.dtype and x.shape == y.shape, spec.name
        np.testing.assert_array_equal(x, y, err_msg=spec.name)
    assert [c for c in a.verify() if not c.ok] == []


def records_by_writer(cache_dir: str) -> dict[int, int]:
    """Completed shard -> pid of the worker that wrote it."""
    shards = Path(cache_dir) / "_kdcache" / "shards"
    out = {}
    for f in shards.glob("*.json"):
        rec = json.loads(f.read_text())
        out[int(rec["shard"])] = int(rec["writer"]["pid"])
    return out
