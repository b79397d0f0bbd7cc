"""Many workers open the same new cache at once (``docker compose up --scale worker=N``): every
one of them must get a writer, on a local directory and on S3."""

from __future__ import annotations

import multiprocessing as mp
import queue
from pathlib import Path
from typing import Any

import pytest

from kdcache.core.format import Manifest
from kdcache.core.reader import CacheReader
from kdcache.core.spec import parse_spec
from kdcache.core.writer import CacheWriter
from kdcache.worker.runner import prepare_job

WRITERS, ROUNDS = 4, 5


@pytest.fixture(scope="module")
def manifest(tiny_teacher_dir: Path, tokens_npy: Path) -> Manifest:
    spec = {
        "name": "race",
        "teacher": {"hf": str(tiny_teacher_dir), "device": "cpu"},
        "dataset": {"tokens": str(tokens_npy)},
        "outputs": {"topk": 4, "temperatures": [1.0], "hidden_layers": [1, 2]},
        "rows_per_shard": 2,
    }
    return prepare_job(parse_spec(spec)).manifest


def _open(url: str, m: Manifest, opts: dict[str, Any] | None, start: Any, out: Any) -> None:
    start.wait(timeout=60)
    try:
        CacheWriter.open(url, m, opts)
        out.put("ok")
    except Exception as err:  # reported to the test, whatever it is
        out.put(f"{type(err).__name__}: {err}")


def open_at_once(url: str, m: Manifest, opts: dict[str, Any] | None) -> list[str]:
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(WRITERS), ctx.Queue()
    procs = [ctx.Process(target=_open, args=(url, m, opts, start, out)) for _ in range(WRITERS)]
    for p in procs:
        p.start()
    got = []
    for _ in procs:
        try:
            got.append(out.get(timeout=120))
        except queue.Empty:
            got.append("timed out")
    for p in procs:
        p.join(timeout=30)
    return got


def test_writers_racing_to_create_a_local_cache_all_succeed(
    manifest: Manifest, tmp_path: Path
) -> None:
    for n in range(ROUNDS):
        url = str(tmp_path / f"cache{n}")
        assert open_at_once(url, manifest, None) == ["ok"] * WRITERS
        assert set(CacheReader(url).arrays) == {a.name for a in manifest.arrays()}


def test_writers_racing_to_create_an_s3_cache_all_succeed(
    manifest: Manifest, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    for n in range(ROUNDS):
        url = f"s3://{s3_bucket}/cache{n}"
        assert open_at_once(url, manifest, s3_options) == ["ok"] * WRITERS
        reader = CacheReader(url, storage_options=s3_options)
        assert set(reader.arrays) == {a.name for a in manifest.arrays()}
