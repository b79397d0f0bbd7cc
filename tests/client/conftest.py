"""Client fixtures: tiny caches made by the embedded runner from the tiny Llama teacher, and an
S3 server (moto) on 127.0.0.1.

``make_cache(n_rows, rows_per_shard)`` builds (once per session) a cache of ``n_rows`` rows of 16
tokens with top-8 at temperatures (1, 2) and hidden layers 1 and 2 (bf16, d = 32).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_dataset_support import LAYERS, SEQ_LEN, TEMPERATURES, TOPK

from kdcache.core.spec import parse_spec
from kdcache.worker import toy
from kdcache.worker.runner import run_job


class CacheFactory:
    """Builds caches under a session temp dir; remembers each one's job spec and root."""

    def __init__(self, tmp: pytest.TempPathFactory, teacher: Path) -> None:
        self.tmp, self.teacher = tmp, teacher
        self.made: dict[tuple[int, int], str] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.roots: dict[str, Path] = {}

    def __call__(self, n_rows: int = 37, rows_per_shard: int = 8) -> str:
        if (n_rows, rows_per_shard) not in self.made:
            base = self.tmp.mktemp(f"cache-{n_rows}-{rows_per_shard}")
            tokens = toy.make_tokens(base / "tokens.npy", n_rows, SEQ_LEN, 320, seed=n_rows)
            spec = {
                "teacher": {"hf": str(self.teacher), "dtype": "float32", "device": "cpu"},
                "dataset": {"tokens": str(tokens)},
                "outputs": {"topk": TOPK, "temperatures": TEMPERATURES, "hidden_layers": LAYERS},
                "rows_per_shard": rows_per_shard,
                "batch_size": 16,
            }
            url = run_job(parse_spec(spec), base / "root")
            self.made[(n_rows, rows_per_shard)] = url
            self.specs[url], self.roots[url] = spec, base / "root"
        return self.made[(n_rows, rows_per_shard)]


@pytest.fixture(scope="session")
def make_cache(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> CacheFactory:
    """A factory of caches: (n_rows, rows_per_shard) -> cache directory (built once each)."""
    return CacheFactory(tmp_path_factory, tiny_teacher_dir)


@pytest.fixture(scope="session")
def cache_dir37(make_cache: CacheFactory) -> str:
    """37 rows in shards of 8 (the last holds 5): rows divide by no world size or batch."""
    return make_cache(37, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """moto's S3 on 127.0.0.1; yields the ``storage_options`` that reach it."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "client_kwargs": {
                "endpoint_url": f"http://127.0.0.1:{port}",
                "region_name": "us-east-1",
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
