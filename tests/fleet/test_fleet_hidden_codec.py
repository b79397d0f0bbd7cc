"""A ``pca:R`` job finished by two real workers: one basis for the whole cache (fitted by the
first worker to start, read by the other), and the same bytes as the embedded run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fleet_helpers import assert_same_cache, embedded_cache, new_fleet, records_by_writer

from kdcache.core.reader import CacheReader

pytestmark = pytest.mark.integration


def test_two_workers_share_one_pca_basis(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path, slow_teacher_dir: Path
) -> None:
    spec = {
        "name": "pca-two-workers",
        "teacher": {"hf": str(tiny_teacher_dir), "device": "cpu"},
        "dataset": {"tokens": str(tokens_npy)},
        "outputs": {"topk": 4, "hidden_layers": [1, 2], "hidden_codec": "pca:6"},
        "batch_size": 1,
        "rows_per_shard": 4,
    }
    fleet = new_fleet(tmp_path / "fleet", slow_teacher_dir).start()
    try:
        job = fleet.submit(spec)
        workers = [fleet.worker(max_idle=1.5), fleet.worker(max_idle=1.5)]
        done = fleet.wait_job(job["id"], timeout=120)
        for w in workers:
            assert fleet.wait_exit(w) == 0, fleet.log_of(w)
    finally:
        fleet.close()
    assert done["status"] == "done" and done["shards_done"] == 2
    served = str(fleet.root / "caches" / done["cache_id"])
    want = embedded_cache(spec, tmp_path / "embedded")
    assert_same_cache(served, want)
    a, b = CacheReader(served), CacheReader(want)
    for name, shape in a.manifest.basis_arrays():
        x = np.asarray(a.group[name][...])
        assert x.shape == shape and np.array_equal(x, np.asarray(b.group[name][...])), name
    assert len(records_by_writer(served)) == 2
