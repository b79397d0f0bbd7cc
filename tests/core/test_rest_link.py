"""ServiceLink's connection setup: the CA bundle is loaded once per process, not per link."""

from __future__ import annotations

import ssl
from typing import Any

import pytest

from kdcache.core import rest
from kdcache.core.rest import ServiceLink


def test_links_share_one_verifying_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kw: Any) -> ssl.SSLContext:
        ctx = real(*args, **kw)
        built.append(ctx)
        return ctx

    monkeypatch.setattr(ssl, "create_default_context", counting)
    rest._tls_context.cache_clear()
    try:
        links = [ServiceLink("http://127.0.0.1:9"), ServiceLink("https://kdcache.invalid", "t")]
        links[0]._pid = -1  # as in a forked child: the pool is opened again
        links[0]._pool()
        assert len(built) == 1, "each link (or reopened pool) loaded the CA bundle again"
        assert built[0].verify_mode == ssl.CERT_REQUIRED and built[0].check_hostname
        for link in links:
            link.close()
    finally:
        rest._tls_context.cache_clear()
