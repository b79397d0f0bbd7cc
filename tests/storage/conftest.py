"""An S3 server for the storage tests: moto's server mode on 127.0.0.1, one per session.

Each test gets a bucket of its own, so tests never see each other's objects.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

ACCESS_KEY, SECRET_KEY = "kdcache-test", "kdcache-test-secret"


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The URL of a moto S3 server on a free loopback port."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint: str) -> dict[str, Any]:
    """fsspec storage options that reach the test server."""
    return {
        "endpoint_url": s3_endpoint,
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
    }


@pytest.fixture
def s3_bucket(s3_options: dict[str, Any]) -> str:
    """A fresh, empty bucket."""
    import s3fs

    name = f"kdcache-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**s3_options).mkdir(name)
    return name
