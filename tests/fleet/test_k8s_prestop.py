"""The worker Deployment's preStop hook (docker/k8s/worker.yaml), run against a real worker.

The hook's own command runs, with the worker's pid for PID 1 and its sleep shortened: the first
SIGTERM lets the worker go on with its shard, the second hands the shard back, and the worker
exits 0 long before a kubelet would kill it. Another worker then completes the job.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fleet_helpers import Fleet, slow_spec, wait_for

pytestmark = pytest.mark.integration

WORKER_YAML = Path(__file__).resolve().parents[2] / "docker" / "k8s" / "worker.yaml"


def _prestop(pid: int, sleep: float) -> list[str]:
    (deploy,) = [d for d in yaml.safe_load_all(WORKER_YAML.read_text()) if d]
    command = deploy["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"]["exec"]
    shell, flag, script = command["command"]
    script = re.sub(r"\b1\b(?=;|$)", str(pid), script)  # PID 1 in the pod is the worker
    script = re.sub(r"sleep \d+", f"sleep {sleep}", script)
    return [shell, flag, script]


def test_prestop_lets_the_worker_release_its_shard(
    fleet_factory: Callable[..., Fleet], slow_tokens: Path
) -> None:
    fleet = fleet_factory(sleep=0.6)  # 2.4 s per shard of 4 rows
    job = fleet.submit(slow_spec(slow_tokens))
    worker = fleet.worker(max_idle=30)
    fleet.worker(max_idle=3)  # starts beside it (imports take a while), completes the job
    wait_for(
        lambda: (fleet.markers / str(worker.pid)).exists(),
        120,
        "a forward of the worker",
        fleet.all_logs,
    )
    hook = _prestop(worker.pid, 0.8)
    assert hook[2] == f"kill -TERM {worker.pid}; sleep 0.8; kill -TERM {worker.pid}"
    subprocess.run(hook, check=True, timeout=30)
    assert fleet.wait_exit(worker, timeout=60) == 0
    out = fleet.log_of(worker)
    assert "finishing the current shard" in out and "releasing the current shard" in out, out
    assert re.search(r"0 shards completed, 0 failed, 0 abandoned, 1 released", out), out

    done = fleet.wait_job(job["id"], timeout=120)
    assert done["shards_done"] == 3
