"""Unbiased KD losses from tokens drawn from the teacher (``targets="sample"`` / ``"topk+sample"``).

A cache with ``outputs.sample_draws: N`` holds, per position, the distinct ids ``x_i`` drawn from
the teacher at t=1, their counts ``c_i`` (sum N) and their exact log-probabilities
``log q_1(x_i)``. For a cached temperature ``t`` the importance weight
``w(x) = q_t(x) / q_1(x)`` is exact (``log q_t = (log q_1 + lse_1) / t - lse_t``), so

    KL(q_t || p_t) = E_{x ~ q_1}[ w(x) (log q_t(x) - log p_t(x)) ]
                  ~= sum_i (c_i / N) w(x_i) (log q_t(x_i) - log p_t(x_i))

is unbiased in value and in gradient (the teacher side is a constant). The hybrid estimator takes
the top-k terms exactly and estimates only the rest from the draws outside the top-k:

    sum_{v in K} q_t(v) (log q_t(v) - log p_t(v))
      + sum_i (c_i / N) [x_i not in K] w(x_i) (log q_t(x_i) - log p_t(x_i))

A cache written with ``outputs.sample_logprobs: false`` keeps, instead of ``log q_1(x_i)`` per
draw, the two sums ``sum_i (c_i / N) log q_1(x_i)`` over all draws and over the draws outside the
top-k (``sample_logprob_sums``): at t=1 the teacher's side of both estimates is exactly that
sum, and the student's side needs only ids and counts, so the estimates are the same numbers.
Other temperatures need each draw's weight ``w(x_i)`` and are refused for such a cache.

Reverse KL and JSD weigh classes by the student's probabilities (or a mixture), which draws from
the teacher cannot estimate without bias, so they are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kdcache.client._divergences import divergence_terms, masked_mean, require_choice

__all__ = ["TARGETS", "resolve_targets", "sampled_kd_loss"]

TARGETS: tuple[str, ...] = ("topk", "sample", "topk+sample")


def resolve_targets(batch: Mapping[str, Any], targets: str | None) -> str:
    """``targets`` checked, or the default: "topk" when the batch has top-k, else "sample"."""
    if targets is None:
        return "sample" if "sample_indices" in batch and "topk_logprobs" not in batch else "topk"
    require_choice(targets, TARGETS, "targets")
    return targets


def _sample_inputs(
    student_logits: Tensor, batch: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor]:
    """(indices int64, counts, logprobs) of the draws, validated against the student's shape.

    Without ``sample_logprobs`` (a cache that keeps ``sample_logprob_sums``) the third is the
    (B, T, 2) sums instead."""
    teacher = "sample_logprobs" if "sample_logprobs" in batch else "sample_logprob_sums"
    missing = [k for k in ("sample_indices", "sample_counts") if k not in batch]
    if teacher not in batch:
        missing.append("sample_logprobs")
    if missing:
        raise KeyError(
            f"targets with samples need {missing} in the batch (a cache written with "
            f"outputs.sample_draws > 0, fields=['sample']); its keys are {sorted(batch)}"
        )
    dev = student_logits.device
    ids = torch.as_tensor(batch["sample_indices"]).to(dev, torch.int64)
    counts = torch.as_tensor(batch["sample_counts"]).to(dev)
    logprobs = torch.as_tensor(batch[teacher]).detach().to(dev)
    b, t, v = student_logits.shape
    if ids.dim() != 3 or tuple(ids.shape[:2]) != (b, t):
        raise ValueError(
            f"sample_indices has shape {tuple(ids.shape)}; expected (B, T, m) with (B, T) = "
            f"{(b, t)} of student_logits {tuple(student_logits.shape)}"
        )
    want = ids.shape if teacher == "sample_logprobs" else (*ids.shape[:2], 2)
    if counts.shape != ids.shape or logprobs.shape != want:
        raise ValueError(
            f"sample_counts {tuple(counts.shape)} and {teacher} {tuple(logprobs.shape)} "
            f"must have the shapes {tuple(ids.shape)} and {tuple(want)}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"sample_indices hold ids outside the student's vocabulary of {v}")
    return ids, counts, logprobs


def _log_q_t(
    batch: Mapping[str, Any], lp1: Tensor, t: float, dtype: torch.dtype, lse_index: Any
) -> Tensor:
    """The teacher's log q_t of the drawn ids, from log q_1 and the cached normalisers."""
    if t == 1.0:
        return lp1
    if "topk_logsumexp" not in batch:
        raise ValueError(
            f"sampled targets at temperature {t:g} need the cached log-normalisers "
            "(fields 'topk_logsumexp' and 'temperatures'); without them only temperature 1.0 "
            "is available"
        )
    lse = torch.as_tensor(batch["topk_logsumexp"]).detach().to(lp1.device, dtype)
    i_t, i_1 = lse_index(batch, lse.shape[-1], t)
    return (lp1 + lse[..., i_1 : i_1 + 1]) / t - lse[..., i_t : i_t + 1]


def sampled_kd_loss(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    temperature: float,
    divergence: str,
    mask: Tensor | None,
    *,
    hybrid: bool,
    lse_index: Any,
    exact_topk: Any = None,
) -> Tensor:
    """``t**2 * KL(q_t || p_t)`` estimated from the draws (hybrid: top-k exact); a scalar.

    student_logits: (B, T, V). batch: ``sample_indices`` / ``sample_counts`` /
    ``sample_logprobs`` (B, T, m), plus ``topk_logsumexp`` and ``temperatures`` for t != 1 and
    the top-k keys for the hybrid. ``lse_index(batch, n_temps, t)`` -> (index of t, index of 1);
    ``exact_topk(student_logits, batch, t, dtype)`` -> (per-position exact top-k terms (B, T),
    top-k ids (B, T, k)). Both come from :mod:`kdcache.client.losses`.
    """
    if divergence != "forward_kl":
        raise ValueError(
            f"divergence {divergence!r} cannot be estimated without bias from draws of the "
            "teacher (it is not an expectation under the teacher's distribution); use "
            "divergence='forward_kl' with sampled targets, or targets='topk'"
        )
    t = float(temperature)
    ids, counts, lp1 = _sample_inputs(student_logits, batch)
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    lp1 = lp1.to(dtype)
    scaled = student_logits.to(dtype) / t
    log_p = scaled.gather(-1, ids) - torch.logsumexp(scaled, dim=-1, keepdim=True)
    if "sample_logprobs" not in batch:
        return _from_sums(
            student_logits, batch, t, dtype, (ids, counts, lp1, log_p), mask, hybrid, exact_topk
        )
    log_q = _log_q_t(batch, lp1, t, dtype, lse_index)
    weight = counts.to(dtype) / counts.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    if t != 1.0:
        weight = weight * (log_q - lp1).exp()
    per_position = torch.zeros(ids.shape[:2], dtype=dtype, device=ids.device)
    if hybrid:
        exact, topk_ids = exact_topk(student_logits, batch, t, dtype)
        in_topk = (ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)).any(-1)
        weight = weight.masked_fill(in_topk, 0.0)
        per_position = per_position + exact
    # padding slots (count 0) hold id 0 and log q 0: finite, and weighted by exactly 0
    terms = weight * (log_q - log_p)
    per_position = per_position + terms.sum(-1)
    return t**2 * masked_mean(per_position, mask)


def _from_sums(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    t: float,
    dtype: torch.dtype,
    draws: tuple[Tensor, Tensor, Tensor, Tensor],
    mask: Tensor | None,
    hybrid: bool,
    exact_topk: Any,
) -> Tensor:
    """The t=1 estimates from ``sample_logprob_sums`` (module docstring); a scalar."""
    if t != 1.0:
        raise ValueError(
            f"sampled targets at temperature {t:g} need each draw's log-probability "
            "(sample_logprobs), and this cache keeps only their sums (it was written with "
            "outputs.sample_logprobs: false): use temperature 1.0, or targets='topk'"
        )
    ids, counts, sums, log_p = draws
    weight = counts.to(dtype) / counts.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    teacher_side = sums[..., 0]
    per_position = torch.zeros(ids.shape[:2], dtype=dtype, device=ids.device)
    if hybrid:
        exact, topk_ids = exact_topk(student_logits, batch, t, dtype)
        in_topk = (ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)).any(-1)
        weight = weight.masked_fill(in_topk, 0.0)
        teacher_side = sums[..., 1]
        per_position = per_position + exact
    per_position = per_position + teacher_side - (weight * log_p).sum(-1)
    return masked_mean(per_position, mask)


def exact_topk_terms(log_q: Tensor, log_p: Tensor) -> Tensor:
    """Per-position sum of q (log q - log p) over the top-k classes: (B, T)."""
    return divergence_terms(log_q, log_p, "forward_kl").sum(-1)
