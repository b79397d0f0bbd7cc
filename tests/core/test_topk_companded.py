"""Companded lossy top-k codes (q8c/q6c/q4c/q3c): within one step of p**(1/3), never more
top-k mass than the input, less KL than q8/q4 at the same bits; q8/q4 decode as they always did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import TransposeCodec

from kdcache.client import TeacherCache
from kdcache.core.reader import CacheReader
from kdcache.core.spec import parse_spec
from kdcache.core.topk_codec import decode_logprobs, encode_logprobs
from kdcache.worker.runner import run_job

LEVELS = {"q8c": 255, "q6c": 63, "q4c": 15, "q3c": 7}


def _teacher_like(seed: int = 0, k: int = 64, v: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(true float64 top-k log-probs, their float16 copy), sorted descending: (4, 50, k)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(4, 50, 1, generator=g, dtype=torch.float64) * 6 + 1  # peaked to flat
    z = torch.randn(4, 50, v, generator=g, dtype=torch.float64) * scale
    true = torch.log_softmax(z, -1).topk(k, -1).values.numpy()
    return true, true.astype(np.float16)


def _kl_topk_tail(true: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p || q) over the k classes plus one tail class, float64 (bench/storage.py's)."""

    def with_tail(x: np.ndarray) -> np.ndarray:
        tail = np.log(np.clip(1 - np.exp(x).sum(-1), 1e-300, None))
        return np.concatenate([x, tail[..., None]], -1)

    p, qq = with_tail(true), with_tail(np.maximum(q.astype(np.float64), -1e4))
    return float((np.exp(p) * (p - qq)).sum(-1).mean())


@pytest.mark.parametrize("codec", sorted(LEVELS))
def test_companded_within_one_step_and_mass_bounded(codec: str) -> None:
    true, lp = _teacher_like()
    code = encode_logprobs(lp, codec)
    assert code.dtype == np.uint8 and code.shape == (*lp.shape[:-1], lp.shape[-1] + 4)
    back = decode_logprobs(code, codec).astype(np.float64)
    lp64 = lp.astype(np.float64)
    y, y_back = np.exp(lp64 / 3), np.exp(back / 3)
    step = (y[..., :1] - y[..., -1:]) / LEVELS[codec]
    assert (np.abs(y_back - y) <= step * (1 + 1e-4) + 1e-7).all()
    assert np.array_equal(back[..., 0], lp64[..., 0]) and np.array_equal(
        back[..., -1], lp64[..., -1]
    )
    assert (np.diff(back, axis=-1) <= 0).all()  # still sorted descending
    # never more decoded top-k mass than the input: the tail bucket stays positive
    assert (np.exp(back).sum(-1) <= np.exp(lp64).sum(-1) * (1 + 1e-9)).all()
    assert np.abs(back - lp64).max() > 0  # it is lossy


@pytest.mark.parametrize(("companded", "plain"), [("q8c", "q8"), ("q4c", "q4")])
def test_companded_beats_plain_at_the_same_bits(companded: str, plain: str) -> None:
    true, lp = _teacher_like(seed=1)
    kl_c = _kl_topk_tail(true, decode_logprobs(encode_logprobs(lp, companded), companded))
    kl_p = _kl_topk_tail(true, decode_logprobs(encode_logprobs(lp, plain), plain))
    assert kl_c < kl_p / 2, (kl_c, kl_p)


def test_zero_mass_and_flat_positions() -> None:
    lp = np.full((2, 8), -2.0794, np.float16)  # uniform over 8: one value, no span
    lp[1, 5:] = -np.inf  # ids of zero mass at the end
    lp[1, :5] = np.log(0.2)
    back = decode_logprobs(encode_logprobs(lp, "q8c"), "q8c")
    assert np.array_equal(back[0], lp[0].astype(np.float32))
    assert np.isfinite(back).all() and (back[1, 5:] == np.finfo(np.float16).min).all()
    assert np.allclose(back[1, :5], np.log(0.2), atol=1e-3)


@pytest.mark.parametrize(("codec", "levels"), [("q8", 255), ("q4", 15)])
def test_plain_codes_decode_as_written_by_older_caches(codec: str, levels: int) -> None:
    """Bytes as q8/q4 caches hold them (header + delta codes) decode by their fixed formula."""
    ends = np.array([[-0.25, -9.5]], np.float16)
    codes = np.array([[0, 1, 3, 3, levels // 2, levels]], np.uint8)
    deltas = np.diff(codes, prepend=0).astype(np.uint8)
    stored = np.concatenate([ends.view(np.uint8), deltas], -1)
    want = -0.25 - codes.astype(np.float64) / levels * (-0.25 + 9.5)
    assert np.allclose(decode_logprobs(stored, codec), want, rtol=0, atol=1e-5)


def test_companded_cache_reads_through_the_client(
    tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    def spec(codec: str) -> dict:
        return {
            "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
            "dataset": {"tokens": str(tokens_npy)},
            "outputs": {"topk": 8, "temperatures": [1.0], "topk_codec": codec},
            "batch_size": 4,
            "rows_per_shard": 4,
        }

    ref_url = run_job(parse_spec(spec("fp16")), tmp_path / "a")
    url = run_job(parse_spec(spec("q8c")), tmp_path / "b")
    reader = CacheReader(url)
    assert reader.manifest.topk_codec == "q8c" and reader.manifest.format_version == 2
    assert all(c.ok for c in reader.verify())
    # chunks are stored rank-major (Zarr's core transpose codec): plain zarr-python and
    # TensorStore both read the (N, T, 4 + k) codes back
    arr = zarr.open_array(f"{url}/topk/logprobs", mode="r")
    inner = arr.metadata.codecs[0].codecs  # type: ignore[union-attr]
    assert isinstance(inner[0], TransposeCodec) and inner[0].order == (2, 0, 1)
    ts = pytest.importorskip("tensorstore")
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": f"{url}/topk/logprobs"}}
    np.testing.assert_array_equal(ts.open(spec).result().read().result(), arr[:])
    rows = list(range(reader.manifest.num_rows))
    ref = TeacherCache(ref_url).batch(rows, fields=["topk"])
    got = TeacherCache(url).batch(rows, fields=["topk"])
    assert torch.equal(got["topk_indices"], ref["topk_indices"])
    y, y_got = (
        ref["topk_logprobs"].double().div(3).exp(),
        got["topk_logprobs"].double().div(3).exp(),
    )
    step = (y[..., :1] - y[..., -1:]) / 255
    assert bool(((y_got - y).abs() <= step * (1 + 1e-4) + 1e-7).all())
