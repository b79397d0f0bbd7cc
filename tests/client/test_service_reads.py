"""TeacherCache over a real uvicorn service: the same tensors as the directory, in one or two
requests per batch over one kept-alive connection, safe after fork, corrupt bytes still caught."""

from __future__ import annotations

import multiprocessing
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from _net import serve
from test_dataset_support import CacheFactory

from kdcache.client import TeacherCache
from kdcache.core.errors import IntegrityError
from kdcache.core.layout import shard_key

service = pytest.importorskip("kdcache.service")


class Counted:
    """An ASGI app that records the client address (one per TCP connection) and the path of
    every HTTP request before passing it on."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.peers: set[tuple[str, int]] = set()
        self.requests: list[tuple[str, str]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.peers.add(tuple(scope["client"]))
            self.requests.append((scope["method"], scope["path"]))
        await self.app(scope, receive, send)

    def reset(self) -> None:
        self.peers.clear()
        self.requests.clear()


def _serve_copy(root: Path, spec: dict[str, Any]) -> Iterator[tuple[str, Counted]]:
    settings = service.Settings(root=str(root), admin_token="a-secret", worker_token="w-secret")
    counted = Counted(service.create_app(settings))
    with serve(counted) as base:
        r = httpx.post(f"{base}/v1/jobs", json=spec, headers={"Authorization": "Bearer a-secret"})
        assert r.status_code in (200, 201) and r.json()["status"] == "done", r.text
        yield base, counted


@pytest.fixture(scope="module")
def served37(make_cache: CacheFactory, cache_dir37: str) -> Iterator[tuple[str, Counted]]:
    root = make_cache.roots[cache_dir37]
    for base, counted in _serve_copy(root, make_cache.specs[cache_dir37]):
        yield f"{base}/v1/caches/{Path(cache_dir37).name}", counted


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize(
    "rows",
    [
        [0, 1, 2, 3],  # part of one shard
        list(range(8, 16)),  # one whole shard (zarr reads it whole)
        [36, 0, 17, 17, 5],  # unsorted, repeated, three shards
        list(range(32, 37)),  # the last, short shard
        list(range(37)),  # everything
    ],
)
def test_http_batches_equal_local(
    served37: tuple[str, Counted], cache_dir37: str, rows: list[int]
) -> None:
    url, _ = served37
    _same(TeacherCache(url).batch(rows), TeacherCache(cache_dir37).batch(rows))


def test_open_reads_all_metadata_in_two_requests(served37: tuple[str, Counted]) -> None:
    url, counted = served37
    counted.reset()
    cache = TeacherCache(url)
    store = url.removeprefix(url.split("/v1/")[0])
    # the group's zarr.json, then every array's in one ranges request (not one GET per array)
    assert counted.requests == [("GET", f"{store}/store/zarr.json"), ("POST", f"{store}/ranges")]
    assert len(cache.reader.arrays) >= 5
    assert not cache.reader.storage.prefetched.parts, "prefetched metadata left unread"


def test_one_connection_and_one_request_per_batch(served37: tuple[str, Counted]) -> None:
    url, counted = served37
    cache = TeacherCache(url)
    counted.reset()
    cache.batch([0, 1, 2])
    ranges = [p for m, p in counted.requests if p.endswith("/ranges")]
    # the shard indexes (this shard's and the next ones'), then every chunk of the batch
    assert len(ranges) == 2 and len(counted.requests) <= 3, counted.requests
    counted.reset()
    for rows in ([9, 10], [16, 20, 23], [3, 4], [25], [30, 31]):
        cache.batch(rows)
    # indexes already known: one request per batch, all on one kept-alive connection
    assert counted.requests == [("POST", counted.requests[0][1])] * 5, counted.requests
    assert len(counted.peers) == 1, counted.peers


def _exact(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy, floats widened exactly (numpy has no bfloat16)."""
    return (t.to(torch.float64) if t.is_floating_point() else t).numpy()


def _forked_read(cache: TeacherCache, rows: list[int]) -> Any:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()

    def child() -> None:
        try:
            got = cache.batch(rows)  # the parent's reader, inherited through fork
            out.put({k: _exact(v) for k, v in got.items()})
        except BaseException as err:
            out.put(repr(err))

    proc = ctx.Process(target=child)
    proc.start()
    found = out.get(timeout=120)
    proc.join(60)
    return found


def test_a_forked_child_opens_its_own_connections(
    served37: tuple[str, Counted], cache_dir37: str
) -> None:
    url, counted = served37
    cache = TeacherCache(url)
    cache.batch([0])  # the parent's pool holds a kept-alive connection now
    counted.reset()
    found = _forked_read(cache, [1, 9, 33])
    assert isinstance(found, dict), found
    want = TeacherCache(cache_dir37).batch([1, 9, 33])
    for k, v in want.items():
        assert np.array_equal(found[k], _exact(v)), k
    child_peers = set(counted.peers)
    assert child_peers, "the child made no request"
    counted.reset()
    _same(cache.batch([2, 17]), TeacherCache(cache_dir37).batch([2, 17]))  # parent still fine
    assert counted.peers and not counted.peers & child_peers


@pytest.fixture
def corruptible(
    make_cache: CacheFactory, cache_dir37: str, tmp_path: Path
) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "root"
    shutil.copytree(make_cache.roots[cache_dir37], root)
    cid = Path(cache_dir37).name
    for base, _ in _serve_copy(root, make_cache.specs[cache_dir37]):
        yield f"{base}/v1/caches/{cid}", root / "caches" / cid


def _damage(path: Path, how: Callable[[bytes], bytes]) -> None:
    path.write_bytes(how(path.read_bytes()))


def test_corrupt_and_truncated_objects_are_integrity_errors(
    corruptible: tuple[str, Path],
) -> None:
    url, cache_dir = corruptible
    ok = TeacherCache(url).batch([0, 1])
    assert ok["input_ids"].shape[0] == 2
    flipped = cache_dir / shard_key("topk/logprobs", 1, 3)
    _damage(flipped, lambda b: b[:40] + bytes([b[40] ^ 0x10]) + b[41:])  # a chunk byte
    with pytest.raises(IntegrityError, match="topk/logprobs"):
        TeacherCache(url).batch([8, 9])
    short = cache_dir / shard_key("hidden/1", 2, 3)
    _damage(short, lambda b: b[: len(b) // 2])  # a partial object: its index is gone
    with pytest.raises(IntegrityError, match="hidden/1"):
        TeacherCache(url).batch([16])
    _same(TeacherCache(url).batch([0, 1]), ok)  # the other shards still read
