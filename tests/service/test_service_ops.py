"""/healthz, /metrics, the OpenAPI document, and the error format of unknown routes."""

from __future__ import annotations

import random
import string
from typing import Any

from _svc import ADMIN_H, claim
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "db": "ok"}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_exposition(client: TestClient, spec: dict[str, Any]) -> None:
    client.post("/v1/jobs", json=spec, headers=ADMIN_H)
    claim(client)
    client.get("/v1/jobs/nope")
    r = client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for line in (
        "# TYPE kdcache_jobs gauge",
        "# TYPE kdcache_shards_done_total counter",
        "# TYPE kdcache_request_seconds histogram",
    ):
        assert line in text.splitlines(), line
    got = _samples(text)
    assert got[("kdcache_jobs", (("state", "running"),))] == 1
    assert got[("kdcache_jobs", (("state", "pending"),))] == 0
    assert got[("kdcache_shards_done_total", ())] == 0
    assert got[("kdcache_tokens_written_total", ())] == 0
    assert got[("kdcache_lease_expiries_total", ())] == 0
    # Labelled by route template (not the raw path), method and status.
    series = (("method", "GET"), ("route", "/v1/jobs/{job_id}"), ("status", "404"))
    assert got[("kdcache_request_seconds_count", series)] == 1
    assert got[("kdcache_request_seconds_bucket", tuple(sorted((*series, ("le", "+Inf")))))] == 1
    leases = (("method", "POST"), ("route", "/v1/leases"), ("status", "200"))
    assert got[("kdcache_request_seconds_count", leases)] == 1
    assert "/v1/jobs/nope" not in text
    buckets = [
        v
        for (name, labels), v in got.items()
        if name == "kdcache_request_seconds_bucket" and set(series) <= set(labels)
    ]
    assert len(buckets) == 12 and buckets == sorted(buckets)  # cumulative


def test_metrics_stay_bounded_under_random_methods_and_paths(client: TestClient) -> None:
    """3000 requests with made-up methods and paths add a handful of series, not 3000."""
    rng = random.Random(0)
    before = len(client.get("/metrics").content)
    for i in range(3000):
        method = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 12)))
        client.request(method, f"/x{i}/{rng.random()}")
    text = client.get("/metrics").text
    after = len(text.encode())
    print(f"/metrics: {before} bytes before, {after} bytes after 3000 random-method requests")
    methods = {labels for (name, labels) in _samples(text) if name.endswith("_count")}
    assert after < before + 8_000, (before, after)
    assert {dict(lab).get("method") for lab in methods} <= {"GET", "other"}


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
