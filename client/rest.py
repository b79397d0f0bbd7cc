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

from kdcache.core.errors import Problem, ServiceError, SpecError
from kdcache.core.spec import JobSpec, load_spec

__all__ = ["TERMINAL", "CacheClient"]

TERMINAL = ("done", "failed", "cancelled")
_RETRY_STATUS = (502, 503, 504)


def _absolute_paths(spec: JobSpec, base: Path) -> JobSpec:
    """Make a spec file's relative paths absolute against the file's folder."""

    def fix(value: str | None) -> str | None:
        if value is None or "://" in value or Path(value).expanduser().is_absolute():
            return value
        return str((base / value).resolve())

    t, d = spec.teacher, spec.dataset
    return spec.model_copy(
        update={
            "teacher": t.model_copy(update={"hf": fix(t.hf)}),
            "dataset": d.model_copy(
                update={
                    "tokens": fix(d.tokens),
                    "jsonl": fix(d.jsonl),
                    "tokenizer": fix(d.tokenizer),
                }
            ),
        }
    )


class CacheClient:
    """A small synchronous client of the kdcache REST API (v1)."""

    def __init__(
        self,
        server: str | None = None,
        *,
        token: str | None = None,
        timeout: float = 30.0,
        retries: int = 3,
    ) -> None:
        server = server or os.environ.get("KDCACHE_SERVER")
        if not server:
            raise ValueError("no server: pass server= or set KDCACHE_SERVER")
        self.server = server.rstrip("/")
        self.token = token if token is not None else os.environ.get("KDCACHE_TOKEN")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.retries = retries
        self._http = httpx.Client(base_url=self.server, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        delay = 0.5
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, path, **kw)
            except httpx.TransportError as err:
                if attempt == self.retries:
                    raise ServiceError(
                        f"cannot reach {self.server}: {err}", status=0, code="unreachable"
                    ) from None
            else:
                if resp.status_code not in _RETRY_STATUS or attempt == self.retries:
                    break
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        if resp.status_code >= 400:
            self._raise(resp)
        return resp

    @staticmethod
    def _raise(resp: httpx.Response) -> None:
        try:
            body = resp.json()
        except ValueError:
            body = None
        err = body.get("error", {}) if isinstance(body, dict) else {}
        code, message = str(err.get("code", "")), str(err.get("message", resp.text[:500]))
        if resp.status_code == 422 and err.get("problems"):
            raise SpecError(
                Problem(p.get("field", "spec"), p.get("message", "")) for p in err["problems"]
            )
        raise ServiceError(
            f"{resp.request.method} {resp.request.url.path}: {resp.status_code} {code}: {message}",
            status=resp.status_code,
            code=code,
            body=body,
        )

    def submit(self, spec: JobSpec | dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
        """Submit a job (a spec, a dict, or a YAML/JSON file path); returns the Job.

        The answer's ``"created"`` is False when the same cache already existed.
        """
        if isinstance(spec, str | os.PathLike):
            path = Path(spec)
            spec = _absolute_paths(load_spec(path), path.absolute().parent)
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
            if job["status"] in TERMINAL:
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
