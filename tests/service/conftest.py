"""Service fixtures: settings with tokens, an in-process client, a real cache.

The real cache is written once per session by the embedded runner (tests may import the worker;
the service may not) and copied into each test's own storage root.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _svc import BuiltCache, drop_postgres_databases, make_settings
from fastapi.testclient import TestClient

from kdcache.core.shards import list_records
from kdcache.core.storage import open_storage
from kdcache.service import Settings, create_app


@pytest.fixture(scope="session", autouse=True)
def _drop_test_databases() -> Iterator[None]:
    yield
    drop_postgres_databases()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "root")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """An in-process client of a fresh app (lifespan run) on a SQLite file under tmp_path."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def make_client() -> Iterator[Callable[[Settings], TestClient]]:
    """Open clients with other settings; all are closed at teardown."""
    opened: list[TestClient] = []

    def make(s: Settings) -> TestClient:
        c = TestClient(create_app(s), raise_server_exceptions=False)
        c.__enter__()
        opened.append(c)
        return c

    yield make
    for c in opened:
        c.__exit__(None, None, None)


@pytest.fixture(scope="session")
def spec(tiny_teacher_dir: Path, tokens_npy: Path) -> dict[str, Any]:
    """8 rows x 16 tokens, 2 rows per shard: 4 shards."""
    return {
        "name": "svc-test",
        "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens_npy)},
        "outputs": {"topk": 4, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
        "batch_size": 4,
        "rows_per_shard": 2,
    }


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory: pytest.TempPathFactory, spec: dict[str, Any]) -> BuiltCache:
    """The cache of ``spec``, written by the embedded runner (4 shards, all complete)."""
    from kdcache.core.spec import parse_spec
    from kdcache.worker.runner import run_job

    root = tmp_path_factory.mktemp("built")
    url = run_job(parse_spec(spec), root)
    records = list_records(open_storage(url))
    assert len(records) == 4
    return BuiltCache(root, Path(url).name, records)
