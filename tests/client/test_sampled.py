"""Sampled targets: the estimators' mean over many seeds equals the dense loss and gradient.

Draws come from the worker's own sampler (:mod:`kdcache.worker.sampling`), exactly as a cache
stores them. Statistical tolerance: each compared number (the loss, and every element of the
gradient) must lie within 5 standard errors of the dense value, the standard error being
estimated from 40 independent groups of seeds; the bias that top-k-only targets have on the
same teacher is asserted to be far above that tolerance, so a biased estimator fails.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from kdcache.client import losses
from kdcache.worker.sampling import logprob_sums, row_uniforms, sample_chunk

B, T, V, K = 2, 3, 48, 6
GROUPS, PER_GROUP = 40, 40


def _teacher(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # a spread-out teacher: the top-6 misses a good part of the mass
    return torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5


def _batch(z: torch.Tensor, copies: int, first_row: int, draws: int) -> dict[str, torch.Tensor]:
    """Top-k and ``copies`` independent sets of draws per row of ``z``, stacked along B."""
    z32 = z.float()
    lse1 = z32.logsumexp(-1)
    zc, lc = z32.repeat(copies, 1, 1), lse1.repeat(copies, 1)
    rows = range(first_row, first_row + zc.shape[0])
    u = torch.from_numpy(row_uniforms(7, rows, T, draws))
    ids, counts, lp = sample_chunk(zc, lc, u, min(draws, V))
    temps = torch.tensor([1.0, 2.0])
    lse = torch.stack([z.logsumexp(-1), (z / 2).logsumexp(-1)], -1)
    vals, idx = z.topk(K, dim=-1)
    return {
        "sample_indices": ids,
        "sample_counts": counts,
        "sample_logprobs": lp,
        "topk_logprobs": (vals - z.logsumexp(-1, keepdim=True)).repeat(copies, 1, 1),
        "topk_indices": idx.repeat(copies, 1, 1),
        "topk_logsumexp": lse.repeat(copies, 1, 1),
        "temperatures": temps.expand(zc.shape[0], -1),
    }


def _as_sums(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch as a cache with ``outputs.sample_logprobs: false`` gives it (float16 log-probs
    summed per position, as the worker stores them)."""
    out = dict(batch)
    lp16 = out.pop("sample_logprobs").half().numpy()
    ids, counts = out["sample_indices"].numpy(), out["sample_counts"].numpy()
    sums = logprob_sums(ids, counts, lp16, out["topk_indices"].numpy())
    out["sample_logprob_sums"] = torch.from_numpy(sums)
    return out


@functools.cache
def _estimates(
    targets: str, temperature: float, draws: int, sums: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per-group mean loss (GROUPS,) and gradient (GROUPS, B, T, V); ``sums``: from
    ``sample_logprob_sums`` instead of ``sample_logprobs``."""
    z = _teacher()
    student = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values, grads = [], []
    for g in range(GROUPS):
        s = student.clone().requires_grad_(True)
        batch = _batch(z, PER_GROUP, g * PER_GROUP * B, draws)
        if sums:
            batch = _as_sums(batch)
        loss = losses.kd_loss(s.repeat(PER_GROUP, 1, 1), batch, temperature, targets=targets)
        loss.backward()
        assert s.grad is not None
        values.append(float(loss.detach()))
        grads.append(s.grad.numpy().copy())
    return np.array(values), np.stack(grads)


def _dense(temperature: float) -> tuple[float, np.ndarray]:
    z = _teacher()
    s = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s.requires_grad_(True)
    loss = losses.dense_kd_loss(s, z, temperature)
    loss.backward()
    assert s.grad is not None
    return float(loss.detach()), s.grad.numpy()


@pytest.mark.parametrize("targets", ["sample", "topk+sample"])
@pytest.mark.parametrize(("temperature", "sums"), [(1.0, False), (2.0, False), (1.0, True)])
def test_estimator_mean_equals_dense_loss_and_gradient(
    targets: str, temperature: float, sums: bool
) -> None:
    values, grads = _estimates(targets, temperature, draws=8, sums=sums)
    dense_value, dense_grad = _dense(temperature)
    se = values.std(ddof=1) / np.sqrt(GROUPS)
    assert abs(values.mean() - dense_value) <= 5 * se + 1e-6, (values.mean(), dense_value, se)
    gse = grads.std(axis=0, ddof=1) / np.sqrt(GROUPS)
    err = np.abs(grads.mean(axis=0) - dense_grad)
    # A class the teacher gives so little mass that all the draws together expect fewer than 5
    # of it may never be drawn (zero sample variance); its teacher term t * q_t(v) / (B T) is
    # the most it can be off by.
    z = _teacher()
    expected = torch.softmax(z, -1).numpy() * GROUPS * PER_GROUP * 8
    rare = temperature * torch.softmax(z / temperature, -1).numpy() / (B * T)
    atol = np.where(expected < 5, rare, 0.0)
    assert (err <= 5 * gse + atol + 1e-9).all(), float((err / (gse + 1e-12)).max())
    # the tolerance has power: top-k targets alone are off by far more than it allows
    s = torch.randn(B, T, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    topk_only = losses.kd_loss(s, _batch(z, 1, 0, 1), temperature, tail="renormalize")
    assert abs(float(topk_only) - dense_value) > 5 * se


def test_hybrid_has_lower_variance_than_samples_alone() -> None:
    plain, _ = _estimates("sample", 1.0, draws=8)
    hybrid, _ = _estimates("topk+sample", 1.0, draws=8)
    assert hybrid.std() < plain.std()


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_divergences_samples_cannot_estimate_are_refused(divergence: str) -> None:
    batch = _batch(_teacher(), 1, 0, 4)
    with pytest.raises(ValueError, match="without bias"):
        losses.kd_loss(torch.zeros(B, T, V), batch, divergence=divergence, targets="sample")


def test_other_temperature_needs_the_cached_normalisers() -> None:
    batch = _batch(_teacher(), 1, 0, 4)
    sample_only = {k: v for k, v in batch.items() if k.startswith("sample_")}
    assert float(losses.kd_loss(torch.zeros(B, T, V), sample_only)) > 0  # default: "sample"
    with pytest.raises(ValueError, match="log-normalisers"):
        losses.kd_loss(torch.zeros(B, T, V), sample_only, temperature=2.0)
    with pytest.raises(ValueError, match="targets must be one of"):
        losses.kd_loss(torch.zeros(B, T, V), batch, targets="samples")


def test_draws_depend_only_on_seed_and_row() -> None:
    z = _teacher().float()
    lse = z.logsumexp(-1)
    u = torch.from_numpy(row_uniforms(3, [10, 11], T, 16))
    ids, counts, lp = sample_chunk(z, lse, u, 16)
    # row 11 alone, and position by position: the same bytes
    u11 = torch.from_numpy(row_uniforms(3, [11], T, 16))
    for j in range(T):
        i1, c1, l1 = sample_chunk(z[1:, j : j + 1], lse[1:, j : j + 1], u11[:, j : j + 1], 16)
        assert torch.equal(i1, ids[1:, j : j + 1]) and torch.equal(c1, counts[1:, j : j + 1])
        assert torch.equal(l1, lp[1:, j : j + 1])
    assert (counts.sum(-1) == 16).all()
    assert not np.array_equal(row_uniforms(4, [10], T, 16)[0], u[0].numpy())
    # slots: distinct ids, counts descending, padding last; logprobs are the teacher's
    for b in range(B):
        for j in range(T):
            c = counts[b, j]
            n = int((c > 0).sum())
            assert len(set(ids[b, j, :n].tolist())) == n and (c[:n].diff() <= 0).all()
            assert (c[n:] == 0).all()
            want = (z[b, j] - lse[b, j])[ids[b, j, :n]]
            torch.testing.assert_close(lp[b, j, :n], want)


def test_zero_mass_ids_are_never_drawn() -> None:
    z = torch.full((1, 1, 10), float("-inf"))
    z[0, 0, 3], z[0, 0, 7] = 0.0, 1.0
    u = torch.from_numpy(row_uniforms(0, [0], 1, 200))
    ids, counts, _ = sample_chunk(z, z.logsumexp(-1), u, 10)
    drawn = set(ids[counts > 0].tolist())
    assert drawn == {3, 7}
    frac7 = float(counts[ids == 7].sum()) / 200
    assert abs(frac7 - float(torch.sigmoid(torch.tensor(1.0)))) < 0.1


@pytest.mark.parametrize("targets", ["sample", "topk+sample"])
def test_logprob_sums_give_the_same_estimate_at_t1(targets: str) -> None:
    batch = _batch(_teacher(), 3, 0, 8)
    batch["sample_logprobs"] = batch["sample_logprobs"].half().float()  # as a cache stores them
    s = torch.randn(3 * B, T, V, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    values, grads = [], []
    for b in (batch, _as_sums(batch)):
        x = s.clone().requires_grad_(True)
        loss = losses.kd_loss(x, b, 1.0, targets=targets)
        loss.backward()
        assert x.grad is not None
        values.append(float(loss.detach()))
        grads.append(x.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-6, abs=1e-9)
    assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-12)


def test_logprob_sums_refuse_other_temperatures() -> None:
    batch = _as_sums(_batch(_teacher(), 1, 0, 4))
    with pytest.raises(ValueError, match="sample_logprobs: false"):
        losses.kd_loss(torch.zeros(B, T, V), batch, temperature=2.0, targets="sample")
    broken = {k: v for k, v in batch.items() if k != "sample_logprob_sums"}
    with pytest.raises(KeyError, match="sample_logprobs"):
        losses.kd_loss(torch.zeros(B, T, V), broken, targets="sample")
