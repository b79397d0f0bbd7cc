"""Leases carry the job's resolved plan: a worker on the service's files hashes no weights.

A real service (uvicorn on loopback, SQLite under the root) and real in-process workers;
remembered hashes are switched off, so every weight file a process fingerprints is read.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _net import serve

from kdcache.core import fingerprint as fp
from kdcache.core.leaseplan import plan_of_lease
from kdcache.core.reader import CacheReader
from kdcache.core.resolve import resolve_job
from kdcache.core.spec import parse_spec
from kdcache.core.wire import Lease
from kdcache.service import Settings, create_app
from kdcache.worker.lease import run_worker

pytestmark = pytest.mark.integration

ADMIN, WORKER = "plan-admin", "plan-worker"


@pytest.fixture
def weight_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Weight files read for hashing, in this process (service and workers alike)."""
    monkeypatch.setenv("KDCACHE_FINGERPRINT_CACHE", "off")
    seen: list[Path] = []
    real = fp.sha256_file

    def counting(path: str | Path) -> str:
        if Path(path).suffix in fp.WEIGHT_SUFFIXES:
            seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(fp, "sha256_file", counting)
    return seen


@pytest.fixture
def teacher(tmp_path: Path, tiny_teacher_dir: Path) -> Path:
    """A copy of the tiny teacher this test may change."""
    return Path(shutil.copytree(tiny_teacher_dir, tmp_path / "teacher"))


def _spec(teacher: Path, tokens: Path) -> dict[str, Any]:
    return {
        "name": "lease-plan",
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 4, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 4,
        "rows_per_shard": 4,
    }


@pytest.fixture
def service(tmp_path: Path) -> Iterator[str]:
    settings = Settings(root=str(tmp_path / "root"), admin_token=ADMIN, worker_token=WORKER)
    with serve(create_app(settings)) as url:
        yield url


def _submit(url: str, spec: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/jobs", json=spec, headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _job(url: str, job_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/v1/jobs/{job_id}").json())


def _worker(url: str) -> Any:
    return run_worker(url, token=WORKER, once=True, device="cpu", retry_for=30)


def test_workers_take_the_plan_and_read_no_weights(
    service: str, teacher: Path, tokens_npy: Path, weight_reads: list[Path]
) -> None:
    job = _submit(service, _spec(teacher, tokens_npy))
    assert weight_reads == [teacher / "model.safetensors"]  # the service hashed them, once

    worker_h = {"Authorization": f"Bearer {WORKER}"}
    r = httpx.post(f"{service}/v1/leases", json={"worker": "look"}, headers=worker_h)
    lease = Lease.model_validate(r.json())
    assert lease.plan is not None
    weights = str(teacher / "model.safetensors")
    st = os.stat(weights)
    assert lease.plan.files[weights] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert str(tokens_npy) in lease.plan.files and lease.plan.num_rows == 8
    expected = resolve_job(parse_spec(_spec(teacher, tokens_npy)))
    weight_reads.clear()
    plan = plan_of_lease(parse_spec(lease.spec.model_dump()), lease.plan)
    assert plan is not None and plan.cache_id == expected.cache_id == lease.cache_id
    assert plan.layers == expected.layers and plan.teacher == expected.teacher
    assert weight_reads == []
    release = {"message": "look only", "release": True}
    httpx.post(f"{service}/v1/leases/{lease.id}/fail", json=release, headers=worker_h)

    for _ in range(2):  # two worker starts: each loads the job afresh from a lease
        stats = _worker(service)
        assert (stats.completed, stats.failed) == (1, 0)
    assert weight_reads == []
    assert _job(service, job["id"])["shards_done"] == 2


def test_changed_weights_after_submit_are_hashed_and_refused(
    service: str, teacher: Path, tokens_npy: Path, weight_reads: list[Path]
) -> None:
    job = _submit(service, _spec(teacher, tokens_npy))
    weights = teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight; same size, mtime put back: only ctime moves
    st = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    weight_reads.clear()

    stats = _worker(service)
    assert (stats.completed, stats.failed) == (0, 1)
    assert weight_reads == [weights]  # the plan did not fit: the worker hashed them itself
    assert _job(service, job["id"])["shards_done"] == 0


def test_jobs_of_schema_1_migrate_and_lease_without_a_plan(
    tmp_path: Path, teacher: Path, tokens_npy: Path, weight_reads: list[Path]
) -> None:
    root = tmp_path / "root"
    settings = Settings(root=str(root), admin_token=ADMIN, worker_token=WORKER)
    with serve(create_app(settings)) as url:
        job = _submit(url, _spec(teacher, tokens_npy))
    con = sqlite3.connect(root / "kdcache.db")  # what kdcache before schema 2 left behind
    con.execute("ALTER TABLE jobs DROP COLUMN plan")
    con.execute("UPDATE schema_version SET version = 1")
    con.commit()
    con.close()
    weight_reads.clear()

    with serve(create_app(settings)) as url:
        r = httpx.post(
            f"{url}/v1/leases",
            json={"worker": "look"},
            headers={"Authorization": f"Bearer {WORKER}"},
        )
        assert r.status_code == 200 and r.json()["plan"] is None
        httpx.post(
            f"{url}/v1/leases/{r.json()['id']}/fail",
            json={"message": "look only", "release": True},
            headers={"Authorization": f"Bearer {WORKER}"},
        )
        for _ in range(2):
            assert _worker(url).completed == 1
        assert _job(url, job["id"])["status"] == "done"
    assert len(weight_reads) == 2  # no plan: each worker start resolved (and hashed) the job
    con = sqlite3.connect(root / "kdcache.db")
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    con.close()
    assert CacheReader(str(root / "caches" / job["cache_id"])).is_complete
