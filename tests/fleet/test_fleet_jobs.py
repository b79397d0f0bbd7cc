"""Two real workers finish a job of a real HF teacher; the served cache equals the embedded one
and reads the same over HTTP (kdcache's TeacherCache and zarr's own FsspecStore)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from fleet_helpers import Fleet, assert_same_cache, embedded_cache, new_fleet

from kdcache.client import TeacherCache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def done_job(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_teacher_dir: Path,
    tokens_npy: Path,
    slow_teacher_dir: Path,
) -> Iterator[tuple[Fleet, dict[str, Any], dict[str, Any]]]:
    """A job of 4 shards (2 rows each) finished by two workers: (fleet, spec, final job)."""
    spec = {
        "name": "two-workers",
        "teacher": {"hf": str(tiny_teacher_dir), "device": "cpu"},
        "dataset": {"tokens": str(tokens_npy)},
        "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "hidden_layers": [1, 2]},
        "batch_size": 1,
        "rows_per_shard": 2,
    }
    fleet = new_fleet(tmp_path_factory.mktemp("fleet-two"), slow_teacher_dir).start()
    try:
        job = fleet.submit(spec)
        workers = [fleet.worker(max_idle=1.5), fleet.worker(max_idle=1.5)]
        done = fleet.wait_job(job["id"], timeout=90)
        for w in workers:
            assert fleet.wait_exit(w) == 0, fleet.log_of(w)
        yield fleet, spec, done
    finally:
        fleet.close()


def test_two_workers_make_the_embedded_cache(
    done_job: tuple[Fleet, dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    fleet, spec, job = done_job
    assert (job["shards_done"], job["shards_total"]) == (4, 4)
    assert job["rows_done"] == 8 and job["tokens_done"] == 8 * 16
    served = str(fleet.root / "caches" / job["cache_id"])
    assert_same_cache(served, embedded_cache(spec, tmp_path / "embedded"))


def test_teacher_cache_over_http_equals_local(
    done_job: tuple[Fleet, dict[str, Any], dict[str, Any]],
) -> None:
    fleet, _, job = done_job
    remote = TeacherCache(fleet.cache_url(job["cache_id"]))
    local = TeacherCache(fleet.root / "caches" / job["cache_id"])
    assert remote.manifest == local.manifest and remote.is_complete
    for rows in ([0, 5, 7], [3], list(range(8)), [6, 1, 6]):
        a, b = remote.batch(rows), local.batch(rows)
        assert sorted(a) == sorted(b) and "hidden_2" in a and "topk_logsumexp" in a
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]), key


def test_zarr_fsspec_store_opens_the_served_group(
    done_job: tuple[Fleet, dict[str, Any], dict[str, Any]],
) -> None:
    fleet, _, job = done_job
    store = zarr.storage.FsspecStore.from_url(
        f"{fleet.cache_url(job['cache_id'])}/store", read_only=True
    )
    group = zarr.open_group(store, mode="r")
    manifest = dict(group.attrs["kdcache"])  # type: ignore[arg-type]
    assert manifest["cache_id"] == job["cache_id"]
    local = zarr.open_group(fleet.root / "caches" / job["cache_id"], mode="r")
    for name in ("input_ids", "topk/logprobs", "topk/indices", "hidden/1"):
        remote_arr, local_arr = group[name], local[name]
        assert isinstance(remote_arr, zarr.Array) and isinstance(local_arr, zarr.Array)
        np.testing.assert_array_equal(remote_arr[:], local_arr[:], err_msg=name)
    ids = group["input_ids"]
    assert isinstance(ids, zarr.Array)
    assert np.asarray(ids[2:5, 3:7]).shape == (3, 4)  # a partial read: HTTP Range


def test_inspect_and_verify_a_served_cache(
    done_job: tuple[Fleet, dict[str, Any], dict[str, Any]],
) -> None:
    import json
    import subprocess
    import sys

    fleet, _, job = done_job
    url = fleet.cache_url(job["cache_id"])
    run = [sys.executable, "-m", "kdcache.cli"]
    info = subprocess.run([*run, "inspect", url, "--json"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    body = json.loads(info.stdout)
    assert body["complete"] and body["shards_done"] == 4 and body["tokens"] == 8 * 16
    verify = subprocess.run([*run, "verify", url], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert "4/4 completed shards verified ok" in verify.stdout
