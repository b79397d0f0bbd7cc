"""Raw Zarr keys over real HTTP: policy, ranges, conditional requests, and zarr's own reader."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from _svc import ADMIN_H, BuiltCache, make_settings, serve

from kdcache.core.layout import record_key
from kdcache.service import create_app


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, built_cache: BuiltCache, spec: dict[str, Any]
) -> Iterator[tuple[str, str, Path]]:
    """A real server whose cache has shards 0-2 complete and shard 3 written but not complete."""
    root = tmp_path_factory.mktemp("served") / "root"
    cache_dir = built_cache.copy_to(root, keep={0, 1, 2})
    with serve(create_app(make_settings(root))) as url:
        r = httpx.post(f"{url}/v1/jobs", json=spec, headers=ADMIN_H)
        assert r.status_code == 201 and r.json()["shards_done"] == 3
        yield url, built_cache.cache_id, cache_dir


def _store(url: str, cache_id: str) -> str:
    return f"{url}/v1/caches/{cache_id}/store"


def test_metadata_always_chunks_only_of_completed_shards(served: tuple[str, str, Path]) -> None:
    url, cid, cache_dir = served
    base = _store(url, cid)
    assert (cache_dir / "input_ids/c/3/0").is_file()  # written, just not complete
    assert httpx.get(f"{base}/zarr.json").status_code == 200
    assert httpx.get(f"{base}/topk/logprobs/zarr.json").status_code == 200
    assert httpx.get(f"{base}/input_ids/c/2/0").status_code == 200
    assert httpx.get(f"{base}/input_ids/c/3/0").status_code == 404
    assert httpx.get(f"{base}/{record_key(2)}").status_code == 200
    assert httpx.get(f"{base}/_kdcache/job.json").status_code == 404
    assert httpx.get(f"{_store(url, 'ab' * 16)}/zarr.json").status_code == 404


@pytest.mark.parametrize(
    "key",
    [
        "../../kdcache.db",
        "..%2F..%2Fkdcache.db",
        "%2e%2e/%2e%2e/kdcache.db",
        "%252e%252e/kdcache.db",
        "input_ids/../../../kdcache.db",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "input_ids/c/0/..",
        ".zarr.json.123.partial",
        "input_ids/c/0/.0.abc.partial",
        "input_ids\\..\\zarr.json",
    ],
)
def test_keys_outside_the_store_are_404(served: tuple[str, str, Path], key: str) -> None:
    url, cid, cache_dir = served
    (cache_dir / ".zarr.json.123.partial").write_text("{}")
    # Sent raw (httpx would normalise dot segments away before they reach the server).
    with httpx.Client() as c:
        req = c.build_request("GET", f"{_store(url, cid)}/x")
        req.url = req.url.copy_with(raw_path=f"/v1/caches/{cid}/store/{key}".encode())
        r = c.send(req)
    assert r.status_code == 404, (key, r.status_code)
    assert r.json()["error"]["code"] == "not_found"


def test_full_get_headers_and_body(served: tuple[str, str, Path]) -> None:
    url, cid, cache_dir = served
    data = (cache_dir / "input_ids/c/0/0").read_bytes()
    r = httpx.get(f"{_store(url, cid)}/input_ids/c/0/0")
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["etag"].startswith('"') and r.headers["last-modified"].endswith("GMT")
    head = httpx.head(f"{_store(url, cid)}/input_ids/c/0/0")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data))
    assert head.headers["etag"] == r.headers["etag"]


@pytest.mark.parametrize(
    ("header", "want"),
    [
        ("bytes=0-9", slice(0, 10)),
        ("bytes=5-", slice(5, None)),
        ("bytes=-7", slice(-7, None)),
        ("bytes=3-100000", slice(3, None)),
        ("bytes=-100000", slice(0, None)),
    ],
)
def test_single_and_suffix_ranges(served: tuple[str, str, Path], header: str, want: slice) -> None:
    url, cid, cache_dir = served
    data = (cache_dir / "topk/logprobs/c/1/0/0").read_bytes()
    r = httpx.get(f"{_store(url, cid)}/topk/logprobs/c/1/0/0", headers={"Range": header})
    assert r.status_code == 206
    assert r.content == data[want]
    start = len(data[: want.start or 0]) if (want.start or 0) >= 0 else len(data) + want.start
    assert r.headers["content-range"] == f"bytes {start}-{start + len(r.content) - 1}/{len(data)}"
    assert r.headers["content-length"] == str(len(r.content))


@pytest.mark.parametrize("header", ["bytes=999999-", "bytes=-0", "bytes=9-3", "bytes=x-y"])
def test_unsatisfiable_ranges_are_416(served: tuple[str, str, Path], header: str) -> None:
    url, cid, cache_dir = served
    size = (cache_dir / "input_ids/c/0/0").stat().st_size
    r = httpx.get(f"{_store(url, cid)}/input_ids/c/0/0", headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{size}"
    assert r.json()["error"]["code"] == "range_not_satisfiable"


def test_overlong_and_repeated_ranges(served: tuple[str, str, Path]) -> None:
    url, cid, cache_dir = served
    data = (cache_dir / "input_ids/c/0/0").read_bytes()
    key = f"{_store(url, cid)}/input_ids/c/0/0"
    assert httpx.get(key, headers={"Range": "bytes=0-" + "1" * 9000}).status_code == 416
    assert httpx.get(key, headers={"Range": "bytes=" + ",".join(["0-1"] * 300)}).status_code == 416
    same = httpx.get(key, headers={"Range": "bytes=" + ",".join(["0-1"] * 100)})
    assert same.status_code == 206 and same.content == data[:2]  # merged into one range


def test_etag_if_none_match_and_if_range(served: tuple[str, str, Path]) -> None:
    url, cid, _ = served
    key = f"{_store(url, cid)}/zarr.json"
    etag = httpx.get(key).headers["etag"]
    r = httpx.get(key, headers={"If-None-Match": etag})
    assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag
    assert httpx.get(key, headers={"If-None-Match": '"other"'}).status_code == 200
    stale = httpx.get(key, headers={"Range": "bytes=0-3", "If-Range": '"other"'})
    assert stale.status_code == 200
    fresh = httpx.get(key, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert fresh.status_code == 206 and len(fresh.content) == 4


def test_zarr_fsspec_store_over_http_reads_the_local_arrays(
    served: tuple[str, str, Path],
) -> None:
    url, cid, cache_dir = served
    remote = zarr.open_group(
        zarr.storage.FsspecStore.from_url(_store(url, cid), read_only=True), mode="r"
    )
    local = zarr.open_group(zarr.storage.LocalStore(cache_dir, read_only=True), mode="r")
    names = ["input_ids", "topk/logprobs", "topk/indices", "topk/logsumexp", "hidden/1"]
    for name in names:
        got = np.asarray(remote[name][0:6])  # type: ignore[index]
        want = np.asarray(local[name][0:6])  # type: ignore[index]
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        # One row of a completed shard: a partial (range) read of a sharded object.
        np.testing.assert_array_equal(
            np.asarray(remote[name][5]),  # type: ignore[index]
            np.asarray(local[name][5]),  # type: ignore[index]
        )
    # Shard 3 is written but not complete: its objects are 404, so zarr sees fill values.
    hidden_rows = np.asarray(remote["input_ids"][6:8])  # type: ignore[index]
    assert (hidden_rows == 0).all()
    assert (np.asarray(local["input_ids"][6:8]) != 0).any()  # type: ignore[index]


def test_teacher_cache_reads_the_service_like_the_directory(
    served: tuple[str, str, Path],
) -> None:
    from kdcache.client import TeacherCache
    from kdcache.core.errors import ShardIncompleteError

    url, cid, cache_dir = served
    remote, local = TeacherCache(f"{url}/v1/caches/{cid}"), TeacherCache(str(cache_dir))
    assert remote.manifest == local.manifest and not remote.is_complete
    got, want = remote.batch([0, 3, 5]), local.batch([0, 3, 5])
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with pytest.raises(ShardIncompleteError):
        remote.batch([6])
