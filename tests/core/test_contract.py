"""One contract: the error tree and its decoder, the retry policy, the service link, the layout."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from _net import free_port, serve

from kdcache.core import errors as E
from kdcache.core.layout import cache_url, parse_chunk_key, parse_record_key, record_key, shard_key
from kdcache.core.rest import ServiceLink
from kdcache.core.retry import RetryPolicy, is_transient

# ---- the error tree --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "builtin", "status"),
    [
        (E.Unauthorized, PermissionError, 401),
        (E.Forbidden, PermissionError, 403),
        (E.NotFound, LookupError, 404),
        (E.Unprocessable, ValueError, 422),
        (E.InsufficientStorage, OSError, 507),
        (E.Unreachable, ConnectionError, 0),
    ],
)
def test_service_errors_carry_their_builtin_and_status(
    cls: type[E.ServiceError], builtin: type[Exception], status: int
) -> None:
    err = cls("x")
    assert isinstance(err, E.ServiceError) and isinstance(err, builtin)
    assert isinstance(err, E.KDCacheError) and err.status == status


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, E.Unauthorized), (404, E.NotFound), (409, E.Conflict), (503, E.Unavailable)],
)
def test_decoder_gives_back_the_class_the_service_raised(
    status: int, cls: type[E.ServiceError]
) -> None:
    body = {"error": {"code": "lease_lost", "message": "gone", "field": "record.shard"}}
    err = E.error_from_response(status, body, "POST /v1/x")
    assert type(err) is cls
    assert isinstance(err, E.ServiceError)
    assert (err.code, err.field, err.status) == ("lease_lost", "record.shard", status)
    assert str(err).startswith(f"POST /v1/x: {status} lease_lost: gone")


def test_decoder_turns_listed_problems_into_a_spec_error() -> None:
    body = {"error": {"code": "invalid_spec", "message": "m", "problems": [
        {"field": "outputs.topk", "message": "too big"},
        {"field": "dataset.tokens", "message": "missing"},
    ]}}  # fmt: skip
    err = E.error_from_response(422, body)
    assert isinstance(err, E.SpecError)
    assert [str(p) for p in err.problems] == ["outputs.topk: too big", "dataset.tokens: missing"]
    assert type(E.error_from_response(418, "teapot")) is E.ServiceError


# ---- the retry policy ------------------------------------------------------------------------


def test_policy_retries_transient_errors_only() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise E.Unavailable("busy")
        return "ok"

    fast = RetryPolicy(seconds=None, attempts=5, initial=0.001, max_delay=0.01)
    assert fast.call(flaky, "t") == "ok" and len(calls) == 3

    def refused() -> None:
        calls.append(1)
        raise E.Conflict("lease_lost")

    calls.clear()
    with pytest.raises(E.Conflict):
        fast.call(refused, "t")
    assert len(calls) == 1
    assert is_transient(E.Unreachable("x")) and is_transient(E.ServiceError("x", status=502))
    assert not is_transient(E.InsufficientStorage("full")) and not is_transient(E.NotFound("x"))


def test_policy_gives_up_after_its_seconds_and_on_interrupt() -> None:
    def down() -> None:
        raise E.Unreachable("down")

    t0 = time.monotonic()
    with pytest.raises(E.Unreachable):
        RetryPolicy(seconds=0.5, initial=0.05, max_delay=0.1).call(down, "t")
    assert 0.4 < time.monotonic() - t0 < 5

    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(E.Unreachable):
        RetryPolicy(seconds=None, initial=0.05, max_delay=0.1).call(down, "t", interrupt=[stop])
    assert time.monotonic() - t0 < 5


def test_link_waits_for_a_service_that_comes_back() -> None:
    """No service for ~2 s, then one on the same port: the request succeeds (retry forever)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    port = free_port()
    got: dict[str, object] = {}

    def ask() -> None:
        link = ServiceLink(f"http://127.0.0.1:{port}", retry=RetryPolicy(seconds=None))
        got["body"] = link.get("/healthz").json()

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    time.sleep(2.0)
    assert asker.is_alive()  # still retrying
    import socket

    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        asker.join(60)
        assert got.get("body") == {"status": "ok"}
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def test_link_raises_the_decoded_class() -> None:
    from fastapi import FastAPI

    from kdcache.service.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/nope")
    def nope() -> None:
        raise E.NotFound("no job 'x'")

    with serve(app) as url, ServiceLink(url) as link:
        with pytest.raises(E.NotFound, match="no job 'x'") as info:
            link.get("/nope")
    assert isinstance(info.value, LookupError) and info.value.code == "not_found"


# ---- the layout ------------------------------------------------------------------------------


def test_keys_round_trip_and_absurd_indices_are_no_keys(tmp_path: Path) -> None:
    assert parse_record_key(record_key(7)) == 7
    assert parse_record_key("_kdcache/shards/7.json") is None  # not the canonical spelling
    ndims = {"topk/logprobs": 3, "input_ids": 2}
    assert parse_chunk_key(shard_key("topk/logprobs", 5, 3), ndims) == ("topk/logprobs", 5)
    assert parse_chunk_key("input_ids/c/9223372036854775808/0", ndims) is None
    assert parse_chunk_key("input_ids/c/٣/0", ndims) is None  # non-ASCII digits
    assert parse_chunk_key("input_ids/c/1", ndims) is None
    assert cache_url("s3://b/p/", "ab") == "s3://b/p/caches/ab"
    assert cache_url(tmp_path, "ab") == str(tmp_path / "caches" / "ab")
