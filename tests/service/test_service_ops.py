"""/healthz, /metrics, the OpenAPI document, and the error format of unknown routes."""

from __future__ import annotations

import re
from typing import Any

from _svc import ADMIN_H, claim
from fastapi.testclient import TestClient


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "db": "ok"}


def test_metrics_exposition(client: TestClient, spec: dict[str, Any]) -> None:
    client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    claim(client)
    client.get("/v1/jobs/nope")
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for line in (
        "# TYPE kdcache_jobs gauge",
        'kdcache_jobs{state="running"} 1',
        'kdcache_jobs{state="pending"} 0',
        "# TYPE kdcache_shards_done_total counter",
        "kdcache_shards_done_total 0",
        "kdcache_tokens_written_total 0",
        "kdcache_lease_expiries_total 0",
        "# TYPE kdcache_request_seconds histogram",
    ):
        assert line in text.splitlines(), line
    # Labelled by route template (not the raw path), method and status.
    series = 'route="/v1/jobs/{job_id}",method="GET",status="404"'
    assert f'kdcache_request_seconds_bucket{{{series},le="+Inf"}} 1' in text
    assert f"kdcache_request_seconds_count{{{series}}} 1" in text
    assert re.search(
        r'kdcache_request_seconds_count\{route="/v1/leases",method="POST",'
        r'status="200"\} 1',
        text,
    )
    assert "/v1/jobs/nope" not in text
    buckets = [
        int(v)
        for v in re.findall(
            rf'kdcache_request_seconds_bucket{{{re.escape(series)},le="[^"]+"}} (\d+)', text
        )
    ]
    assert buckets == sorted(buckets)  # cumulative


def test_unknown_routes_use_the_error_format(client: TestClient) -> None:
    r = client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.delete("/v1/jobs")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openapi_declares_every_route_with_models_and_errors(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    expected = {
        ("/v1/jobs", "post"),
        ("/v1/jobs", "get"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/leases", "post"),
        ("/v1/leases/{lease_id}/heartbeat", "post"),
        ("/v1/leases/{lease_id}/complete", "post"),
        ("/v1/leases/{lease_id}/fail", "post"),
        ("/v1/caches", "get"),
        ("/v1/caches/{cache_id}", "get"),
        ("/v1/caches/{cache_id}/store/{key}", "get"),
        ("/v1/caches/{cache_id}/store/{key}", "head"),
        ("/healthz", "get"),
        ("/metrics", "get"),
    }
    found = {(p, m) for p, ops in paths.items() for m in ops}
    assert expected <= found
    for path, method in expected:
        op = paths[path][method]
        assert "200" in op["responses"], (path, method)
        if path.startswith("/v1/"):
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }
    body = paths["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"] == "#/components/schemas/JobSpec"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert "204" in paths["/v1/leases"]["post"]["responses"]
    assert "bearer" in str(doc["components"]["securitySchemes"]).lower()
