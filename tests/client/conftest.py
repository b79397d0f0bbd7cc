"""Client fixtures: tiny caches made by the embedded runner from the tiny Llama teacher, and an
S3 server (moto) on 127.0.0.1.

``make_cache(n_rows, rows_per_shard)`` builds (once per session) a cache of ``n_rows`` rows of 16
tokens with top-8 at temperatures (1, 2) and hidden layers 1 and 2 (bf16, d = 32).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _net import free_port
from test_dataset_support import CacheFactory


@pytest.fixture(scope="session")
def make_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> CacheFactory:
    """A factory of caches: (n_rows, rows_per_shard) -> cache directory (built once each)."""
    return CacheFactory(tmp_path_factory, tiny_teacher_dir)


@pytest.fixture(scope="session")
def cache_dir37(make_cache: CacheFactory) -> str:
    """37 rows in shards of 8 (the last holds 5): rows divide by no world size or batch."""
    return make_cache(37, 8)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """moto's S3 on 127.0.0.1; yields the ``storage_options`` that reach it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "client_kwargs": {
                "endpoint_url": f"http://127.0.0.1:{port}",
            },
            "key": "x",
            "secret": "x",
        }
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls: one torch thread runs several times faster than two on a loaded machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
