"""Property-based run of the OpenAPI document against a real server: no 5xx, responses as
documented (schemathesis, a bounded number of examples per operation)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")

from _svc import ADMIN_H, BuiltCache, make_settings, serve  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from kdcache.service import create_app  # noqa: E402

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


# The document is static: load it without a server; the cases run against a real one.
schema = schemathesis.openapi.from_dict(
    create_app(make_settings(Path("/nonexistent/kdcache-openapi"))).openapi()
)


@pytest.fixture(scope="module")
def base_url(
    tmp_path_factory: pytest.TempPathFactory, built_cache: BuiltCache, spec: dict[str, Any]
) -> Iterator[str]:
    """A real server with a job whose cache has shards 0-1 complete."""
    root: Path = tmp_path_factory.mktemp("fuzz") / "root"
    built_cache.copy_to(root, keep={0, 1})
    with serve(create_app(make_settings(root, max_attempts=1000))) as url:
        httpx.post(f"{url}/v1/jobs", json=spec, headers=ADMIN_H).raise_for_status()
        yield url


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_has_no_server_errors(case: Any, base_url: str) -> None:
    case.call_and_validate(base_url=base_url, headers=ADMIN_H, checks=CHECKS)
