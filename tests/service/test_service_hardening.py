"""Inputs an attacker or a careless operator sends: never a 500, always an error naming what is
wrong (the three 500s of issue 11, the module-teacher allowlist, full storage)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from _svc import ADMIN_H, WORKER_H, BuiltCache, claim, make_settings, record_body
from fastapi.testclient import TestClient


@pytest.fixture
def cache_root(tmp_path: Path, built_cache: BuiltCache) -> Path:
    """A storage root holding the written cache with no completion records yet."""
    built_cache.copy_to(tmp_path / "root", keep=set())
    return tmp_path / "root"


def test_a_lone_surrogate_in_a_spec_is_422_naming_the_field(client: TestClient) -> None:
    body = '{"teacher": {"hf": "/nope"}, "dataset": {"tokens": "\\ud800.npy"}, "name": "x\\udfff"}'
    r = client.post(
        "/v1/jobs", content=body, headers={**ADMIN_H, "Content-Type": "application/json"}
    )
    assert r.status_code == 422, r.text
    fields = {p["field"] for p in r.json()["error"]["problems"]}
    assert {"dataset.tokens", "name"} <= fields


def test_a_teacher_config_that_is_a_json_list_is_422(
    client: TestClient, spec: dict[str, Any], tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, bad)
    (bad / "config.json").write_text(json.dumps([1, 2, 3]))
    r = client.post(
        "/v1/jobs", json={**spec, "teacher": {**spec["teacher"], "hf": str(bad)}}, headers=ADMIN_H
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["problems"][0]["field"] == "teacher.hf"
    assert "config.json" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "key",
    [
        "input_ids/c/9223372036854775808/0",
        "input_ids/c/0/99999999999999999999999",
        "_kdcache/shards/99999999999.json",
        "input_ids/c/٣/0",
    ],
)
def test_absurd_store_keys_are_404(client: TestClient, spec: dict[str, Any], key: str) -> None:
    job = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    r = client.get(f"/v1/caches/{job['cache_id']}/store/{key}")
    assert r.status_code == 404, r.text


def test_module_teachers_over_rest_need_the_allowlist(
    make_client: Any, spec: dict[str, Any], tmp_path: Path
) -> None:
    body = {**spec, "teacher": {"module": "os:abort", "device": "cpu"}}
    c = make_client(make_settings(tmp_path / "a"))
    r = c.post("/v1/jobs", json=body, headers=ADMIN_H)
    assert r.status_code == 422 and r.json()["error"]["field"] == "teacher.module", r.text
    assert "KDCACHE_TEACHER_MODULES" in r.json()["error"]["message"]
    allowed = make_client(make_settings(tmp_path / "b", teacher_modules="kdcache.worker.toy"))
    r = allowed.post("/v1/jobs", json=body, headers=ADMIN_H)
    assert r.status_code == 422 and "os" in r.json()["error"]["message"]


def test_full_storage_at_complete_is_507_and_retries_then_fails_the_job(
    cache_root: Path,
    built_cache: BuiltCache,
    spec: dict[str, Any],
    make_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOSPC while publishing a completion record (fault injection: the storage's write raises
    OSError(ENOSPC) as a full filesystem does): 507, the attempt is counted, and after
    max_attempts the job is failed with a message saying so; never left running."""
    from kdcache.core import storage

    def full(self: Any, key: str, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", key)

    monkeypatch.setattr(storage.LocalStorage, "write_bytes", full)
    c = make_client(make_settings(cache_root, max_attempts=2))
    job = c.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    for attempt in (1, 2):
        lease = claim(c).json()
        assert (lease["shard"], lease["attempt"]) == (0, attempt)
        r = c.post(
            f"/v1/leases/{lease['id']}/complete",
            json=record_body(built_cache.records[0]),
            headers=WORKER_H,
        )
        assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
    final = c.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "failed", final
    assert "No space left on device" in final["error"]
