"""``kdcache slurm`` on a real one-node Slurm cluster (slurmctld, slurmd, munge).

``make test-slurm`` (scripts/test_slurm.sh) installs and starts the cluster, points
``KDCACHE_TEST_SLURM_CONF`` at its slurm.conf and runs this module; elsewhere it is skipped.
A job of the slow teacher runs on an array of two CPU workers; one array task is requeued with
``scontrol requeue`` (what a preemption in REQUEUE mode does: SIGTERM, back in the queue, started
again), the other is cancelled with ``scancel`` while it holds a shard; the job still finishes,
and the cache equals the embedded run byte for byte.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from fleet_helpers import Fleet, assert_same_cache, embedded_cache, slow_spec, wait_for

from kdcache.core.reader import CacheReader
from kdcache.worker import toy

SLURM_CONF = os.environ.get("KDCACHE_TEST_SLURM_CONF", "")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not SLURM_CONF, reason="needs the cluster of `make test-slurm`"),
]


def _slurm(*cmd: str) -> str:
    env = {**os.environ, "SLURM_CONF": SLURM_CONF}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{' '.join(cmd)}: {res.stderr}"
    return res.stdout


def _tasks(array_id: str) -> dict[str, str]:
    """Array task id -> state, for the tasks Slurm still knows about (pending/running)."""
    out = _slurm("squeue", "-h", "-r", "-j", array_id, "-o", "%K %T")
    return dict(line.split() for line in out.splitlines() if line.strip())


def _log(log_dir: Path, array_id: str, task: int) -> str:
    path = log_dir / f"kdcache-worker-{array_id}_{task}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def _holds_a_shard(text: str) -> bool:
    return text.count("leased shard") > text.count("completed shard")


def test_array_of_workers_survives_requeue_and_scancel(
    fleet_factory: Callable[..., Fleet], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Both tasks compute; task 0 is requeued (SIGTERM, back in the queue), task 1 scancelled
    while it holds a shard; task 0 starts again and finishes the job alone."""
    fleet = fleet_factory(sleep=0.5)
    fleet.env["SLURM_CONF"] = SLURM_CONF
    tokens = toy.make_tokens(tmp_path / "tokens.npy", 24, 8, 64, seed=3)
    spec = slow_spec(tokens, rows_per_shard=2)  # 12 shards of 2 rows, 0.5 s a row
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    log_dir = tmp_path / "slurm-logs"

    # --wait: the command stays to show progress until the job ends, then prints the cache URL
    out_file = tmp_path / "kdcache-slurm.out"
    with open(out_file, "wb") as out:
        submitter = subprocess.Popen(
            [sys.executable, "-m", "kdcache.cli", "slurm", str(job_file), "--server", fleet.url,
             "--gpus", "2", "--cpu", "--cpus-per-task", "1", "--max-idle", "5",
             "--log-dir", str(log_dir), "--wait", "--timeout", "600"],
            env=fleet.env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    request.addfinalizer(submitter.kill)
    submitted = wait_for(
        lambda: re.search(r"submitted Slurm array (\d+): 2 CPU workers", out_file.read_text()),
        60,
        "kdcache slurm to submit the array",
        lambda: out_file.read_text() + fleet.all_logs(),
    )
    array = submitted.group(1)
    job_id = out_file.read_text().split("job ", 1)[1].split()[0]

    def log(task: int) -> str:
        return _log(log_dir, array, task)

    def logs() -> str:
        return "\n".join(f"--- task {t}\n{log(t)[-3000:]}" for t in (0, 1)) + fleet.all_logs()

    wait_for(
        lambda: _holds_a_shard(log(0)) and _holds_a_shard(log(1)),
        180,
        "both array tasks to hold a shard",
        logs,
    )
    assert fleet.job(job_id)["shards_done"] < 6
    # Task 0 is requeued as a preemption in REQUEUE mode does it: SIGTERM to the batch shell,
    # back to the queue, started again later (--requeue makes that allowed).
    _slurm("scontrol", "requeue", f"{array}_0")
    wait_for(lambda: "worker done (stopped)" in log(0), 60, "the requeued worker to stop", logs)
    wait_for(lambda: _holds_a_shard(log(1)), 60, "task 1 to hold a shard", logs)
    _slurm("scancel", f"{array}_1")
    # Slurm holds a requeued job back for two minutes; the admin may let it start now
    wait_for(lambda: _tasks(array).get("0") == "PENDING", 60, "task 0 pending again", logs)
    _slurm("scontrol", "update", f"JobId={array}_0", "StartTime=now")

    assert submitter.wait(timeout=300) == 0, out_file.read_text() + logs()
    printed = out_file.read_text().strip().splitlines()
    assert any("done, 24/24 rows" in line for line in printed), printed
    job = fleet.wait_job(job_id, timeout=10)
    assert printed[-1] == fleet.cache_url(job["cache_id"])
    wait_for(lambda: not _tasks(array), 120, "the array to end", logs)

    text = log(0)
    # --requeue, exec and Slurm's SIGTERM: the worker stopped, and a new one took over
    assert "SIGTERM: releasing the current shard" in text, logs()
    first, again = text.split("DUE TO JOB REQUEUE", 1)
    assert "restart 0)" in first and "restart 1)" in again, logs()
    assert re.search(r"worker done \(idle\): [1-9]\d* shards completed", again), logs()
    cancelled = log(1)
    released = r"worker done \(stopped\): \d+ shards completed, 0 failed, 0 abandoned, 1 released"
    assert re.search(released, cancelled) and "CANCELLED" in cancelled, logs()
    assert "restart 1)" not in cancelled  # scancel is final: no requeue
    assert job["shards_done"] == 12 and job["rows_done"] == 24

    # the same spec again: the job is found done, and no more workers are submitted
    again_res = fleet.cli("slurm", str(job_file), "--server", fleet.url, "--gpus", "2", "--cpu")
    assert again_res.returncode == 0, again_res.stdout + again_res.stderr
    assert f"job {job_id} is done: no workers submitted" in again_res.stdout
    assert _slurm("squeue", "-h").strip() == ""

    got = str(fleet.root / "caches" / job["cache_id"])
    want = embedded_cache(spec, tmp_path / "embedded")
    assert_same_cache(got, want)
    a, b = CacheReader(got), CacheReader(want)
    for array_spec in a.manifest.arrays():
        x = np.ascontiguousarray(a.read(array_spec.name, slice(None)))
        y = np.ascontiguousarray(b.read(array_spec.name, slice(None)))
        assert x.tobytes() == y.tobytes(), array_spec.name
