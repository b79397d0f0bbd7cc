"""The one HTTP link to the kdcache service: bearer token, error decoding, the retry policy.

The worker's lease loop and :class:`kdcache.client.CacheClient` (and ``TeacherCache`` over HTTP)
all talk to the service through :class:`ServiceLink`; an error answer comes back as the class of
:mod:`kdcache.core.errors` that the service raised (decoded by
:func:`~kdcache.core.errors.error_from_response`), no answer as
:class:`~kdcache.core.errors.Unreachable`.
"""

from __future__ import annotations

import functools
import os
import ssl
import threading
from collections.abc import Sequence
from typing import Any

import httpx

from kdcache.core.errors import KDCacheError, Unreachable, error_from_response
from kdcache.core.retry import RetryPolicy

__all__ = ["ServiceLink", "server_from_env", "token_from_env"]


def server_from_env(server: str | None) -> str:
    """``server``, else ``KDCACHE_SERVER``; ValueError when neither is set."""
    found = server or os.environ.get("KDCACHE_SERVER")
    if not found:
        raise ValueError("no server: pass server= or set KDCACHE_SERVER")
    return found.rstrip("/")


def token_from_env(token: str | None) -> str | None:
    """``token``, else ``KDCACHE_TOKEN`` (None: no Authorization header)."""
    return token if token is not None else os.environ.get("KDCACHE_TOKEN")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certifi's CAs, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``),
    built once per process: loading the CA bundle costs ~80 ms of CPU, which every
    ``TeacherCache``/``CacheClient`` opened (one per DataLoader worker, per reader) would
    otherwise pay again. An ``SSLContext`` is safe to share between clients and threads."""
    return httpx.create_ssl_context()


def _decode(resp: httpx.Response) -> KDCacheError:
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text[:500]
    return error_from_response(resp.status_code, body, f"{resp.request.method} {resp.url.path}")


class ServiceLink:
    """Requests to one service with its token; 2xx answers are returned, the rest raised.

    Transient failures (no answer, 408, 429, 5xx but 507) are retried under ``retry``;
    ``interrupt`` (``threading.Event`` s) cut the retrying short, e.g. a worker told to abort.
    Connections are kept alive and reused (one pool per process, safe after ``fork``).
    """

    def __init__(
        self,
        server: str,
        token: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        timeout: float = 30.0,
        interrupt: Sequence[threading.Event] = (),
    ) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self.retry = retry if retry is not None else RetryPolicy()
        self.interrupt = tuple(interrupt)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._pid = os.getpid()
        self.http = self._client()

    def _client(self) -> httpx.Client:
        # One keep-alive pool per process, shared by its threads (httpx.Client is thread-safe).
        return httpx.Client(
            base_url=self.server,
            headers=self._headers,
            timeout=self._timeout,
            verify=_tls_context(),
        )

    def _pool(self) -> httpx.Client:
        """This process's client: a forked child (DataLoader worker) must not write into its
        parent's sockets, so it opens its own pool and leaves the parent's alone."""
        if os.getpid() != self._pid:
            self._pid, self.http = os.getpid(), self._client()
        return self.http

    def _once(self, method: str, path: str, kw: dict[str, Any]) -> httpx.Response:
        try:
            resp = self._pool().request(method, path, **kw)
        except httpx.TransportError as err:
            raise Unreachable(
                f"{method} {path}: cannot reach {self.server}: {type(err).__name__}: {err}"
            ) from None
        if resp.status_code >= 400:
            raise _decode(resp)
        return resp

    def request(
        self,
        method: str,
        path: str,
        *,
        retry: bool = True,
        interrupt: Sequence[threading.Event] = (),
        **kw: Any,
    ) -> httpx.Response:
        """One request (``json=``, ``params=``...), retried unless ``retry=False``; any event
        of ``interrupt`` or of the link's own ends the retrying."""
        if not retry:
            return self._once(method, path, kw)
        return self.retry.call(
            lambda: self._once(method, path, kw),
            f"{method} {self.server}{path}",
            interrupt=(*self.interrupt, *interrupt),
        )

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServiceLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
