"""Sampled targets end to end: a cache with ``outputs.sample_draws`` written by the embedded
runner holds the teacher's draws, the same bytes whatever the batching, covered by ``verify``,
readable with plain zarr and through ``CacheDataset(fields=["sample"])``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdcache.client import CacheDataset, TeacherCache, losses
from kdcache.core.reader import CacheReader
from kdcache.core.spec import parse_spec
from kdcache.worker.runner import run_job

DRAWS = 24


def _spec(teacher: Path, tokens: Path, batch_size: int, **outputs: object) -> dict:
    return {
        "teacher": {"hf": str(teacher), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens)},
        "outputs": {"topk": 4, "temperatures": [1.0, 2.0], "sample_draws": DRAWS, **outputs},
        "batch_size": batch_size,
        "rows_per_shard": 4,
    }


@pytest.fixture(scope="module")
def sampled(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> str:
    root = tmp_path_factory.mktemp("sampled")
    return run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, 3)), root)


def test_draws_follow_the_teacher(sampled: str, tiny_teacher_dir: Path, tokens_npy: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    ids = np.load(tokens_npy).astype(np.int64)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.from_numpy(ids)).logits.double(), -1)
    r = CacheReader(sampled)
    m = r.manifest
    assert m.sample_draws == DRAWS and m.sample_width == DRAWS
    sx = torch.from_numpy(r.read("sample/indices", slice(None)).astype(np.int64))
    sc = torch.from_numpy(r.read("sample/counts", slice(None)).astype(np.int64))
    sl = torch.from_numpy(r.read("sample/logprobs", slice(None)).astype(np.float64))
    assert sx.shape == (*ids.shape, DRAWS) and (sc.sum(-1) == DRAWS).all()
    real = sc > 0
    torch.testing.assert_close(sl[real], ref.gather(-1, sx)[real], rtol=2e-3, atol=2e-3)
    # pooled over every position, the draws' frequencies match the teacher's probabilities
    # of the drawn ids' ranks (rank 0 = the teacher's argmax)
    rank = (ref.gather(-1, sx).unsqueeze(-1) < ref.unsqueeze(-2)).sum(-1)
    top1 = float(sc[(rank == 0) & real].sum()) / float(sc.sum())
    want = float(ref.max(-1).values.exp().mean())
    assert abs(top1 - want) < 0.03, (top1, want)


def test_same_bytes_whatever_the_batching(
    sampled: str, tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    other = run_job(parse_spec(_spec(tiny_teacher_dir, tokens_npy, 5)), tmp_path)
    a, b = CacheReader(sampled), CacheReader(other)
    assert a.manifest.cache_id == b.manifest.cache_id
    for name in ("sample/indices", "sample/counts", "sample/logprobs"):
        np.testing.assert_array_equal(a.read(name, slice(None)), b.read(name, slice(None)))
    reseeded = run_job(
        parse_spec(_spec(tiny_teacher_dir, tokens_npy, 3, sample_seed=1)), tmp_path / "seed1"
    )
    c = CacheReader(reseeded)
    assert c.manifest.cache_id != a.manifest.cache_id
    assert not np.array_equal(
        a.read("sample/indices", slice(None)), c.read("sample/indices", slice(None))
    )


def test_verify_covers_sample_arrays(sampled: str, tmp_path: Path) -> None:
    import shutil

    r = CacheReader(sampled)
    assert all(c.ok for c in r.verify())
    assert {"sample/indices", "sample/counts", "sample/logprobs"} <= set(r.completed()[0].checksums)
    copy = tmp_path / "copy"
    shutil.copytree(sampled, copy)
    g = zarr.open_group(str(copy), mode="r+")
    arr = g["sample/counts"]
    arr[0, 0, 0] = int(arr[0, 0, 0]) + 1  # type: ignore[index]
    bad = [c for c in CacheReader(str(copy)).verify() if not c.ok]
    assert [c.shard for c in bad] == [0] and "sample/counts" in bad[0].problems[0]


def test_plain_zarr_and_dataset_fields(sampled: str) -> None:
    g = zarr.open_group(sampled, mode="r")
    assert set(g["sample"].array_keys()) == {"indices", "counts", "logprobs"}  # type: ignore[union-attr]
    assert g["sample/counts"].dtype == np.uint8
    ds = CacheDataset(sampled, fields=["sample"], shuffle=False)
    row = next(iter(ds))
    want = {"row", "sample_indices", "sample_counts", "sample_logprobs", "temperatures"}
    assert set(row) == want | {"loss_mask"}
    assert (
        row["sample_indices"].dtype == torch.int64 and row["sample_logprobs"].dtype == torch.float32
    )
    cache = TeacherCache(sampled)
    batch = cache.batch([0, 1], fields=["topk", "sample"])
    np.testing.assert_array_equal(
        batch["sample_counts"].numpy(), CacheReader(sampled).read("sample/counts", [0, 1])
    )
    logits = torch.zeros(2, batch["sample_indices"].shape[1], 320, requires_grad=True)
    for targets in ("sample", "topk+sample"):
        loss = losses.kd_loss(logits, batch, temperature=2.0, targets=targets)
        loss.backward()
        assert torch.isfinite(loss) and float(loss.detach()) > 0
    with pytest.raises(ValueError, match="field 'sampled' is not in this cache"):
        CacheDataset(str(Path(sampled)), fields=["sampled"])


def test_cache_without_per_draw_logprobs(
    sampled: str, tmp_path: Path, tiny_teacher_dir: Path, tokens_npy: Path
) -> None:
    """``outputs.sample_logprobs: false``: two sums per position instead of a log-prob per draw,
    the same draws, the same t=1 losses, other temperatures refused by name."""
    spec = _spec(tiny_teacher_dir, tokens_npy, 3, sample_logprobs=False)
    url = run_job(parse_spec(spec), tmp_path)
    reader = CacheReader(url)
    assert reader.manifest.cache_id != CacheReader(sampled).manifest.cache_id
    assert not reader.manifest.sample_logprobs and all(c.ok for c in reader.verify())
    g = zarr.open_group(url, mode="r")
    assert set(g["sample"].array_keys()) == {"indices", "counts", "logprob_sums"}  # type: ignore[union-attr]
    rows = list(range(reader.manifest.num_rows))
    full = TeacherCache(sampled).batch(rows, fields=["topk", "sample"])
    lean = TeacherCache(url).batch(rows, fields=["topk", "sample"])
    assert "sample_logprobs" not in lean and lean["sample_logprob_sums"].shape[-1] == 2
    for key in ("sample_indices", "sample_counts"):
        assert torch.equal(full[key], lean[key]), key
    s = torch.randn(len(rows), full["sample_indices"].shape[1], 320, dtype=torch.float64)
    for targets in ("sample", "topk+sample"):
        a = losses.kd_loss(s, full, temperature=1.0, targets=targets)
        b = losses.kd_loss(s, lean, temperature=1.0, targets=targets)
        assert float(a) == pytest.approx(float(b), rel=1e-5), targets
    with pytest.raises(ValueError, match="sample_logprobs: false"):
        losses.kd_loss(s, lean, temperature=2.0, targets="sample")
