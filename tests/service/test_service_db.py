"""The job database: versioned schema, SQLite WAL and up-front write locks, claims under load."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _svc import ADMIN_H, PG_ENV, WORKER_H, fresh_postgres_url, make_settings
from fastapi.testclient import TestClient

from kdcache.core.errors import SchemaVersionError
from kdcache.core.resolve import resolve_job
from kdcache.core.spec import parse_spec
from kdcache.service import create_app
from kdcache.service.db import SCHEMA_VERSION
from kdcache.service.store import JobStore


def _store(db: Path, **kw: Any) -> JobStore:
    store = JobStore(f"sqlite:///{db}", str(db.parent), **kw)
    store.open()
    return store


def test_schema_is_created_versioned_and_reopened(tmp_path: Path) -> None:
    db = tmp_path / "k.db"
    _store(db).close()
    _store(db).close()  # idempotent
    con = sqlite3.connect(db)
    assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    con.close()


def test_a_newer_schema_refuses_to_start(tmp_path: Path) -> None:
    db = tmp_path / "root" / "kdcache.db"
    db.parent.mkdir()
    _store(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(SchemaVersionError, match="upgrade kdcache"):
        _store(db)
    with (
        pytest.raises(SchemaVersionError),
        TestClient(create_app(make_settings(db.parent, db_url=f"sqlite:///{db}"))),
    ):
        pass


def test_write_transactions_take_the_lock_up_front(tmp_path: Path) -> None:
    """A second writer waits at BEGIN (not at its first write), so read-then-update is safe."""
    store = _store(tmp_path / "k.db")
    entered = threading.Event()
    order: list[str] = []

    def second() -> None:
        entered.wait(5)
        with store.write() as s:
            s.connection()  # blocks in BEGIN IMMEDIATE until the first commits
            order.append("second began")

    t = threading.Thread(target=second)
    with store.write() as s:
        s.connection()  # BEGIN IMMEDIATE issued here
        t.start()
        entered.set()
        time.sleep(0.2)
        order.append("first still open")
    t.join(10)
    assert order == ["first still open", "second began"]
    store.close()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_claims_from_many_stores_on_one_database_never_collide(
    tmp_path: Path, tiny_teacher_dir: Path, dialect: str
) -> None:
    """Separate engines (as separate processes would have) claim disjoint shards."""
    url = f"sqlite:///{tmp_path / 'k.db'}" if dialect == "sqlite" else fresh_postgres_url()
    if url is None:
        pytest.skip(f"set {PG_ENV} to run against PostgreSQL")
    from kdcache.worker import toy

    tokens = toy.make_tokens(tmp_path / "t.npy", 48, 4, 320)
    plan = resolve_job(
        parse_spec(
            {
                "teacher": {"hf": str(tiny_teacher_dir)},
                "dataset": {"tokens": str(tokens)},
                "outputs": {"topk": 2},
                "rows_per_shard": 1,
            }
        )
    )
    stores = [JobStore(url, str(tmp_path)) for _ in range(4)]
    for store in stores:
        store.open()
    stores[0].submit(plan)
    got: list[int] = []
    lock = threading.Lock()

    def work(store: JobStore) -> None:
        while (lease := store.leases.claim("w")) is not None:
            with lock:
                got.append(lease.shard)

    threads = [threading.Thread(target=work, args=(s,)) for s in stores for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == list(range(48))
    for s in stores:
        s.close()


def test_concurrent_submits_of_one_spec_make_one_job(
    client: TestClient, spec: dict[str, Any]
) -> None:
    codes: list[int] = []
    ids: set[str] = set()

    def submit() -> None:
        r = client.post("/v1/jobs", json=spec, headers=ADMIN_H)
        codes.append(r.status_code)
        ids.add(r.json()["id"])

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [200] * 5 + [201]
    assert len(ids) == 1


def test_the_postgresql_claim_skips_locked_rows() -> None:
    from sqlalchemy.dialects import postgresql, sqlite

    from kdcache.service.leasing import LeaseBook

    pg = str(
        LeaseBook.next_shard_query(0.0, None, skip_locked=True).compile(
            dialect=postgresql.dialect()
        )
    )
    assert pg.rstrip().endswith("FOR UPDATE OF shards SKIP LOCKED")
    assert "ORDER BY jobs.created_at, jobs.id, shards.shard" in pg
    lite = str(
        LeaseBook.next_shard_query(0.0, None, skip_locked=False).compile(dialect=sqlite.dialect())
    )
    assert "FOR UPDATE" not in lite


def test_a_locked_database_is_503_with_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_client: Any
) -> None:
    monkeypatch.setattr("kdcache.service.db.SQLITE_BUSY_MS", 200)
    db = tmp_path / "root" / "kdcache.db"
    c: TestClient = make_client(make_settings(db.parent, db_url=f"sqlite:///{db}"))
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        r = c.post("/v1/leases", json={"worker": "w"}, headers=WORKER_H)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "unavailable"
    assert c.post("/v1/leases", json={"worker": "w"}, headers=WORKER_H).status_code == 204
