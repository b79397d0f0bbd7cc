"""Many workers open the same new cache at once (``docker compose up --scale worker=N``): every
one of them must get a writer, on a local directory and on S3."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kdcache.core import writer as writer_module
from kdcache.core.errors import CacheFormatError
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


def test_a_writer_waits_for_the_group_another_is_renaming_into_place(
    manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zarr's local store writes ``zarr.json`` as ``zarr.<hex>.partial`` and renames it: a writer
    that sees only that temp file must wait for the group, not call the directory foreign."""
    url = tmp_path / "cache"
    url.mkdir()
    partial = url / "zarr.0123abcd.partial"
    partial.write_bytes(b"{")

    def winner() -> None:
        time.sleep(0.3)
        partial.unlink()
        CacheWriter.open(str(url), manifest)

    t = threading.Thread(target=winner)
    t.start()
    try:
        writer = CacheWriter.open(str(url), manifest)
    finally:
        t.join(timeout=60)
    assert writer.manifest.cache_id == manifest.cache_id
    assert set(CacheReader(str(url)).arrays) == {a.name for a in manifest.arrays()}

    # a temp file nobody renames: refused once the wait is over, naming the directory
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "zarr.0123abcd.partial").write_bytes(b"{")
    monkeypatch.setattr(writer_module, "GROUP_WAIT_S", 0.2)
    with pytest.raises(CacheFormatError, match="holds files but no Zarr group"):
        CacheWriter.open(str(stale), manifest)
    # anything else in the directory: refused at once
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    monkeypatch.setattr(writer_module, "GROUP_WAIT_S", 60.0)
    started = time.monotonic()
    with pytest.raises(CacheFormatError, match="holds files but no Zarr group"):
        CacheWriter.open(str(foreign), manifest)
    assert time.monotonic() - started < 10
