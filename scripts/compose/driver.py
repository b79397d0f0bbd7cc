"""The in-test driver of ``scripts/test_compose.sh``: data for the stack, then the job and checks.

``prepare DATA_DIR`` writes the tiny teacher (a random-init Llama), a token array, and a module
teacher wrapping that Llama with a per-forward sleep (``KDCACHE_TEST_SLEEP``) so shards take long
enough to kill a worker in the middle of one.

``run`` (with the stack up; ``docker compose`` finds it through ``COMPOSE_*`` variables):
submits the job over REST, scales to two workers, kills the one in the middle of a shard, waits
for the job, then checks that the killed worker's shard was leased again after its lease expired
and written by the other worker, and that the cache read back through the service and from S3 is
byte-identical, array by array, to an embedded ``kdcache run`` of the same spec here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

log = logging.getLogger("compose-e2e")

T = TypeVar("T")

ROWS, SEQ_LEN, VOCAB, ROWS_PER_SHARD = 64, 32, 320, 4

TEACHER_MODULE = '''"""The compose test's teacher: the tiny Llama beside this file, slowed down."""

import os
import time
from pathlib import Path


def make():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(__file__).with_name("teacher"))
    delay = float(os.environ.get("KDCACHE_TEST_SLEEP", "0"))
    if delay > 0:
        # on the body: kdcache's fused head runs the body alone, never the wrapper's forward
        model.base_model.register_forward_pre_hook(lambda *_: time.sleep(delay))
    return model
'''

LEASED = re.compile(r"leased shard (\d+) .*of job ([0-9a-f]+)")
COMPLETED = re.compile(r"completed shard (\d+) of job ([0-9a-f]+)")


class CheckFailed(Exception):
    """A check of the end-to-end test failed."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)
    log.info("ok: %s", message)


def wait_for(what: str, timeout: float, probe: Callable[[], T | None], every: float = 0.5) -> T:
    """Poll ``probe`` until it returns something other than None; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def spec_for(data: str) -> dict[str, Any]:
    """The job, with its files under ``data`` (/data in the containers, the data dir here)."""
    return {
        "name": "compose-e2e",
        "teacher": {"module": "compose_teacher:make", "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": f"{data}/tokens.npy"},
        "outputs": {
            "topk": 8,
            "temperatures": [1.0, 2.0],
            "hidden_layers": [1, 2],
            "hidden_dtype": "bfloat16",
        },
        "batch_size": 2,
        "rows_per_shard": ROWS_PER_SHARD,
    }


def prepare(data: Path) -> None:
    from kdcache.worker.toy import make_tiny_teacher, make_tokens

    data.mkdir(parents=True, exist_ok=True)
    make_tiny_teacher(data / "teacher", vocab_size=VOCAB, hidden_size=32, num_layers=2)
    make_tokens(data / "tokens.npy", n_rows=ROWS, seq_len=SEQ_LEN, vocab_size=VOCAB)
    (data / "compose_teacher.py").write_text(TEACHER_MODULE)
    # The containers run as an unprivileged user and mount this read-only.
    for p in [data, *data.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    log.info("test data in %s", data)


# -- docker -----------------------------------------------------------------------------------


def docker(*args: str, timeout: float = 120.0, check_rc: bool = True) -> str:
    proc = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check_rc and proc.returncode != 0:
        raise CheckFailed(f"docker {' '.join(args)}: exit {proc.returncode}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def worker_containers() -> list[str]:
    return docker("compose", "ps", "--all", "--quiet", "worker").split()


def in_flight(logs: str, job_id: str) -> int | None:
    """The shard this worker's log shows leased and not completed, if any."""
    current = None
    for line in logs.splitlines():
        if (m := LEASED.search(line)) and m.group(2) == job_id:
            current = int(m.group(1))
        elif (m := COMPLETED.search(line)) and m.group(2) == job_id:
            current = None
    return current


# -- service ----------------------------------------------------------------------------------


@dataclass
class Stack:
    server: str
    admin: str
    read: str
    s3_endpoint: str

    def headers(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def get(self, path: str) -> Any:
        resp = httpx.get(f"{self.server}{path}", headers=self.headers(self.read), timeout=30.0)
        resp.raise_for_status()
        return resp.json() if path.startswith("/v1/") else resp.text

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/jobs/{job_id}"))

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        resp = httpx.post(
            f"{self.server}/v1/jobs", json=spec, headers=self.headers(self.admin), timeout=60.0
        )
        check(resp.status_code == 201, f"POST /v1/jobs -> {resp.status_code} {resp.text[:300]}")
        return dict(resp.json())

    def metric(self, name: str) -> float:
        for line in str(self.get("/metrics")).splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise CheckFailed(f"/metrics has no {name}")


def storage_options(endpoint: str) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "key": os.environ["KDCACHE_S3_ACCESS_KEY"],
        "secret": os.environ["KDCACHE_S3_SECRET_KEY"],
    }


# -- the test ---------------------------------------------------------------------------------


def kill_worker_mid_shard(stack: Stack, job_id: str) -> tuple[str, int]:
    """Wait until both workers are busy and a shard is done; kill one in the middle of a shard."""

    def two_busy() -> list[str] | None:
        job = stack.job(job_id)
        if job["status"] not in ("pending", "running"):
            raise CheckFailed(f"the job ended {job['status']} early: {job.get('error')}")
        ids = worker_containers()
        busy = [c for c in ids if in_flight(docker("logs", c), job_id) is not None]
        return busy if len(ids) == 2 and len(busy) == 2 and job["shards_done"] >= 1 else None

    busy = wait_for("two workers in the middle of shards", 240, two_busy)
    victim = busy[0]
    docker("kill", victim)
    shard = in_flight(docker("logs", victim), job_id)
    if shard is None:
        raise CheckFailed(f"worker {victim[:12]} finished its shard just before it was killed")
    log.info("killed worker %s in the middle of shard %d", victim[:12], shard)
    return victim, shard


def wait_done(stack: Stack, job_id: str, timeout: float) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        job = stack.job(job_id)
        return job if job["status"] in ("done", "failed", "cancelled") else None

    job = wait_for(f"job {job_id} to end", timeout, ended, every=1.0)
    check(job["status"] == "done", f"job ended {job['status']} ({job.get('error')})")
    return job


def assert_identical(name: str, got: Any, want: Any) -> None:
    """Two CacheReaders hold the same manifest, completion checksums and array bytes."""
    check(got.manifest == want.manifest, f"{name}: manifest equals the embedded run's")
    check(got.is_complete, f"{name}: every shard is complete")
    gc, wc = got.completed(), want.completed()
    check(
        sorted(gc) == sorted(wc) and all(gc[s].checksums == wc[s].checksums for s in gc),
        f"{name}: shard checksums equal the embedded run's",
    )
    for spec in want.manifest.arrays():
        a, b = got.read(spec.name, slice(None)), want.read(spec.name, slice(None))
        same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        check(same, f"{name}: {spec.name} {b.shape} {b.dtype} is byte-identical")
    bad = [c for c in got.verify() if not c.ok]
    check(not bad, f"{name}: kdcache verify finds no corrupt shard")


def run(args: argparse.Namespace) -> None:
    from kdcache.client.cache import open_reader
    from kdcache.core.reader import CacheReader
    from kdcache.core.spec import parse_spec
    from kdcache.worker.runner import run_job

    stack = Stack(
        server=args.server,
        admin=os.environ["KDCACHE_ADMIN_TOKEN"],
        read=os.environ["KDCACHE_READ_TOKEN"],
        s3_endpoint=args.s3_endpoint,
    )
    job = stack.submit(spec_for("/data"))
    job_id, cache_id = job["id"], job["cache_id"]
    log.info("submitted job %s (cache %s, %d shards)", job_id, cache_id, job["shards_total"])

    docker("compose", "up", "--detach", "--no-recreate", "--scale", "worker=2", "worker")
    victim, shard = kill_worker_mid_shard(stack, job_id)
    t0 = time.monotonic()
    job = wait_done(stack, job_id, timeout=300)
    log.info("job done %.1fs after the kill: %s", time.monotonic() - t0, json.dumps(job)[:300])

    state = json.loads(docker("inspect", "--format", "{{json .State}}", victim))
    check(
        not state["Running"] and state["ExitCode"] == 137,
        f"the killed worker stayed dead (exit {state['ExitCode']})",
    )
    check(job["shards_done"] == job["shards_total"], f"all {job['shards_total']} shards done")
    check(stack.metric("kdcache_lease_expiries_total") >= 1, "the killed worker's lease expired")
    detail = stack.get(f"/v1/caches/{cache_id}")
    records = {int(r["shard"]): r for r in detail["completed"]}
    writer = str(records[shard]["writer"].get("host", ""))
    check(
        writer != "" and not victim.startswith(writer),
        f"shard {shard} was re-leased and written by the other worker ({writer})",
    )

    os.environ["KDCACHE_TEST_SLEEP"] = "0"  # the embedded reference need not be slow
    reference = run_job(parse_spec(spec_for(str(args.data))), args.embedded)
    embedded = CacheReader(reference)
    served = open_reader(f"{stack.server}/v1/caches/{cache_id}", token=stack.read)
    from_s3 = CacheReader(job["cache_url"], storage_options=storage_options(stack.s3_endpoint))
    check(job["cache_url"].startswith("s3://"), f"the cache lives in S3: {job['cache_url']}")
    check(embedded.manifest.cache_id == cache_id, "the embedded run made the same cache id")
    assert_identical("through the service", served, embedded)
    assert_identical("from S3", from_s3, embedded)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    prep = sub.add_parser("prepare", help="write the test data")
    prep.add_argument("data", type=Path)
    r = sub.add_parser("run", help="run the job on the stack and check it")
    r.add_argument("--server", required=True, help="the service, as published on this host")
    r.add_argument("--s3-endpoint", required=True, help="the S3 server, as published here")
    r.add_argument("--data", type=Path, required=True, help="the test data (as prepared)")
    r.add_argument("--embedded", type=Path, required=True, help="root of the embedded run")
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.data)
        return 0
    sys.path.insert(0, str(args.data))  # the module teacher, for the embedded run
    try:
        run(args)
    except CheckFailed as err:
        log.error("FAILED: %s", err)
        return 1
    log.info("PASSED: compose end-to-end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
