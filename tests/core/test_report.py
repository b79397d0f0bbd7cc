"""``kdcache report``: the numbers against a dense float64 teacher forward, and the page itself."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.core.cachestats import cache_stats, entropy_bounds, sample_rows, tail_mass
from kdcache.core.reader import CacheReader
from kdcache.core.report import render_report, summary_text, write_report
from kdcache.core.spec import parse_spec
from kdcache.worker.runner import run_job

TEMPS = [1.0, 2.0]
K = 8


@pytest.fixture(scope="module")
def cache(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, tokens_npy: Path
) -> str:
    spec = {
        "name": "report-test",
        "teacher": {"hf": str(tiny_teacher_dir), "dtype": "float32", "device": "cpu"},
        "dataset": {"tokens": str(tokens_npy)},
        "outputs": {"topk": K, "temperatures": TEMPS, "hidden_layers": [1, 2]},
        "batch_size": 4,
        "rows_per_shard": 3,
    }
    return run_job(parse_spec(spec), tmp_path_factory.mktemp("root"))


def _dense(teacher: Path, reader: CacheReader) -> dict[str, np.ndarray]:
    """Float64 probabilities of the teacher at each cached temperature: (P, V), sorted desc."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float64).eval()
    ids = reader.read("input_ids", slice(None)).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    z = out.logits.double().reshape(-1, out.logits.shape[-1])
    probs = {
        f"{t:g}": torch.sort(torch.softmax(z / t, -1), -1, descending=True).values.numpy()
        for t in TEMPS
    }
    for layer in (1, 2):
        probs[f"hidden{layer}"] = out.hidden_states[layer].reshape(-1, 32).norm(dim=-1).numpy()
    return probs


def test_tail_mass_matches_dense_teacher(cache: str, tiny_teacher_dir: Path) -> None:
    reader = CacheReader(cache)
    stats = cache_stats(reader)
    dense = _dense(tiny_teacher_dir, reader)
    # the statistics cover trained positions: the cache's loss_mask (not the last of each row)
    trained = reader.read("loss_mask", slice(None)).reshape(-1)
    assert stats.masked and trained.sum() == 8 * 15
    assert stats.positions == 8 * 15 and not stats.sampled
    for t in TEMPS:
        p = dense[f"{t:g}"][trained]
        tail = 1.0 - np.cumsum(p[:, :K], axis=1)  # (P, K) exact, float64
        got = stats.tail[f"{t:g}"]
        np.testing.assert_allclose(got["mean"], tail.mean(0), atol=2e-3)
        np.testing.assert_allclose(got["p50"], np.quantile(tail, 0.5, axis=0), atol=3e-3)
        np.testing.assert_allclose(got["p95"], np.quantile(tail, 0.95, axis=0), atol=3e-3)
        # the tail shrinks with k, and a hotter temperature leaves more mass in the tail
        assert np.all(np.diff(got["mean"]) < 0)
    assert stats.tail_at(2.0, 1) > stats.tail_at(1.0, 1) + 0.02
    # top-1 probability is exact; the true entropy lies within the reported bounds
    for t in TEMPS:
        p = dense[f"{t:g}"][trained]
        e = stats.entropy[f"{t:g}"]
        np.testing.assert_allclose(e["top1"], p[:, 0], atol=2e-3)
        h = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
        assert np.all(e["lower"] <= h + 1e-3) and np.all(h <= e["upper"] + 1e-3)
        assert np.mean(e["upper"] - e["lower"]) > 0.01  # a bound, not the entropy itself
    # hidden-state norms: median per layer from the bf16 cache vs the float64 forward
    for layer in (1, 2):
        want = np.median(dense[f"hidden{layer}"])
        assert stats.hidden[str(layer)]["p50"] == pytest.approx(want, rel=2e-2)


def test_entropy_bounds_are_exact_when_k_is_the_vocabulary() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, 12)) * 3
    lse = np.log(np.exp(z).sum(1, keepdims=True))
    lp = np.sort(z - lse, axis=1)[:, ::-1]
    lo, hi, top1 = entropy_bounds(lp, np.hstack([lse, lse]), 1.0, vocab_size=12)
    p = np.exp(lp)
    h = -(p * np.log(p)).sum(1)
    np.testing.assert_allclose(lo, h, atol=1e-9)
    np.testing.assert_allclose(hi, h, atol=1e-9)
    np.testing.assert_allclose(top1, p[:, 0])
    # and the tail mass of the first 3 at t=1
    np.testing.assert_allclose(
        tail_mass(lp[:, :3], np.hstack([lse, lse]), 1.0)[:, 2], 1 - p[:, :3].sum(1), atol=1e-12
    )


def test_sampling_is_seeded_and_said(cache: str) -> None:
    rows = sample_rows(np.arange(100), 10, seed=3)
    assert rows.size == 10 and len(set(rows.tolist())) == 10
    np.testing.assert_array_equal(rows, sample_rows(np.arange(100), 10, seed=3))
    stats = cache_stats(CacheReader(cache), max_positions=3 * 16)
    assert stats.sampled and stats.rows_sampled == 3 and stats.positions == 3 * 15  # loss_mask
    assert "sampled 3 of 8 completed rows" in summary_text(stats)


def test_report_page_and_plots(cache: str, tmp_path: Path) -> None:
    stats = cache_stats(CacheReader(cache))
    page = write_report(render_report(stats), tmp_path / "rep")
    html = page.read_text()
    for name in ("tail_mass", "entropy", "bytes", "shards", "hidden_norms"):
        png = (tmp_path / "rep" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 2000
    assert html.count("data:image/png;base64,") == 5  # self-contained
    assert not re.search(r"(src|href)=\"https?://", html)  # nothing loaded from elsewhere
    assert "bounds" in html and "exact" in html
    # the table shows the same number the stats hold
    assert f"{stats.tail_at(1.0, 4):.4f}" in html
    text = summary_text(stats)
    assert len(text.splitlines()) <= 24
    assert "tail mass" in text and "k=8" in text
    # per-shard timings and the writer come from the completion records
    assert len(stats.shards) == 3 and all(s.seconds > 0 for s in stats.shards)
    assert {s.writer for s in stats.shards} == {stats.shards[0].writer}
    assert ":" in stats.shards[0].writer  # host:pid
    by_name = {a["name"]: a for a in stats.arrays}
    assert by_name["hidden/1"]["bytes_per_token"] > by_name["input_ids"]["bytes_per_token"]
