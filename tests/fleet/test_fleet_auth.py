"""Tokens: ``serve`` refuses open routes off loopback; workers and submitters need their token."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from fleet_helpers import Fleet, slow_spec

from kdcache.cli.main import main
from kdcache.core.errors import ServiceError
from kdcache.worker.lease import run_worker

pytestmark = pytest.mark.integration


def test_serve_refuses_open_routes_off_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("ADMIN", "WORKER", "READ"):
        monkeypatch.delenv(f"KDCACHE_{name}_TOKEN", raising=False)
    monkeypatch.setenv("KDCACHE_ADMIN_TOKEN", "secret-admin")
    assert main(["serve", "--root", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "KDCACHE_WORKER_TOKEN" in err and "KDCACHE_ADMIN_TOKEN" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_tokens_are_required_and_accepted(
    fleet_factory: Callable[..., Fleet],
    slow_tokens: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {"KDCACHE_ADMIN_TOKEN": "adm-secret", "KDCACHE_WORKER_TOKEN": "wrk-secret"}
    fleet = fleet_factory(env=env)
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(slow_spec(slow_tokens, rows_per_shard=12)))

    assert main(["submit", str(job_file), "--server", fleet.url]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: unauthorized: ") and len(lines) <= 2, err
    assert lines[1:] == [] or lines[1].startswith("hint: ") and "KDCACHE_TOKEN" in lines[1], err
    assert main(["submit", str(job_file), "--server", fleet.url, "--token", "wrk-secret"]) == 1
    capsys.readouterr()
    assert main(["submit", str(job_file), "--server", fleet.url, "--token", "adm-secret"]) == 0
    first, *_, last = capsys.readouterr().out.strip().splitlines()
    cache_id = first.split(" for cache ")[1].split()[0]
    assert last == f"{fleet.url}/v1/caches/{cache_id}"

    with pytest.raises(ServiceError) as refused:
        run_worker(fleet.url, token=None, once=True)
    assert refused.value.status in (401, 403) and "KDCACHE_TOKEN" in str(refused.value)
    stats = run_worker(fleet.url, token="wrk-secret", once=True, device="cpu")
    assert (stats.completed, stats.failed, stats.exit_reason) == (1, 0, "once")
