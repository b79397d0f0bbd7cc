"""The job database: versioned schema, SQLite WAL and up-front write locks, claims under load."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _svc import ADMIN_H, make_settings
from fastapi.testclient import TestClient

from kdcache.core.resolve import resolve_job
from kdcache.core.spec import parse_spec
from kdcache.service import create_app
from kdcache.service.db import SCHEMA_VERSION
from kdcache.service.errors import SchemaVersionError
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
    with pytest.raises(SchemaVersionError), TestClient(create_app(make_settings(db.parent))):
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


def test_claims_from_many_stores_on_one_file_never_collide(
    tmp_path: Path, tiny_teacher_dir: Path
) -> None:
    """Separate engines (as separate processes would have) claim disjoint shards."""
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
    stores = [_store(tmp_path / "k.db") for _ in range(4)]
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
