"""/v1/jobs: submit (201, then 200 for the same cache), validation, listing, progress, cancel."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from _svc import ADMIN_H, WORKER_H, BuiltCache, claim, make_settings, record_body
from fastapi.testclient import TestClient

from kdcache.core.resolve import resolve_job
from kdcache.core.spec import parse_spec


def test_submit_creates_then_returns_the_same_cache(
    client: TestClient, spec: dict[str, Any]
) -> None:
    first = client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    assert first.status_code == 201, first.text
    job = first.json()
    assert job["cache_id"] == resolve_job(parse_spec(spec)).cache_id
    assert job["status"] == "pending"
    assert (job["shards_total"], job["shards_done"], job["rows_total"]) == (4, 0, 8)
    assert job["cache_url"].endswith(f"/caches/{job['cache_id']}")
    assert job["spec"]["teacher"]["hf"] == spec["teacher"]["hf"]
    assert job["created_at"].endswith(("Z", "+00:00"))
    again = client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    assert again.status_code == 200
    assert again.json()["id"] == job["id"]
    other = client.post("/v1/jobs", json={**spec, "outputs": {"topk": 3}}, headers=ADMIN_H)
    assert other.status_code == 201 and other.json()["cache_id"] != job["cache_id"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"outputs": {"topk": 100_000}}, "outputs.topk"),
        ({"outputs": {"topk": -1}}, "outputs.topk"),
        ({"teacher": {"hf": "/no/such/teacher"}}, "teacher.hf"),
        ({"outputs": {"topk": 4, "hidden_layers": [99]}}, "outputs.hidden_layers"),
        ({"rows_per_shard": 0}, "rows_per_shard"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_spec_is_422_naming_the_field(
    client: TestClient, spec: dict[str, Any], change: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/jobs", json={**spec, **change}, headers=ADMIN_H)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_spec"
    assert field in [p["field"] for p in err["problems"]]
    assert field in err["message"]


def test_every_problem_is_reported_at_once(client: TestClient, spec: dict[str, Any]) -> None:
    bad = {**spec, "teacher": {"hf": "/nope"}, "dataset": {"tokens": "/nope.npy"}}
    r = client.post("/v1/jobs", json=bad, headers=ADMIN_H)
    fields = {p["field"] for p in r.json()["error"]["problems"]}
    assert {"teacher.hf", "dataset.tokens"} <= fields


@pytest.mark.parametrize("body", [[1, 2], "text", None])
def test_a_body_that_is_not_an_object_is_422(client: TestClient, body: Any) -> None:
    r = client.post("/v1/jobs", json=body, headers=ADMIN_H)
    assert r.status_code == 422
    assert r.json()["error"]["code"] in ("invalid_spec", "invalid_request")


def test_list_filter_get_and_404(client: TestClient, spec: dict[str, Any]) -> None:
    a = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    b = client.post("/v1/jobs", json={**spec, "outputs": {"topk": 2}}, headers=ADMIN_H).json()
    client.post(f"/v1/jobs/{a['id']}/cancel", headers=ADMIN_H)
    listed = client.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in listed] == [b["id"], a["id"]]  # newest first
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled").json()["jobs"]] == [a["id"]]
    assert [j["id"] for j in client.get("/v1/jobs?status=pending").json()["jobs"]] == [b["id"]]
    assert len(client.get("/v1/jobs?limit=1").json()["jobs"]) == 1
    assert client.get("/v1/jobs?limit=1&offset=1").json()["jobs"][0]["id"] == a["id"]
    assert client.get("/v1/jobs?status=bogus").status_code == 422
    assert client.get(f"/v1/jobs/{b['id']}").json()["id"] == b["id"]
    missing = client.get("/v1/jobs/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_cancel_stops_leasing(client: TestClient, spec: dict[str, Any]) -> None:
    job = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN_H)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert claim(client).status_code == 204
    assert client.post("/v1/jobs/nope/cancel", headers=ADMIN_H).status_code == 404


def test_resubmitting_a_cancelled_job_keeps_completed_shards(
    tmp_path: Path, built_cache: BuiltCache, spec: dict[str, Any], make_client: Any
) -> None:
    built_cache.copy_to(tmp_path / "root", keep=set())
    c = make_client(make_settings(tmp_path / "root"))
    job = c.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    lease = claim(c).json()
    c.post(
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[0]),
        headers=WORKER_H,
    ).raise_for_status()
    c.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN_H).raise_for_status()
    again = c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    assert again.status_code == 201
    new = again.json()
    assert new["id"] != job["id"] and new["cache_id"] == job["cache_id"]
    assert (new["shards_done"], new["rows_done"]) == (1, 2)
    assert claim(c).json()["shard"] == 1


def test_a_cache_already_complete_on_disk_is_done_at_submit(
    tmp_path: Path, built_cache: BuiltCache, spec: dict[str, Any], make_client: Any
) -> None:
    built_cache.copy_to(tmp_path / "root")
    c = make_client(make_settings(tmp_path / "root"))
    r = c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    assert r.status_code == 201
    job = r.json()
    assert (job["status"], job["shards_done"], job["rows_done"], job["eta_s"]) == ("done", 4, 8, 0)
    assert job["tokens_done"] == 8 * 16
    assert job["tokens_per_s"] is None  # nothing was computed under this job
    assert claim(c).status_code == 204
    cancel = c.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN_H)
    assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "conflict"


def test_progress_rate_and_eta(
    tmp_path: Path, built_cache: BuiltCache, spec: dict[str, Any], make_client: Any
) -> None:
    built_cache.copy_to(tmp_path / "root", keep=set())
    c = make_client(make_settings(tmp_path / "root"))
    job = c.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    assert job["tokens_per_s"] is None and job["eta_s"] is None
    lease = claim(c).json()
    assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    time.sleep(0.05)
    done = c.post(
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[0]),
        headers=WORKER_H,
    ).json()
    assert (done["shards_done"], done["rows_done"], done["tokens_done"]) == (1, 2, 32)
    assert done["tokens_per_s"] > 0
    # 6 rows left at 2 rows per elapsed time: eta = 3 x elapsed = 3 x (32 / tokens_per_s)
    assert done["eta_s"] == pytest.approx(3 * 32 / done["tokens_per_s"], rel=1e-6)
