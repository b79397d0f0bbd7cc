"""Bearer tokens per route class (401 vs 403, admin everywhere, open classes) and body limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _svc import ADMIN, ADMIN_H, READ, WORKER, make_settings, serve
from fastapi.testclient import TestClient

from kdcache.service import create_app

ROUTES: list[tuple[str, str, str, Any]] = [
    ("admin", "POST", "/v1/jobs", {}),
    ("admin", "POST", "/v1/jobs/x/cancel", None),
    ("worker", "POST", "/v1/leases", {"worker": "w"}),
    ("worker", "POST", "/v1/leases/x/heartbeat", None),
    ("worker", "POST", "/v1/leases/x/complete", {"record": {}}),
    ("worker", "POST", "/v1/leases/x/fail", {"message": "m"}),
    ("read", "GET", "/v1/jobs", None),
    ("read", "GET", "/v1/jobs/x", None),
    ("read", "GET", "/v1/caches", None),
    ("read", "GET", "/v1/caches/ab", None),
    ("read", "GET", "/v1/caches/ab/store/zarr.json", None),
    ("read", "HEAD", "/v1/caches/ab/store/zarr.json", None),
]
TOKENS = {"admin": ADMIN, "worker": WORKER, "read": READ}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("auth") / "root"
    with serve(create_app(make_settings(root, read_token=READ))) as url:
        yield url


def _call(url: str, method: str, path: str, body: Any, token: str | None, scheme: str = "Bearer"):
    headers = {"Authorization": f"{scheme} {token}".strip()} if token is not None else {}
    return httpx.request(method, url + path, json=body, headers=headers)


@pytest.mark.parametrize(("cls", "method", "path", "body"), ROUTES)
def test_missing_or_malformed_authorization_is_401(
    server: str, cls: str, method: str, path: str, body: Any
) -> None:
    for r in (
        _call(server, method, path, body, None),
        _call(server, method, path, body, TOKENS[cls], scheme="Basic"),
        _call(server, method, path, body, "", scheme="Bearer"),
    ):
        assert r.status_code == 401, (path, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
        if method != "HEAD":
            assert r.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize(("cls", "method", "path", "body"), ROUTES)
def test_wrong_token_is_403(server: str, cls: str, method: str, path: str, body: Any) -> None:
    others = [t for c, t in TOKENS.items() if c not in (cls, "admin")] + ["nonsense"]
    for token in others:
        r = _call(server, method, path, body, token)
        assert r.status_code == 403, (path, token, r.status_code)
        if method != "HEAD":
            assert r.json()["error"]["code"] == "forbidden"


@pytest.mark.parametrize(("cls", "method", "path", "body"), ROUTES)
def test_own_token_and_admin_token_pass(
    server: str, cls: str, method: str, path: str, body: Any
) -> None:
    for token in {TOKENS[cls], ADMIN}:
        r = _call(server, method, path, body, token)
        assert r.status_code not in (401, 403), (path, token, r.status_code)


def test_unset_tokens_open_their_class(tmp_path: Path, make_client: Any) -> None:
    settings = make_settings(tmp_path / "root", worker_token=None)
    assert settings.open_routes() == ["worker", "read"]
    c: TestClient = make_client(settings)
    assert c.get("/v1/jobs").status_code == 200
    assert c.post("/v1/leases", json={"worker": "w"}).status_code == 204
    assert c.post("/v1/jobs", json={}).status_code == 401
    assert c.post("/v1/jobs", json={}, headers=ADMIN_H).status_code == 422


def test_healthz_and_metrics_need_no_token(server: str) -> None:
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok", "db": "ok"}
    assert httpx.get(f"{server}/metrics").status_code == 200


def test_request_bodies_are_bounded(tmp_path: Path, make_client: Any) -> None:
    c: TestClient = make_client(make_settings(tmp_path / "root", max_body_bytes=2048))
    big = {"name": "x" * 4096}
    r = c.post("/v1/jobs", json=big, headers=ADMIN_H)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        yield b'{"name": "'
        for _ in range(10):
            yield b"y" * 512
        yield b'"}'

    streamed = c.post(
        "/v1/jobs", content=chunks(), headers={**ADMIN_H, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    small = c.post("/v1/jobs", json={"name": "x"}, headers=ADMIN_H)
    assert small.status_code == 422  # within the limit: validated as a spec
