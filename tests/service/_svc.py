"""Helpers of the service tests (imported by conftest and the test modules).

With ``KDCACHE_TEST_POSTGRES_URL`` set (e.g. ``postgresql+psycopg://user@127.0.0.1:5432/postgres``,
a throwaway server), every service the tests start gets its own fresh PostgreSQL database
instead of a SQLite file; the databases are dropped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from _net import serve  # noqa: F401  # re-exported to the service tests
from fastapi.testclient import TestClient

from kdcache.core.layout import RECORDS_PREFIX
from kdcache.core.shards import ShardRecord
from kdcache.service import Settings

ADMIN, WORKER, READ = "admin-secret", "worker-secret", "read-secret"
ADMIN_H = {"Authorization": f"Bearer {ADMIN}"}
WORKER_H = {"Authorization": f"Bearer {WORKER}"}
READ_H = {"Authorization": f"Bearer {READ}"}


PG_ENV = "KDCACHE_TEST_POSTGRES_URL"
_PG_DATABASES: list[str] = []


def _pg_admin_conninfo() -> str:
    from sqlalchemy.engine import make_url

    url = make_url(os.environ[PG_ENV]).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def fresh_postgres_url() -> str | None:
    """A new, empty PostgreSQL database when ``KDCACHE_TEST_POSTGRES_URL`` is set, else None."""
    if not os.environ.get(PG_ENV):
        return None
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"kdcache_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(_pg_admin_conninfo(), autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    _PG_DATABASES.append(name)
    return make_url(os.environ[PG_ENV]).set(database=name).render_as_string(hide_password=False)


def drop_postgres_databases() -> None:
    """Drop every database :func:`fresh_postgres_url` created."""
    if not _PG_DATABASES:
        return
    import psycopg

    with psycopg.connect(_pg_admin_conninfo(), autocommit=True) as con:
        while _PG_DATABASES:
            name = _PG_DATABASES.pop()
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(root: Path, **overrides: Any) -> Settings:
    """Settings with admin and worker tokens and open reads, unless overridden."""
    values: dict[str, Any] = {"root": str(root), "admin_token": ADMIN, "worker_token": WORKER}
    values.update(overrides)
    if "db_url" not in values:
        pg = fresh_postgres_url()
        if pg is not None:
            values["db_url"] = pg
    return Settings(**values)


@dataclass(frozen=True)
class BuiltCache:
    """A cache written by the embedded runner: its root, id and completion records."""

    root: Path
    cache_id: str
    records: dict[int, ShardRecord]

    def copy_to(self, root: Path, keep: set[int] | None = None) -> Path:
        """Copy the storage root (no database) keeping only the records of shards ``keep``."""
        shutil.copytree(self.root / "caches", root / "caches")
        records = root / "caches" / self.cache_id / RECORDS_PREFIX
        for path in records.glob("*.json"):
            if keep is not None and int(path.stem) not in keep:
                path.unlink()
        return root / "caches" / self.cache_id


def claim(c: TestClient | httpx.Client, worker: str = "w", **body: Any) -> Any:
    return c.post("/v1/leases", json={"worker": worker, **body}, headers=WORKER_H)


def record_body(rec: ShardRecord) -> dict[str, Any]:
    return {
        "record": {
            "shard": rec.shard,
            "start": rec.start,
            "end": rec.end,
            "checksums": dict(rec.checksums),
            "tokens": rec.tokens,
            "seconds": rec.seconds,
            "writer": dict(rec.writer),
        }
    }
