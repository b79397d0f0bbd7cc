"""The dashboard's server side: the token cookie, the JSON it polls, reports, offline /docs, and
the Grafana dashboard's queries (every metric it names is one /metrics exports)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _svc import ADMIN_H, READ, WORKER_H, BuiltCache, claim, make_settings, record_body
from fastapi.testclient import TestClient

from kdcache.service import Settings

REPO = Path(__file__).resolve().parents[2]


def test_read_token_becomes_a_cookie(
    tmp_path: Path, make_client: Callable[[Settings], TestClient]
) -> None:
    c = make_client(make_settings(tmp_path / "root", read_token=READ))
    page = c.get("/")
    assert page.status_code == 200 and '<table id="jobs"' in page.text
    assert c.get("/v1/dashboard").status_code == 401  # the page shows its token box then
    wrong = c.get("/?token=nope", follow_redirects=False)
    assert wrong.status_code == 303 and wrong.headers["location"] == "./"
    assert c.get("/v1/dashboard").status_code == 403
    ok = c.get(f"/?token={READ}", follow_redirects=False)
    cookie = ok.headers["set-cookie"]
    assert "kdcache_token=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    state = c.get("/v1/dashboard")
    assert state.status_code == 200 and state.json()["jobs"] == []
    # the cookie opens reads only: submitting still needs the admin bearer token
    assert c.post("/v1/jobs", json={}).status_code == 401


def test_dashboard_state_has_jobs_leases_and_workers(
    client: TestClient, settings: Settings, spec: dict[str, Any], built_cache: BuiltCache
) -> None:
    built_cache.copy_to(Path(settings.root), keep=set())  # shard files, no completion yet
    job = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    lease = claim(client, worker="gpu-node-7").json()
    state = client.get("/v1/dashboard").json()
    (j,) = state["jobs"]
    assert j["id"] == job["id"] and j["status"] == "running" and "spec" not in j
    (active,) = state["leases"]
    assert active["worker"] == "gpu-node-7" and active["shard"] == lease["shard"]
    assert active["job_name"] == spec["name"]
    assert abs(active["last_heartbeat"] - state["now"]) < 60
    (w,) = state["workers"]
    assert w["worker"] == "gpu-node-7" and w["active"] == 1 and w["done"] == 0
    rec = built_cache.records[lease["shard"]]
    done = client.post(
        f"/v1/leases/{lease['id']}/complete", json=record_body(rec), headers=WORKER_H
    )
    assert done.status_code == 200, done.text
    state = client.get("/v1/dashboard").json()
    assert state["leases"] == [] and state["workers"][0]["done"] == 1
    assert state["jobs"][0]["shards_done"] == 1


def test_cache_report_page(
    client: TestClient, settings: Settings, spec: dict[str, Any], built_cache: BuiltCache
) -> None:
    built_cache.copy_to(Path(settings.root))
    job = client.post("/v1/jobs", json=spec, headers=ADMIN_H).json()
    assert job["status"] == "done"  # every shard was complete already
    page = client.get(f"/v1/caches/{job['cache_id']}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Tail mass vs k" in page.text and page.text.count("data:image/png;base64,") >= 4
    assert client.get(f"/v1/caches/{'0' * 32}/report").status_code == 404


def test_docs_work_offline(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    urls = re.findall(r"""(?:src|href)=["']([^"']+)""", docs.text) + re.findall(
        r"url: ?'([^']+)'", docs.text
    )
    assert urls and not [u for u in urls if re.match(r"(https?:)?//", u)], urls
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        r = client.get(f"/static/swagger/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000
    assert client.get("/static/dashboard.js").status_code == 200
    assert client.get("/redoc").status_code == 404  # it would load from a CDN


def test_grafana_dashboard_queries_exported_metrics(client: TestClient) -> None:
    client.get("/healthz")
    exported = set(re.findall(r"^# TYPE (\S+) (\S+)", client.get("/metrics").text, re.M))
    names = {n for n, _ in exported} | {
        f"{n}_{s}"
        for n, kind in exported
        if kind == "histogram"
        for s in ("bucket", "count", "sum")
    }
    dash = json.loads((REPO / "docker" / "grafana" / "kdcache-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 5
    for expr in exprs:
        used = set(re.findall(r"\bkdcache_[a-z_]+", expr))
        assert used and used <= names, (expr, used - names)
