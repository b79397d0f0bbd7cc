"""/v1/caches: the index and one cache's manifest and completed shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _svc import ADMIN_H, BuiltCache, make_settings
from fastapi.testclient import TestClient


def test_index_and_detail_before_any_worker(client: TestClient, spec: dict[str, Any]) -> None:
    job = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    caches = client.get("/v1/caches").json()["caches"]
    assert caches == [
        {
            "cache_id": job["cache_id"],
            "name": "svc-test",
            "job_id": job["id"],
            "status": "pending",
            "shards_done": 0,
            "shards_total": 4,
            "rows_done": 0,
            "num_rows": 8,
        }
    ]
    detail = client.get(f"/v1/caches/{job['cache_id']}").json()
    assert detail == {
        "cache_id": job["cache_id"],
        "manifest": None,  # no worker has created the cache group yet
        "shards_total": 4,
        "shards_done": 0,
        "complete": False,
        "completed": [],
    }
    assert client.get(f"/v1/caches/{'0' * 32}").status_code == 404
    assert client.get("/v1/caches/not-hex").status_code == 404


def test_detail_lists_completed_records_and_the_manifest(
    tmp_path: Path, built_cache: BuiltCache, spec: dict[str, Any], make_client: Any
) -> None:
    built_cache.copy_to(tmp_path / "root", keep={0, 2})
    c: TestClient = make_client(make_settings(tmp_path / "root"))
    job = c.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    detail = c.get(f"/v1/caches/{job['cache_id']}").json()
    assert (detail["shards_done"], detail["complete"]) == (2, False)
    assert [r["shard"] for r in detail["completed"]] == [0, 2]
    assert detail["completed"][1]["checksums"] == built_cache.records[2].checksums
    assert detail["manifest"]["cache_id"] == job["cache_id"]
    assert detail["manifest"]["rows_per_shard"] == 2
    summary = c.get("/v1/caches").json()["caches"][0]
    assert (summary["shards_done"], summary["rows_done"]) == (2, 4)
