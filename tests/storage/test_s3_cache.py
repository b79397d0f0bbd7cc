"""Caches on S3 (moto): written by the runner and the shard writer, read by the reader and the
client, equal to the same cache written to a local directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kdcache.core.errors import ShardIncompleteError
from kdcache.core.reader import CacheReader
from kdcache.core.spec import JobSpec, parse_spec
from kdcache.worker.runner import ShardRunner, open_writer, prepare_job, run_job


@pytest.fixture
def spec(tiny_teacher_dir: Path, tokens_npy: Path) -> JobSpec:
    """8 rows x 16 tokens in 4 shards of 2 rows; top-k, two temperatures, a bf16 hidden layer."""
    return parse_spec(
        {
            "name": "s3-test",
            "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
            "dataset": {"tokens": str(tokens_npy)},
            "outputs": {"topk": 4, "temperatures": [1.0, 2.0], "hidden_layers": [1]},
            "batch_size": 2,
            "rows_per_shard": 2,
        }
    )


def assert_same(got: CacheReader, want: CacheReader) -> None:
    assert got.manifest == want.manifest
    assert got.is_complete and want.is_complete
    gc, wc = got.completed(), want.completed()
    assert sorted(gc) == sorted(wc)
    assert all(gc[s].checksums == wc[s].checksums for s in gc)
    for a in want.manifest.arrays():
        x, y = got.read(a.name, slice(None)), want.read(a.name, slice(None))
        assert (x.dtype, x.shape) == (y.dtype, y.shape), a.name
        assert x.tobytes() == y.tobytes(), a.name
    assert all(c.ok for c in got.verify())


def test_a_cache_written_to_s3_equals_the_local_one(
    spec: JobSpec, tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    local = run_job(spec, tmp_path / "local")
    remote = run_job(spec, f"s3://{s3_bucket}/root", storage_options=s3_options)
    assert remote.startswith(f"s3://{s3_bucket}/root/caches/")
    assert remote.rsplit("/", 1)[1] == Path(local).name
    assert_same(CacheReader(remote, storage_options=s3_options), CacheReader(local))


def test_the_client_reads_an_s3_cache_directly(
    spec: JobSpec, tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    from kdcache.client import TeacherCache

    local = TeacherCache(run_job(spec, tmp_path / "local"))
    remote = TeacherCache(
        run_job(spec, f"s3://{s3_bucket}/root", storage_options=s3_options),
        storage_options=s3_options,
    )
    rows = [7, 0, 3]
    got, want = remote.batch(rows), local.batch(rows)
    assert sorted(got) == sorted(want)
    for key in want:
        assert np.array_equal(np.asarray(got[key].float()), np.asarray(want[key].float())), key


def test_a_shard_is_visible_only_after_its_completion_is_recorded(
    spec: JobSpec, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    job = prepare_job(spec)
    writer = open_writer(job, f"s3://{s3_bucket}/root", s3_options)
    runner = ShardRunner(job, writer)
    record = runner.run_shard(1, commit=False)
    reader = CacheReader(writer.storage.url, storage_options=s3_options)
    with pytest.raises(ShardIncompleteError):
        reader.read("input_ids", [2, 3])
    assert reader.completed() == {}

    writer.commit(record)
    assert reader.completed(refresh=True)[1] == record
    np.testing.assert_array_equal(reader.read("input_ids", [2, 3]), job.source.rows(2, 4))
    assert reader.check_shard(1).ok


def test_an_interrupted_s3_run_resumes_to_the_same_bytes(
    spec: JobSpec, tmp_path: Path, s3_bucket: str, s3_options: dict[str, Any]
) -> None:
    job = prepare_job(spec)
    root = f"s3://{s3_bucket}/root"
    writer = open_writer(job, root, s3_options)
    published = ShardRunner(job, writer).run_shard(2)  # the rerun must skip it
    ShardRunner(job, writer).run_shard(0, commit=False)  # written, never published: redone
    url = run_job(spec, root, storage_options=s3_options, job=job)
    assert CacheReader(url, storage_options=s3_options).completed()[2] == published
    assert_same(
        CacheReader(url, storage_options=s3_options), CacheReader(run_job(spec, tmp_path / "l"))
    )
