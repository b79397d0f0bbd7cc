"""Coded ``topk/logprobs`` (format v2): lossless is bit-exact, q8/q4 stay within their bound,
and a cache written with a codec reads back through the client like a v1 cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdcache.client import TeacherCache
from kdcache.core.reader import CacheReader
from kdcache.core.spec import parse_spec
from kdcache.core.topk_codec import decode_logprobs, encode_logprobs
from kdcache.worker.runner import run_job


def _sorted_logprobs(seed: int = 0, k: int = 16) -> np.ndarray:
    z = torch.randn(3, 5, 200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lp = torch.log_softmax(z * 3, -1).topk(k, -1).values
    out = lp.numpy().astype(np.float16)
    out[0, 0, 0] = 0.0  # a certain token: +0.0, bits 0x0000, then negative values
    return out


def test_lossless_is_bit_exact() -> None:
    lp = _sorted_logprobs()
    code = encode_logprobs(lp, "lossless")
    assert code.dtype == np.uint16 and code.shape == lp.shape
    assert np.array_equal(decode_logprobs(code, "lossless").view(np.uint16), lp.view(np.uint16))


@pytest.mark.parametrize(("codec", "levels"), [("q8", 255), ("q4", 15)])
def test_lossy_error_within_bound(codec: str, levels: int) -> None:
    lp = _sorted_logprobs()
    code = encode_logprobs(lp, codec)
    assert code.dtype == np.uint8 and code.shape == (*lp.shape[:-1], lp.shape[-1] + 4)
    back = decode_logprobs(code, codec)
    span = lp[..., :1].astype(np.float32) - lp[..., -1:].astype(np.float32)
    err = lp.astype(np.float32) - back
    assert (err <= span / levels + 1e-3).all() and (err >= -1e-3).all()  # never above the truth
    assert np.array_equal(back[..., 0], lp[..., 0].astype(np.float32))  # ends exact
    assert err.max() > 0  # it is lossy


def test_unknown_codec_refused() -> None:
    with pytest.raises(ValueError, match="topk codec must be one of"):
        encode_logprobs(_sorted_logprobs(), "zip")


def _spec(teacher: Path, tokens: Path, codec: str) -> dict:
    return {
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 8, "temperatures": [1.0, 2.0], "topk_codec": codec},
        "batch_size": 4,
        "rows_per_shard": 4,
    }


def test_lossless_cache_reads_like_v1(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    v1 = run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, "fp16")), tmp_path / "a")
    v2 = run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, "lossless")), tmp_path / "b")
    r1, r2 = CacheReader(v1), CacheReader(v2)
    assert r1.manifest.format_version == 1 and r2.manifest.format_version == 2
    assert r1.manifest.cache_id != r2.manifest.cache_id
    g = zarr.open_group(v2, mode="r")
    assert g["topk/logprobs"].dtype == np.uint16
    assert g["topk/logprobs"].attrs["coding"] == "lossless"
    assert all(c.ok for c in r2.verify())
    rows = list(range(r1.manifest.num_rows))
    b1 = TeacherCache(v1).batch(rows, fields=["topk"])
    b2 = TeacherCache(v2).batch(rows, fields=["topk"])
    for key in ("topk_logprobs", "topk_indices", "topk_logsumexp"):
        assert torch.equal(b1[key], b2[key]), key


def test_coded_caches_stream_through_the_dataset(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    from kdcache.client import CacheDataset

    v1 = run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, "fp16")), tmp_path / "a")
    ref = {int(s["row"]): s for s in CacheDataset(v1, fields=["topk"], shuffle=False)}
    for codec, tol in (("lossless", 0.0), ("q8", 0.05)):
        url = run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, codec)), tmp_path / codec)
        got = {int(s["row"]): s for s in CacheDataset(url, fields=["topk"], shuffle=False)}
        assert sorted(got) == sorted(ref)
        for row, s in got.items():
            assert torch.equal(s["topk_indices"], ref[row]["topk_indices"])
            err = (s["topk_logprobs"] - ref[row]["topk_logprobs"]).abs().max()
            assert float(err) <= tol, (codec, row, float(err))
