"""``-xz`` top-k codes (format v3): the id code is a bijection, a ``lossless-xz`` cache reads back
bit-equal to format v1 locally, through the dataset and over the service, every code's ``-xz``
form decodes to that code's values, and plain zarr-python opens every array."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import zarr
from _net import serve
from test_topk_codec import _spec

from kdcache.client import CacheDataset, TeacherCache
from kdcache.core.reader import CacheReader
from kdcache.core.spec import parse_spec
from kdcache.core.topk_codec import ID_ORDER_LIMIT, IdOrder
from kdcache.service import Settings, create_app
from kdcache.worker.runner import run_job

ADMIN = "admin-token-xz"


@pytest.mark.parametrize("seed", range(4))
def test_id_order_is_a_bijection(seed: int) -> None:
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 5000))
    listed = rng.permutation(vocab)[: int(rng.integers(0, vocab + 1))]
    order = IdOrder(listed, vocab)
    assert sorted(order.ids.tolist()) == list(range(vocab))
    assert order.decode(np.arange(len(listed))).tolist() == listed.tolist()  # listed ids first
    rest = order.ids[len(listed) :]
    assert (np.diff(rest) > 0).all()  # then the others, in id order
    ids = rng.integers(0, vocab, (3, 7, 5)).astype(np.int32)
    codes = order.encode(ids)
    assert codes.dtype == ids.dtype and np.array_equal(order.decode(codes), ids)


def test_id_order_of_tokens_counts_and_breaks_ties_by_id() -> None:
    tokens = np.array([[5, 3, 3, 9], [9, 3, 7, 5]])  # 3 x3, 5 x2, 9 x2, 7 x1
    assert IdOrder.of_tokens(tokens, 12) == [3, 5, 9, 7]
    assert IdOrder.of_tokens(np.arange(ID_ORDER_LIMIT + 10), 1 << 17) == list(range(ID_ORDER_LIMIT))


def test_id_order_refuses_what_is_not_a_permutation() -> None:
    with pytest.raises(ValueError, match="twice"):
        IdOrder([1, 2, 1], 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        IdOrder([4], 4)


@pytest.fixture(scope="module")
def caches(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> dict[str, str]:
    root = tmp_path_factory.mktemp("xz") / "root"
    return {
        codec: run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, codec)), root)
        for codec in ("fp16", "lossless-xz", "fp16-xz", "q4c", "q4c-xz")
    }


def test_xz_cache_reads_back_bit_equal(caches: dict[str, str], tokens_npy: Path) -> None:
    v1, v3 = CacheReader(caches["fp16"]), CacheReader(caches["lossless-xz"])
    assert v3.manifest.format_version == 3 and v3.manifest.topk_codec == "lossless-xz"
    assert all(c.ok for c in v3.verify())
    tokens = np.load(tokens_npy)
    assert v3.manifest.topk_id_order == IdOrder.of_tokens(tokens, v3.manifest.vocab_size)
    rows = list(range(v1.manifest.num_rows))
    a = TeacherCache(caches["fp16"]).batch(rows, fields=["topk"])
    b = TeacherCache(caches["lossless-xz"]).batch(rows, fields=["topk"])
    for key in ("topk_logprobs", "topk_indices", "topk_logsumexp"):
        assert torch.equal(a[key], b[key]), key
    streamed = {int(s["row"]): s for s in CacheDataset(caches["lossless-xz"], fields=["topk"])}
    assert sorted(streamed) == rows
    for row, s in streamed.items():
        assert torch.equal(s["topk_indices"], a["topk_indices"][row])
        assert torch.equal(s["topk_logprobs"], a["topk_logprobs"][row])


@pytest.mark.parametrize(("xz", "code"), [("fp16-xz", "fp16"), ("q4c-xz", "q4c")])
def test_every_code_has_an_xz_form_with_the_same_values(
    caches: dict[str, str], xz: str, code: str
) -> None:
    assert CacheReader(caches[xz]).manifest.format_version == 3
    rows = list(range(CacheReader(caches[code]).manifest.num_rows))
    a = TeacherCache(caches[code]).batch(rows, fields=["topk"])
    b = TeacherCache(caches[xz]).batch(rows, fields=["topk"])
    for key in ("topk_logprobs", "topk_indices", "topk_logsumexp"):
        assert torch.equal(a[key], b[key]), key
    if code == "q4c":  # a lossy code: the values are its, not the teacher's
        ref = TeacherCache(caches["fp16"]).batch(rows, fields=["topk"])["topk_logprobs"]
        assert not torch.equal(b["topk_logprobs"], ref)


@pytest.mark.parametrize("sample_logprobs", [True, False])
def test_xz_draws_read_back_equal(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path, sample_logprobs: bool
) -> None:
    urls = {}
    for codec in ("lossless", "lossless-xz"):
        spec = _spec(tiny_teacher_dir, tokens_npy, codec)
        spec["outputs"].update(sample_draws=16, sample_logprobs=sample_logprobs)
        urls[codec] = run_job(parse_spec(spec), tmp_path)
    g = zarr.open_group(urls["lossless-xz"], mode="r")
    assert g["sample/indices"].attrs["coding"] == "id_order"
    assert "numcodecs.lzma" in str(g["sample/counts"].metadata.to_dict())
    rows = list(range(CacheReader(urls["lossless"]).manifest.num_rows))
    a = TeacherCache(urls["lossless"]).batch(rows, fields=["topk", "sample"])
    b = TeacherCache(urls["lossless-xz"]).batch(rows, fields=["topk", "sample"])
    assert {k for k in a if k.startswith("sample_")} == {k for k in b if k.startswith("sample_")}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert int(a["sample_counts"].sum()) == 16 * len(rows) * a["sample_counts"].shape[1]


@pytest.mark.parametrize("codec", ["lossless-xz", "q4c", "q4c-xz"])
def test_the_fast_read_path_decodes_the_transposed_and_xz_chains(
    caches: dict[str, str], codec: str
) -> None:
    from kdcache.client._shardread import FastLayout

    root = Path(caches[codec])
    g = zarr.open_group(str(root), mode="r")

    def locate(key: str) -> str | None:
        return str(root / key) if (root / key).is_file() else None

    for name in ("topk/logprobs", "topk/indices", "topk/logsumexp"):
        arr = g[name]
        layout = FastLayout.of(arr)
        assert layout is not None, name  # not zarr's slower path
        rows = np.array([0, 2, 3, 6])  # scattered, across both shards
        for dtype in (arr.dtype, np.dtype(np.float64)):  # as stored, and cast on the way
            out = np.zeros((len(rows), *arr.shape[1:]), dtype=dtype)
            for task in layout.tasks(locate, rows, out, None, positions=np.array([3, 1, 2, 0])):
                task()
            assert np.array_equal(out[[3, 1, 2, 0]], arr[rows].astype(dtype)), (name, dtype)


def test_plain_zarr_opens_every_array_and_sees_the_codes(caches: dict[str, str]) -> None:
    g = zarr.open_group(caches["lossless-xz"], mode="r")
    m = CacheReader(caches["lossless-xz"]).manifest
    ids = g["topk/indices"]
    assert ids.attrs["coding"] == "id_order"
    assert "numcodecs.lzma" in str(ids.metadata.to_dict())
    codes = ids[:]
    truth = TeacherCache(caches["fp16"]).batch(list(range(m.num_rows)), ["topk"])["topk_indices"]
    order = IdOrder(m.topk_id_order, m.vocab_size)
    assert np.array_equal(order.decode(codes), truth.numpy())
    assert not np.array_equal(codes, truth.numpy())  # they really are codes, not ids
    lse = zarr.open_group(caches["fp16"], mode="r")["topk/logsumexp"][:]
    assert np.array_equal(g["topk/logsumexp"][:], lse)


def test_xz_cache_over_the_service(
    caches: dict[str, str], tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    root = Path(caches["lossless-xz"]).parents[1]
    spec = _spec(tiny_teacher_dir, tokens_npy, "lossless-xz")
    with serve(create_app(Settings(root=str(root), admin_token=ADMIN))) as url:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        r = httpx.post(f"{url}/v1/jobs", json=spec, headers=headers, timeout=120)
        assert r.status_code == 201 and r.json()["shards_done"] == 2, r.text
        cache_url = f"{url}/v1/caches/{r.json()['cache_id']}"
        remote = {int(s["row"]): s for s in CacheDataset(cache_url, fields=["topk"], token="")}
    local = {int(s["row"]): s for s in CacheDataset(caches["fp16"], fields=["topk"])}
    assert sorted(remote) == sorted(local)
    for row, s in remote.items():
        for key in ("topk_logprobs", "topk_indices", "topk_logsumexp"):
            assert torch.equal(s[key], local[row][key]), (row, key)
