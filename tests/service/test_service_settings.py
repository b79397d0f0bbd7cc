"""Settings from the environment (KDCACHE_ prefix), defaults, and the open-route report."""

from __future__ import annotations

from pathlib import Path

import pytest
from _svc import ADMIN_H
from fastapi.testclient import TestClient
from pydantic import ValidationError

from kdcache.service import Settings, create_app, get_settings


def test_from_environment_with_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDCACHE_ROOT", str(tmp_path / "r"))
    monkeypatch.setenv("KDCACHE_ADMIN_TOKEN", "tok-9f3e")
    monkeypatch.setenv("KDCACHE_LEASE_SECONDS", "7.5")
    s = Settings()
    assert s.root == str(tmp_path / "r")
    assert s.db_url == f"sqlite:///{tmp_path / 'r' / 'kdcache.db'}"
    assert (s.lease_seconds, s.max_attempts, s.max_body_bytes) == (7.5, 3, 1 << 20)
    assert s.token("admin") == "tok-9f3e" and s.token("worker") is None
    assert s.open_routes() == ["worker", "read"]
    assert "tok-9f3e" not in repr(s)  # tokens are secrets


def test_relative_root_is_made_absolute_and_remote_needs_a_db(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert Settings(root="rel").root == str(tmp_path / "rel")
    with pytest.raises(ValidationError, match="DB_URL"):
        Settings(root="s3://bucket/prefix")
    s = Settings(root="s3://bucket/prefix/", db_url="postgresql://u@h/db")
    assert s.root == "s3://bucket/prefix"


@pytest.mark.parametrize(
    ("field", "value"),
    [("lease_seconds", 0), ("max_attempts", 0), ("max_body_bytes", 10), ("root", " ")],
)
def test_bad_values_are_refused(tmp_path: Path, field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{"root": str(tmp_path), field: value})


def test_empty_token_means_unset(tmp_path: Path) -> None:
    s = Settings(root=str(tmp_path), admin_token="", worker_token="worker-token")
    assert s.open_routes() == ["admin", "read"]


def test_the_settings_dependency_can_be_overridden(tmp_path: Path) -> None:
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: Settings(
        root=str(tmp_path / "o"),
        admin_token="override",
    )
    with TestClient(app) as c:
        assert (tmp_path / "o" / "kdcache.db").is_file()  # the lifespan used the override
        assert c.post("/v1/jobs", json={}, headers=ADMIN_H).status_code == 403
        ok = {"Authorization": "Bearer override"}
        assert c.post("/v1/jobs", json={}, headers=ok).status_code == 422
