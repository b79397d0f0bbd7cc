"""CacheClient: the service's REST API for people and scripts (submit, watch, list, open).

The server comes from the argument or ``KDCACHE_SERVER``, the bearer token from the argument or
``KDCACHE_TOKEN``. Errors come back as :class:`kdcache.core.errors.ServiceError`; a rejected spec
as :class:`kdcache.core.errors.SpecError` listing every problem with its field.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from kdcache.core.resolve import absolute_paths
from kdcache.core.rest import ServiceLink, server_from_env, token_from_env
from kdcache.core.retry import RetryPolicy
from kdcache.core.spec import JobSpec, load_spec
from kdcache.core.wire import TERMINAL_JOB_STATES

__all__ = ["CacheClient"]


class CacheClient:
    """A small synchronous client of the kdcache REST API (v1).

    Transient failures (no answer, 408, 429, 5xx) are retried under ``retry`` (default: 4 tries
    within 60 s); errors are the classes of :mod:`kdcache.core.errors` the service raised.
    """

    def __init__(
        self,
        server: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.server = server_from_env(server)
        self.token = token_from_env(token)
        retry = retry if retry is not None else RetryPolicy(seconds=60.0, attempts=4)
        self._link = ServiceLink(self.server, self.token, retry=retry, timeout=timeout)

    def close(self) -> None:
        self._link.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self._link.request(method, path, **kw)

    def submit(self, spec: JobSpec | dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
        """Submit a job (a spec, a dict, or a YAML/JSON file path); returns the Job.

        The answer's ``"created"`` is False when the same cache already existed.
        """
        if isinstance(spec, str | os.PathLike):
            path = Path(spec)
            spec = absolute_paths(load_spec(path), path.absolute().parent)
        body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
        resp = self._request("POST", "/v1/jobs", json=body)
        job: dict[str, Any] = resp.json()
        job["created"] = resp.status_code == 201
        return job

    def jobs(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else None
        return list(self._request("GET", "/v1/jobs", params=params).json()["jobs"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def wait(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        poll: float = 1.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it is done, failed or cancelled (or ``timeout`` seconds pass)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in TERMINAL_JOB_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)

    def caches(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/caches").json()["caches"])

    def cache(self, cache_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/caches/{cache_id}").json())

    def cache_url(self, cache_id: str) -> str:
        """The URL that TeacherCache and CacheDataset read a served cache from."""
        return f"{self.server}/v1/caches/{cache_id}"

    def open(self, cache_id: str) -> Any:
        """A :class:`TeacherCache` reading the served cache."""
        from kdcache.client.cache import TeacherCache

        return TeacherCache(self.cache_url(cache_id), token=self.token)

    def healthz(self) -> dict[str, Any]:
        return dict(self._request("GET", "/healthz").json())
