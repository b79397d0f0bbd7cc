"""/v1/leases: claim order, expiry, heartbeats, complete (and its checks), fail and retries."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from _svc import ADMIN_H, WORKER_H, BuiltCache, claim, make_settings, record_body
from fastapi.testclient import TestClient

from kdcache.core.layout import record_key


@pytest.fixture
def cache_root(tmp_path: Path, built_cache: BuiltCache) -> Path:
    """A storage root holding the written cache with no completion records yet."""
    built_cache.copy_to(tmp_path / "root", keep=set())
    return tmp_path / "root"


def _wait_past(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.time()) + 0.05)


def test_claims_go_oldest_job_first_then_lowest_shard(
    client: TestClient, spec: dict[str, Any]
) -> None:
    old = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    new = client.post("/v1/jobs", json={**spec, "outputs": {"topk": 2}}, headers=ADMIN_H).json()
    got = [claim(client).json() for _ in range(5)]
    assert [(g["job_id"], g["shard"]) for g in got] == [(old["id"], i) for i in range(4)] + [
        (new["id"], 0)
    ]
    first = got[0]
    assert (first["start"], first["end"], first["attempt"], first["lease_seconds"]) == (
        0,
        2,
        1,
        120,
    )
    assert first["cache_id"] == old["cache_id"] and first["cache_url"] == old["cache_url"]
    assert first["spec"] == old["spec"]
    assert first["deadline"] == pytest.approx(time.time() + 120, abs=5)
    only_new = claim(client, job_id=new["id"]).json()
    assert (only_new["job_id"], only_new["shard"]) == (new["id"], 1)
    assert claim(client, job_id="nope").status_code == 404


def test_nothing_to_do_is_204_without_a_body(client: TestClient) -> None:
    r = claim(client)
    assert r.status_code == 204 and r.content == b""


def test_expired_lease_returns_the_shard_and_stale_completion_is_409(
    cache_root: Path, built_cache: BuiltCache, spec: dict[str, Any], make_client: Any
) -> None:
    c = make_client(make_settings(cache_root, lease_seconds=0.3))
    c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    stale = claim(c, "slow").json()
    _wait_past(stale["deadline"])
    fresh = claim(c, "fast").json()
    assert (fresh["shard"], fresh["attempt"]) == (stale["shard"], 2)
    body = record_body(built_cache.records[0])
    lost = c.post(f"/v1/leases/{stale['id']}/complete", json=body, headers=WORKER_H)
    assert lost.status_code == 409 and lost.json()["error"]["code"] == "lease_lost"
    beat = c.post(f"/v1/leases/{stale['id']}/heartbeat", headers=WORKER_H)
    assert beat.status_code == 409 and beat.json()["error"]["code"] == "lease_lost"
    ok = c.post(f"/v1/leases/{fresh['id']}/complete", json=body, headers=WORKER_H)
    assert ok.status_code == 200 and ok.json()["shards_done"] == 1
    assert "kdcache_lease_expiries_total 1" in c.get("/metrics").text


def test_an_expired_lease_not_yet_re_leased_may_still_complete(
    cache_root: Path, built_cache: BuiltCache, spec: dict[str, Any], make_client: Any
) -> None:
    c = make_client(make_settings(cache_root, lease_seconds=0.2))
    c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    lease = claim(c).json()
    _wait_past(lease["deadline"])
    r = c.post(
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[0]),
        headers=WORKER_H,
    )
    assert r.status_code == 200 and r.json()["shards_done"] == 1
    assert claim(c).json()["shard"] == 1  # shard 0 is done, not back in the queue


def test_heartbeat_extends_and_revives_an_expired_unclaimed_lease(
    client: TestClient, spec: dict[str, Any], make_client: Any, tmp_path: Path
) -> None:
    c = make_client(make_settings(tmp_path / "r2", lease_seconds=0.3))
    c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    lease = claim(c).json()
    _wait_past(lease["deadline"])
    beat = c.post(f"/v1/leases/{lease['id']}/heartbeat", headers=WORKER_H)
    assert beat.status_code == 200
    assert beat.json()["cancelled"] is False
    assert beat.json()["deadline"] > lease["deadline"]
    # Revived: the next claim gets shard 1, not the revived shard 0.
    assert claim(c).json()["shard"] == 1
    assert c.post("/v1/leases/nope/heartbeat", headers=WORKER_H).status_code == 404


def test_complete_marks_done_and_publishes_the_record(
    cache_root: Path, built_cache: BuiltCache, spec: dict[str, Any], make_client: Any
) -> None:
    c = make_client(make_settings(cache_root))
    job = c.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    cache_dir = cache_root / "caches" / job["cache_id"]
    for shard in range(4):
        lease = claim(c).json()
        assert lease["shard"] == shard
        assert not (cache_dir / record_key(shard)).exists()
        r = c.post(
            f"/v1/leases/{lease['id']}/complete",
            json=record_body(built_cache.records[shard]),
            headers=WORKER_H,
        )
        assert r.status_code == 200, r.text
        published = json.loads((cache_dir / record_key(shard)).read_text())
        assert published["checksums"] == built_cache.records[shard].checksums
    assert r.json()["status"] == "done" and r.json()["shards_done"] == 4
    again = c.post(  # a retry whose first answer was lost: idempotent
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[3]),
        headers=WORKER_H,
    )
    assert again.status_code == 200 and again.json()["shards_done"] == 4
    other = c.post(  # the same lease claiming other data is refused
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[2]),
        headers=WORKER_H,
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "job_cancelled"
    detail = c.get(f"/v1/caches/{job['cache_id']}").json()
    assert detail["complete"] is True
    assert [r["shard"] for r in detail["completed"]] == [0, 1, 2, 3]
    assert detail["manifest"]["cache_id"] == job["cache_id"]
    metrics = c.get("/metrics").text
    assert "kdcache_shards_done_total 4" in metrics
    assert "kdcache_tokens_written_total 128" in metrics
    assert 'kdcache_jobs{state="done"} 1' in metrics


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"start": 1}, "record.start"),
        ({"end": 3}, "record.end"),
        ({"shard": 1}, "record.shard"),
        ({"checksums": {"input_ids": "0" * 64}}, "record.checksums"),
    ],
)
def test_complete_rejects_a_record_that_disagrees(
    cache_root: Path,
    built_cache: BuiltCache,
    spec: dict[str, Any],
    make_client: Any,
    change: dict[str, Any],
    field: str,
) -> None:
    c = make_client(make_settings(cache_root))
    c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    lease = claim(c).json()
    body = record_body(built_cache.records[0])
    body["record"].update(change)
    r = c.post(f"/v1/leases/{lease['id']}/complete", json=body, headers=WORKER_H)
    assert r.status_code == 422
    assert (r.json()["error"]["code"], r.json()["error"]["field"]) == ("invalid_record", field)
    ok = c.post(
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[0]),
        headers=WORKER_H,
    )
    assert ok.status_code == 200  # the lease survived the rejected attempt


def test_complete_before_the_cache_exists_is_422(
    client: TestClient, spec: dict[str, Any], built_cache: BuiltCache
) -> None:
    client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    lease = claim(client).json()
    r = client.post(
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[0]),
        headers=WORKER_H,
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "record"


def test_fail_retries_then_fails_the_job_with_the_message(
    client: TestClient, spec: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    for attempt in (1, 2, 3):
        lease = claim(client).json()
        assert (lease["shard"], lease["attempt"]) == (0, attempt)
        r = client.post(
            f"/v1/leases/{lease['id']}/fail",
            json={"message": f"CUDA OOM #{attempt}"},
            headers=WORKER_H,
        )
        assert r.status_code == 200
    failed = r.json()
    assert failed["status"] == "failed"
    assert failed["error"] == "shard 0: CUDA OOM #3"
    assert client.get(f"/v1/jobs/{job['id']}").json()["error"] == "shard 0: CUDA OOM #3"
    assert claim(client).status_code == 204


def test_release_requeues_without_counting_an_attempt(
    client: TestClient, spec: dict[str, Any]
) -> None:
    client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    for _ in range(5):  # more than MAX_ATTEMPTS preemptions of the same shard
        lease = claim(client).json()
        assert (lease["shard"], lease["attempt"]) == (0, 1)
        r = client.post(
            f"/v1/leases/{lease['id']}/fail",
            json={"message": "SIGTERM", "release": True},
            headers=WORKER_H,
        )
        assert r.status_code == 200 and r.json()["status"] in ("pending", "running")
        assert r.json()["error"] is None


def test_non_retryable_failure_fails_the_job_at_once(
    client: TestClient, spec: dict[str, Any]
) -> None:
    client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    a, b = claim(client).json(), claim(client).json()
    r = client.post(
        f"/v1/leases/{b['id']}/fail",
        json={"message": "token id 999 >= vocab", "retryable": False},
        headers=WORKER_H,
    )
    assert (r.json()["status"], r.json()["error"]) == ("failed", "shard 1: token id 999 >= vocab")
    beat = client.post(f"/v1/leases/{a['id']}/heartbeat", headers=WORKER_H)
    assert beat.status_code == 409 and beat.json()["error"]["code"] == "job_cancelled"


def test_fail_from_a_lost_lease_is_409(client: TestClient, spec: dict[str, Any]) -> None:
    client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    lease = claim(client).json()
    client.post(f"/v1/leases/{lease['id']}/fail", json={"message": "x"}, headers=WORKER_H)
    again = client.post(f"/v1/leases/{lease['id']}/fail", json={"message": "x"}, headers=WORKER_H)
    assert again.status_code == 409 and again.json()["error"]["code"] == "lease_lost"


def test_cancel_tells_heartbeats_and_releases_the_shard(
    client: TestClient, spec: dict[str, Any]
) -> None:
    job = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    lease = claim(client).json()
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=ADMIN_H).raise_for_status()
    beat = client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=WORKER_H)
    assert beat.status_code == 409
    assert beat.json()["error"]["code"] == "job_cancelled"
    assert claim(client).status_code == 204
    resubmitted = client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    assert resubmitted.status_code == 201
    assert claim(client).json()["shard"] == 0


def test_expiries_have_their_own_budget_then_fail_the_job(
    cache_root: Path, spec: dict[str, Any], make_client: Any
) -> None:
    """Expiries do not use up failure attempts (max_attempts=1 here); their own budget does."""
    settings = make_settings(cache_root, lease_seconds=0.2, max_attempts=1, max_expiries=3)
    c = make_client(settings)
    job = c.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    for _ in range(3):
        lease = claim(c).json()
        assert lease["shard"] == 0, lease
        _wait_past(lease["deadline"])
        assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    assert claim(c).status_code == 204  # this claim sees the third expiry: the job fails
    failed = c.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"].startswith("shard 0: ")
    assert "expired 3 times" in failed["error"]


def test_many_dead_workers_never_fail_a_job_that_others_finish(
    cache_root: Path, spec: dict[str, Any], make_client: Any, built_cache: BuiltCache
) -> None:
    """Nine workers die right after claiming (the issue's report: the job failed after 9): the
    default budgets keep the job running, and a tenth worker completes the shard."""
    c = make_client(make_settings(cache_root, lease_seconds=0.2))
    job = c.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    for _ in range(9):
        lease = claim(c).json()
        assert lease["shard"] == 0
        _wait_past(lease["deadline"])
    lease = claim(c).json()
    assert lease["shard"] == 0
    assert c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    r = c.post(
        f"/v1/leases/{lease['id']}/complete",
        json=record_body(built_cache.records[0]),
        headers=WORKER_H,
    )
    assert r.status_code == 200, r.text
    assert r.json()["shards_done"] == 1


def test_after_a_restart_old_leases_get_a_lease_period_to_come_back(
    cache_root: Path, spec: dict[str, Any], make_client: Any
) -> None:
    """A lease whose deadline passed while the service was down is not taken over at once:
    its worker may be waiting to complete a computed shard."""
    settings = make_settings(cache_root, lease_seconds=1.0)
    c = make_client(settings)
    c.post("/v1/jobs", json=spec, headers=ADMIN_H)
    first = claim(c).json()
    _wait_past(first["deadline"])
    restarted = make_client(settings)  # a new service process on the same database
    assert claim(restarted).json()["shard"] != first["shard"]  # not re-leased yet
    time.sleep(1.1)
    assert claim(restarted).json()["shard"] == first["shard"]
