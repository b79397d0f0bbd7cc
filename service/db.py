"""The job store's tables, its engine, and the versioned schema.

SQLite (WAL) is the embedded default; any SQLAlchemy URL works, PostgreSQL being the other one
meant for production. Times are epoch seconds (float) in every dialect.

On SQLite every write transaction starts with ``BEGIN IMMEDIATE``: the write lock is taken up
front, so a claim's read-then-update cannot interleave with another claim's (pysqlite's own
deferred BEGIN would let two transactions read the same pending shard).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Engine,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import StaticPool

from kdcache.core.errors import SchemaVersionError
from kdcache.core.wire import LIVE_JOB_STATES

__all__ = [
    "PREPARE_SHARD",
    "SCHEMA_VERSION",
    "Database",
    "WRITE",
    "Base",
    "JobRow",
    "LeaseRow",
    "SchemaVersionRow",
    "ShardRow",
    "init_schema",
    "make_engine",
]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
PREPARE_SHARD = -1
"""The shard number of a document job's prepare step (tokenise the dataset; no rows)."""
_LIVE_SQL = "status IN ({})".format(", ".join(f"'{s}'" for s in LIVE_JOB_STATES))
WRITE = "kdcache_write"  # execution option: this connection's transactions take the write lock
SQLITE_BUSY_MS = 30_000


class Base(DeclarativeBase):
    """Declarative base of the job store's tables."""


class SchemaVersionRow(Base):
    """One row: the schema version the database was created with."""

    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[float] = mapped_column(Float)


class JobRow(Base):
    """A submitted job: the resolved spec and where it stands."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    cache_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # the resolved plan leases carry (core.wire.LeasePlan); null for jobs of schema version 1
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # 0 while a document job is not prepared yet (its row count unknown)
    shards_total: Mapped[int] = mapped_column(Integer)
    rows_total: Mapped[int] = mapped_column(Integer)
    seq_len: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    __table_args__ = (
        # At most one live job per cache: concurrent submits of one spec cannot both create.
        Index(
            "uq_jobs_live_cache",
            "cache_id",
            unique=True,
            sqlite_where=text(_LIVE_SQL),
            postgresql_where=text(_LIVE_SQL),
        ),
        Index("ix_jobs_created", "created_at", "id"),
    )


class ShardRow(Base):
    """One shard of a job: its rows, state, current lease and completion record.

    ``status`` is pending | leased | done. A leased shard whose ``deadline`` has passed is
    pending again for the next claim. Shard :data:`PREPARE_SHARD` (-1, no rows, no record) is the
    prepare step of a document job whose rows are not known yet; the job's other shards are made
    when it completes. ``carried`` marks a shard found complete at submit time
    (not written under this job; it does not count towards the job's rate or the metrics).
    """

    __tablename__ = "shards"
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    start: Mapped[int] = mapped_column(Integer)
    end: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    deadline: Mapped[float | None] = mapped_column(Float, nullable=True)
    record: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    tokens: Mapped[int] = mapped_column(Integer, default=0)
    completed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    carried: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        Index("ix_shards_claim", "status", "job_id", "shard"),
    )


class LeaseRow(Base):
    """Every lease ever granted; ``state`` is active | expired | done | failed | released."""

    __tablename__ = "leases"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    shard: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str] = mapped_column(String(200))
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    deadline: Mapped[float] = mapped_column(Float)


def _sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN (pysqlite's implicit BEGIN is deferred).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        write = conn.get_execution_options().get(WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _with_driver(url: str) -> str:
    """A PostgreSQL URL without a driver gets psycopg 3 (the one kdcache installs), not
    SQLAlchemy's default psycopg2."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url.removeprefix(prefix)
    return url


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and up-front write locks."""
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:")
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_MS / 1000},
            poolclass=StaticPool if memory else None,
        )
        _sqlite_hooks(engine)
        return engine
    return create_engine(_with_driver(url), pool_pre_ping=True)


def _stored_version(engine: Engine) -> int | None:
    if not inspect(engine).has_table(SchemaVersionRow.__tablename__):
        return None
    with engine.connect() as conn:
        found = conn.execute(select(SchemaVersionRow.version)).scalars().all()
    return max(found) if found else None


_MIGRATIONS: dict[int, tuple[str, ...]] = {
    # version 1 -> 2: jobs keep their resolved plan for the leases (issue 10)
    1: ("ALTER TABLE jobs ADD COLUMN plan JSON",),
}
"""Statements that take a database from version N to N + 1 (plain SQL: SQLite and PostgreSQL)."""


def _migrate(engine: Engine, found: int) -> int:
    """Run the migrations from ``found`` up to :data:`SCHEMA_VERSION`; returns the version now."""
    with engine.execution_options(**{WRITE: True}).begin() as conn:
        # the row lock (PostgreSQL; SQLite's write lock is taken at BEGIN) keeps a second
        # service starting now from running the same statements again
        lock = select(SchemaVersionRow.version).with_for_update()
        version = conn.execute(lock).scalars().all()
        found = max(version) if version else found
        while found < SCHEMA_VERSION and found in _MIGRATIONS:
            for statement in _MIGRATIONS[found]:
                conn.execute(text(statement))
            log.info("migrated the job store schema from version %d to %d", found, found + 1)
            found += 1
        conn.execute(update(SchemaVersionRow).values(version=found, applied_at=time.time()))
    return found


def init_schema(engine: Engine) -> int:
    """Create the tables if needed, migrate an older schema and check the version; returns it.

    Refuses (:class:`SchemaVersionError`) a database written by a newer kdcache, whose tables
    this code would misread, and an older version it has no migration from.
    """
    found = _stored_version(engine)
    if found is not None and found < SCHEMA_VERSION and found in _MIGRATIONS:
        found = _migrate(engine, found)
    if found is not None and found != SCHEMA_VERSION:
        newer = found > SCHEMA_VERSION
        raise SchemaVersionError(
            f"the job database has schema version {found}; this kdcache "
            + (
                f"only knows versions up to {SCHEMA_VERSION}: upgrade kdcache"
                if newer
                else f"needs version {SCHEMA_VERSION} and has no migration from {found}"
            )
        )
    with engine.execution_options(**{WRITE: True}).begin() as conn:
        Base.metadata.create_all(conn)
        if conn.execute(select(SchemaVersionRow.version)).first() is None:
            conn.execute(
                insert(SchemaVersionRow).values(version=SCHEMA_VERSION, applied_at=time.time())
            )
            log.info("created job store schema version %d", SCHEMA_VERSION)
    return SCHEMA_VERSION


class Database:
    """The job database: one engine, read sessions and write transactions. The job store, the
    lease book and the cache index are peers over one of these; none of them owns another."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._write_engine = self.engine.execution_options(**{WRITE: True})

    def open(self) -> None:
        """Create or check the schema (refuses a newer one)."""
        init_schema(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A session for reads (no write lock)."""
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A transaction that holds the write lock from its start (SQLite) and commits on exit."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            yield session

    def ping(self) -> None:
        with self.read() as s:
            s.execute(text("SELECT 1"))
