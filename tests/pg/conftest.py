"""A real PostgreSQL for the job store tests, and ``db_url``: SQLite and PostgreSQL in turn.

The server comes from Debian's packages (installed with apt-get when missing and this is root):
``initdb`` into a temporary directory, ``pg_ctl start`` on 127.0.0.1 with a free port, stopped
and removed at the end of the session; each test gets a database of its own. Set
``KDCACHE_TEST_POSTGRES_URL`` (``postgresql+psycopg://user@host:port/db``) to use a running
server instead. Skipped, saying why, only when PostgreSQL cannot be installed.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _net import free_port

APT_TIMEOUT = 900


@dataclass(frozen=True)
class PostgresServer:
    """A server the tests may create databases on (as a superuser)."""

    url: str  # postgresql+psycopg://user@host:port/db of its maintenance database

    def database_url(self, name: str) -> str:
        return f"{self.url.rsplit('/', 1)[0]}/{name}"

    def execute(self, sql: str) -> None:
        import psycopg

        dsn = self.url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())


def _initdb() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if found:
        return Path(found[-1])
    which = shutil.which("initdb")
    return Path(which) if which else None


def _major(path: str) -> int:
    try:
        return int(Path(path).parts[-3])
    except ValueError:
        return 0


def _install() -> str:
    """apt-get install postgresql; returns what went wrong, or ''."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "initdb is not installed and this is not root with apt-get"
    # The package would start a system-wide server of its own; policy-rc.d forbids that.
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = not policy.exists()
    if made_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        return _apt_install("postgresql")
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)


def _apt_install(package: str) -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    out = ""
    for step in ([], [["apt-get", "update", "-q"]]):
        try:
            for pre in step:
                subprocess.run(pre, env=env, capture_output=True, timeout=APT_TIMEOUT, check=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT)
        except (subprocess.SubprocessError, OSError) as err:
            out = str(err)
            continue
        if proc.returncode == 0:
            return ""
        out = (proc.stdout + proc.stderr)[-500:]
    return f"apt-get install {package} failed: {out}"


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as Debian's postgres user."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _run(cmd: list[str], what: str, timeout: float = 120) -> None:
    proc = subprocess.run(_as_postgres(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for this test session."""
    pytest.importorskip("psycopg", reason="psycopg (the [postgres] extra) is not installed")
    external = os.environ.get("KDCACHE_TEST_POSTGRES_URL")
    if external:
        yield PostgresServer(external)
        return
    initdb = _initdb()
    if initdb is None:
        problem = _install()
        initdb = _initdb()
        if initdb is None:
            pytest.skip(f"PostgreSQL cannot be installed: {problem or 'no initdb after install'}")
    bindir = initdb.parent
    # Not under pytest's tmp_path: that is private to root, and the server runs as postgres.
    base = Path(tempfile.mkdtemp(prefix="kdcache-pg-"))
    data, port, user = base / "data", free_port(), "kdcache"
    if os.geteuid() == 0:
        shutil.chown(base, user="postgres")
    base.chmod(0o700)
    try:
        _run([str(initdb), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8"], "initdb")
        opts = (
            f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        start = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-o", opts]
        _run([*start, "-w", "-t", "60", "start"], "pg_ctl start")
        try:
            yield PostgresServer(f"postgresql+psycopg://{user}@127.0.0.1:{port}/postgres")
        finally:
            _run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty job database: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"kdcache_{uuid.uuid4().hex[:16]}"
    server.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.database_url(name)
    finally:
        server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
