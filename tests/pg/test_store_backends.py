"""The job and lease suite on both job store backends, SQLite and PostgreSQL (``db_url``).

Through the real app (create_app + TestClient): submit, claim order, 16 concurrent claimers over
four app instances (four engines, as four service processes would have) that never share a
shard, lease expiry, complete, fail and retry, cancel, and the versioned schema.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from kdcache.core.errors import SchemaVersionError
from kdcache.core.layout import RECORDS_PREFIX, record_key
from kdcache.core.shards import ShardRecord, list_records
from kdcache.core.storage import open_storage
from kdcache.service import Settings, create_app
from kdcache.service.db import SCHEMA_VERSION, init_schema, make_engine
from kdcache.worker import toy

ADMIN, WORKER = "admin-secret", "worker-secret"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
WORKER_H = {"Authorization": f"Bearer {WORKER}"}
ROWS = 48  # one row per shard: 48 shards

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> dict[str, Any]:
    tokens = toy.make_tokens(tmp_path_factory.mktemp("pgdata") / "t.npy", ROWS, 8, 320, seed=1)
    return {
        "name": "backends",
        "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 4, "temperatures": [1.0], "hidden_layers": []},
        "batch_size": 8,
        "rows_per_shard": 1,
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, spec: dict[str, Any]) -> tuple[Path, str]:
    """The cache of ``spec`` written by the embedded runner: (storage root, cache id)."""
    from kdcache.core.spec import parse_spec
    from kdcache.worker.runner import run_job

    root = tmp_path_factory.mktemp("pgbuilt")
    return root, Path(run_job(parse_spec(spec), root)).name


@pytest.fixture
def records(built: tuple[Path, str]) -> dict[int, ShardRecord]:
    root, cache_id = built
    return list_records(open_storage(root / "caches" / cache_id))


@pytest.fixture
def root(tmp_path: Path, built: tuple[Path, str]) -> Path:
    """A storage root with the written cache and no completion records: workers' view."""
    src, cache_id = built
    shutil.copytree(src / "caches", tmp_path / "root" / "caches")
    shutil.rmtree(tmp_path / "root" / "caches" / cache_id / RECORDS_PREFIX)
    return tmp_path / "root"


@pytest.fixture
def make_client(db_url: str, root: Path) -> Iterator[Callable[..., TestClient]]:
    """Clients of app instances on the one database; all closed at teardown."""
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        values: dict[str, Any] = {
            "root": str(root),
            "db_url": db_url,
            "admin_token": ADMIN,
            "worker_token": WORKER,
            **overrides,
        }
        c = TestClient(create_app(Settings(**values)), raise_server_exceptions=False)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


def submit(c: TestClient, spec: dict[str, Any]) -> dict[str, Any]:
    r = c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def claim(c: TestClient, worker: str = "w") -> Any:
    return c.post("/v1/leases", json={"worker": worker}, headers=WORKER_H)


def complete(c: TestClient, lease: dict[str, Any], rec: ShardRecord) -> Any:
    return c.post(
        f"/v1/leases/{lease['id']}/complete", json={"record": asdict(rec)}, headers=WORKER_H
    )


def test_the_schema_is_created_versioned_and_checked(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert init_schema(engine) == SCHEMA_VERSION
        assert init_schema(engine) == SCHEMA_VERSION  # reopening an existing database
        with engine.begin() as conn:
            assert conn.execute(text("SELECT version FROM schema_version")).scalars().all() == [
                SCHEMA_VERSION
            ]
            conn.execute(text("UPDATE schema_version SET version = :v"), {"v": SCHEMA_VERSION + 1})
        with pytest.raises(SchemaVersionError, match="upgrade kdcache"):
            init_schema(engine)
    finally:
        engine.dispose()


def test_a_schema_1_database_is_migrated_and_keeps_its_jobs(
    db_url: str, make_client: Callable[..., TestClient], spec: dict[str, Any]
) -> None:
    """What kdcache before schema 2 left behind (no ``jobs.plan``) is migrated in place, on
    SQLite and PostgreSQL alike, and its jobs lease without a plan."""
    job = submit(make_client(), spec)
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE jobs DROP COLUMN plan"))
            conn.execute(text("UPDATE schema_version SET version = 1"))
        assert init_schema(engine) == SCHEMA_VERSION == 2
        with engine.begin() as conn:
            assert conn.execute(text("SELECT version FROM schema_version")).scalars().all() == [2]
            rows = conn.execute(text("SELECT id, plan FROM jobs")).all()
        assert [(r[0], r[1]) for r in rows] == [(job["id"], None)]  # kept; no plan yet
        assert init_schema(engine) == 2  # a second start runs nothing again
    finally:
        engine.dispose()
    lease = claim(make_client())
    assert lease.status_code == 200, lease.text
    assert lease.json()["job_id"] == job["id"] and lease.json()["plan"] is None


def test_submit_is_idempotent_per_cache_and_claims_go_in_order(
    make_client: Callable[..., TestClient], spec: dict[str, Any]
) -> None:
    c = make_client()
    job = submit(c, spec)
    assert (job["status"], job["shards_total"], job["shards_done"]) == ("pending", ROWS, 0)
    again = c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    got = [claim(c).json() for _ in range(3)]
    assert [(g["job_id"], g["shard"], g["attempt"]) for g in got] == [
        (job["id"], i, 1) for i in range(3)
    ]
    assert c.get(f"/v1/jobs/{job['id']}", headers=ADMIN_H).json()["status"] == "running"
    assert [j["id"] for j in c.get("/v1/jobs?status=running", headers=ADMIN_H).json()["jobs"]] == [
        job["id"]
    ]


def test_sixteen_concurrent_claimers_never_share_a_shard_and_the_job_ends_done(
    make_client: Callable[..., TestClient], spec: dict[str, Any], records: dict[int, ShardRecord]
) -> None:
    clients = [make_client() for _ in range(4)]
    job = submit(clients[0], spec)
    leases: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def claimer(n: int) -> None:
        c = clients[n % 4]
        start.wait(timeout=30)
        while True:
            r = claim(c, f"w{n}")
            if r.status_code == 204:
                return
            if r.status_code != 200:
                with lock:
                    problems.append(f"claim: {r.status_code} {r.text[:200]}")
                return
            lease = r.json()
            with lock:
                leases.append((n, lease))
            # Completions race each other too: the job must still end done exactly once.
            done = complete(c, lease, records[lease["shard"]])
            if done.status_code != 200:
                with lock:
                    problems.append(f"complete {lease['shard']}: {done.status_code} {done.text}")

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a claimer hung"
    assert problems == []
    shards = sorted(lease["shard"] for _, lease in leases)
    assert shards == list(range(ROWS)), "a shard was leased twice, or never"
    assert len({lease["id"] for _, lease in leases}) == ROWS
    assert len({n for n, _ in leases}) > 1, "one claimer took everything: no concurrency"
    final = clients[1].get(f"/v1/jobs/{job['id']}", headers=ADMIN_H).json()
    assert (final["status"], final["shards_done"], final["rows_done"]) == ("done", ROWS, ROWS)


def test_an_expired_lease_is_leased_again_and_its_late_completion_refused(
    make_client: Callable[..., TestClient], spec: dict[str, Any], records: dict[int, ShardRecord]
) -> None:
    c = make_client(lease_seconds=0.3)
    submit(c, spec)
    stale = claim(c, "slow").json()
    time.sleep(max(0.0, stale["deadline"] - time.time()) + 0.1)
    fresh = claim(c, "fast").json()
    assert (fresh["shard"], fresh["attempt"]) == (stale["shard"], 2)
    late = complete(c, stale, records[stale["shard"]])
    assert late.status_code == 409 and late.json()["error"]["code"] == "lease_lost"
    assert complete(c, fresh, records[fresh["shard"]]).json()["shards_done"] == 1
    assert "kdcache_lease_expiries_total 1" in c.get("/metrics").text


def test_heartbeat_extends_a_lease(
    make_client: Callable[..., TestClient], spec: dict[str, Any]
) -> None:
    c = make_client(lease_seconds=1.0)
    submit(c, spec)
    lease = claim(c).json()
    time.sleep(0.6)
    beat = c.post(f"/v1/leases/{lease['id']}/heartbeat", headers=WORKER_H)
    assert beat.status_code == 200 and beat.json()["deadline"] > lease["deadline"]
    time.sleep(0.6)  # past the first deadline, not the extended one
    assert claim(c).json()["shard"] == lease["shard"] + 1


def test_complete_publishes_the_record_into_the_cache(
    make_client: Callable[..., TestClient],
    spec: dict[str, Any],
    records: dict[int, ShardRecord],
    root: Path,
    built: tuple[Path, str],
) -> None:
    c = make_client()
    job = submit(c, spec)
    lease = claim(c).json()
    wrong = asdict(records[lease["shard"]]) | {"end": 99}
    bad = c.post(f"/v1/leases/{lease['id']}/complete", json={"record": wrong}, headers=WORKER_H)
    assert bad.status_code == 422
    assert complete(c, lease, records[0]).status_code == 200
    storage = open_storage(root / "caches" / built[1])
    assert storage.exists(record_key(0))
    detail = c.get(f"/v1/caches/{job['cache_id']}").json()
    assert [r["shard"] for r in detail["completed"]] == [0]


def test_failures_are_retried_then_fail_the_job_with_the_message(
    make_client: Callable[..., TestClient], spec: dict[str, Any]
) -> None:
    c = make_client(max_attempts=2)
    job = submit(c, spec)
    for attempt in (1, 2):
        lease = claim(c).json()
        assert (lease["shard"], lease["attempt"]) == (0, attempt)
        r = c.post(
            f"/v1/leases/{lease['id']}/fail",
            json={"message": f"CUDA out of memory ({attempt})", "retryable": True},
            headers=WORKER_H,
        )
        assert r.status_code == 200, r.text
    final = c.get(f"/v1/jobs/{job['id']}", headers=ADMIN_H).json()
    assert final["status"] == "failed" and "CUDA out of memory (2)" in final["error"]
    assert claim(c).status_code == 204


def test_cancel_stops_leasing_and_tells_the_heartbeat(
    make_client: Callable[..., TestClient], spec: dict[str, Any]
) -> None:
    c = make_client()
    job = submit(c, spec)
    lease = claim(c).json()
    r = c.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN_H)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert claim(c).status_code == 204
    beat = c.post(f"/v1/leases/{lease['id']}/heartbeat", headers=WORKER_H)
    assert beat.status_code == 409 and beat.json()["error"]["code"] == "job_cancelled"


def test_a_postgresql_url_without_a_driver_uses_psycopg(postgres: Any, root: Path) -> None:
    """``postgresql://`` (what most tools print) works: psycopg 3, not the absent psycopg2."""
    name = f"kdcache_plain_{int(time.time() * 1000)}"
    postgres.execute(f'CREATE DATABASE "{name}"')
    try:
        plain = postgres.database_url(name).replace("postgresql+psycopg://", "postgresql://")
        settings = Settings(root=str(root), db_url=plain, admin_token=ADMIN, worker_token=WORKER)
        with TestClient(create_app(settings)) as c:
            assert c.get("/healthz").json()["db"] == "ok"
        engine = make_engine(plain)
        assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", "psycopg")
        engine.dispose()
    finally:
        postgres.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
