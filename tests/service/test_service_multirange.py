"""Several byte ranges per request over real HTTP: multipart/byteranges on the store keys and
``POST /v1/caches/{id}/ranges``, checked against the bytes on disk."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _svc import ADMIN_H, READ, READ_H, BuiltCache, make_settings, serve

from kdcache.core.wire import MAX_RANGE_READS, RANGE_LENGTHS_HEADER
from kdcache.service import create_app

KEY = "topk/logprobs/c/1/0/0"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, built_cache: BuiltCache, spec: dict[str, Any]
) -> Iterator[tuple[str, str, Path]]:
    """Shards 0-2 complete, shard 3 written but not complete; reads need the read token."""
    root = tmp_path_factory.mktemp("multirange") / "root"
    cache_dir = built_cache.copy_to(root, keep={0, 1, 2})
    with serve(create_app(make_settings(root, read_token=READ))) as url:
        r = httpx.post(f"{url}/v1/jobs", json=spec, headers=ADMIN_H)
        assert r.status_code == 201 and r.json()["shards_done"] == 3
        yield url, built_cache.cache_id, cache_dir


def _parts(resp: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Range, body) of each part of a multipart/byteranges answer, parsed strictly."""
    m = re.fullmatch(r"multipart/byteranges; boundary=([0-9a-f]+)", resp.headers["content-type"])
    assert m is not None, resp.headers["content-type"]
    boundary = m.group(1).encode()
    body = resp.content
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    out = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert headers["Content-Type"] == "application/octet-stream"
        out.append((headers["Content-Range"], data.removesuffix(b"\r\n")))
    return out


def test_several_ranges_are_multipart_byteranges(served: tuple[str, str, Path]) -> None:
    url, cid, cache_dir = served
    data = (cache_dir / KEY).read_bytes()
    n = len(data)
    assert n > 220
    key = f"{url}/v1/caches/{cid}/store/{KEY}"
    header = {"Range": "bytes=100-199,0-9,-16,5-12", **READ_H}
    r = httpx.get(key, headers=header)
    assert r.status_code == 206
    assert r.headers["content-length"] == str(len(r.content))
    assert (
        _parts(r)
        == [
            (f"bytes 0-12/{n}", data[0:13]),  # 0-9 and 5-12 overlap: one part
            (f"bytes 100-199/{n}", data[100:200]),
            (f"bytes {n - 16}-{n - 1}/{n}", data[-16:]),
        ]
    )
    head = httpx.head(key, headers=header)
    assert head.status_code == 206 and head.content == b""
    assert head.headers["content-length"] == r.headers["content-length"]
    one = httpx.get(key, headers={"Range": "bytes=0-9,10-19", **READ_H})  # touching: one range
    assert one.status_code == 206 and one.content == data[:20]
    assert one.headers["content-range"] == f"bytes 0-19/{n}"


def test_ranges_endpoint_gives_every_part_in_order(served: tuple[str, str, Path]) -> None:
    url, cid, cache_dir = served
    a = (cache_dir / KEY).read_bytes()
    b = (cache_dir / "input_ids/c/0/0").read_bytes()
    meta = (cache_dir / "zarr.json").read_bytes()
    reads = [
        {"key": KEY, "start": 7, "end": 40},
        {"key": "input_ids/c/0/0", "suffix": 20},
        {"key": "zarr.json"},
        {"key": KEY, "start": 0, "end": 7},
        {"key": "input_ids/c/0/0", "suffix": len(b) + 1000},  # longer than the object: all
        {"key": KEY, "start": len(a) - 1, "end": len(a)},
    ]
    r = httpx.post(f"{url}/v1/caches/{cid}/ranges", json={"ranges": reads}, headers=READ_H)
    assert r.status_code == 200, r.text
    want = [a[7:40], b[-20:], meta, a[:7], b, a[-1:]]
    assert r.headers[RANGE_LENGTHS_HEADER] == ",".join(str(len(w)) for w in want)
    assert r.content == b"".join(want)
    assert r.headers["content-length"] == str(len(r.content))


def _post(url: str, cid: str, reads: Any, headers: dict[str, str] = READ_H) -> httpx.Response:
    return httpx.post(f"{url}/v1/caches/{cid}/ranges", json={"ranges": reads}, headers=headers)


def test_ranges_endpoint_errors(served: tuple[str, str, Path]) -> None:
    url, cid, cache_dir = served
    size = (cache_dir / KEY).stat().st_size
    ok = {"key": KEY, "start": 0, "end": 4}
    r = _post(url, cid, [ok], headers={})
    assert r.status_code == 401
    r = _post(url, cid, [ok, {"key": "input_ids/c/3/0", "start": 0, "end": 4}])
    assert r.status_code == 404 and "shard 3" in r.json()["error"]["message"]
    r = _post(url, cid, [ok, {"key": "../../kdcache.db"}])
    assert r.status_code == 404
    r = _post(url, "ab" * 16, [ok])
    assert r.status_code == 404
    r = _post(url, cid, [ok, {"key": KEY, "start": size - 2, "end": size + 1}])
    assert r.status_code == 416
    assert KEY in r.json()["error"]["message"] and "ranges[1]" in r.json()["error"]["message"]
    assert r.headers["content-range"] == f"bytes */{size}"
    for bad in (
        {"key": KEY, "start": 4},
        {"key": KEY, "start": 4, "end": 4},
        {"key": KEY, "start": 0, "end": 4, "suffix": 3},
        {"key": KEY, "suffix": 0},
        {"key": KEY, "start": -1, "end": 4},
        {"key": ""},
        {"key": KEY, "length": 3},
    ):
        r = _post(url, cid, [ok, bad])
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["field"].startswith("ranges.1"), r.json()
    assert _post(url, cid, []).status_code == 422
    assert _post(url, cid, [ok] * (MAX_RANGE_READS + 1)).status_code == 422


def test_known_complete_shards_are_served_without_a_thread(
    served: tuple[str, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio.to_thread

    from kdcache.service import serve as serving

    url, cid, cache_dir = served
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, **kw: Any) -> Any:
        hops.append("thread")
        return await real(fn, *args, **kw)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)  # every hop to a worker thread
    ranges = f"{url}/v1/caches/{cid}/ranges"
    body = {"ranges": [{"key": KEY, "start": 3, "end": 40}, {"key": "input_ids/c/0/0"}]}
    want = (cache_dir / KEY).read_bytes()[3:40] + (cache_dir / "input_ids/c/0/0").read_bytes()
    assert httpx.post(ranges, json=body, headers=READ_H).content == want
    hops.clear()
    # cache and shards known complete, local files, small body: answered on the event loop
    r = httpx.post(ranges, json=body, headers=READ_H)
    assert r.status_code == 200 and r.content == want and hops == []
    g = httpx.get(f"{url}/v1/caches/{cid}/store/{KEY}", headers={"Range": "bytes=3-39", **READ_H})
    assert g.status_code == 206 and g.content == want[:37] and hops == []
    # a shard not known complete needs the database: a worker thread, and still 404
    late = httpx.post(ranges, json={"ranges": [{"key": "input_ids/c/3/0"}]}, headers=READ_H)
    assert late.status_code == 404 and "shard 3" in late.text and hops == ["thread"]
    # a body too large for the loop is read in a thread, the same bytes
    monkeypatch.setattr(serving, "LOOP_BYTES", 16)
    r = httpx.post(ranges, json=body, headers=READ_H)
    assert r.status_code == 200 and r.content == want and hops == ["thread"] * 2
