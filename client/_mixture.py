"""KD against an ensemble of cached teachers: the mixture of their distributions, or a weighted sum.

An ensemble batch (see :mod:`kdcache.client.ensemble`) holds, for teachers j = 0..n-1 with weights
``w_j`` (summing to 1), teacher j's top-k ids ``S_j``, their log-probabilities and its exact
log-normalisers. At a cached temperature ``t`` the teacher's probabilities ``q_j(v)`` are exact on
``S_j`` and so is its tail mass ``r_j = 1 - sum_{S_j} q_j``. The mixture ``q = sum_j w_j q_j`` is
compared with the student on the union ``U`` of the cached ids (of the teachers of weight > 0
in the row) plus one merged "rest" class.

A teacher's probability of an id of ``U`` outside its own top-k is not cached. It is estimated by
spreading its tail evenly over the ids it did not cache, ``q_j(v) ~ r_j / (V - k_j)``: the
maximum-entropy guess given the cache, never above the smallest cached probability (it is the
mean of the tail's probabilities, each of which is at most that), and exact when the teacher's
tail is flat. The merged tail is then ``1 - sum_U q`` in closed form,
``sum_j w_j r_j (V - |U|) / (V - k_j)``, and every id is counted once, however many teachers
cached it. With k = V for every teacher this is the dense mixture loss.

``tail="renormalize"`` mixes each teacher's renormalised top-k instead (an id outside ``S_j``
gets 0 from teacher j) and renormalises the student over ``U``; ``"ignore"`` drops the merged
class. ``ensemble="sum"`` is ``sum_j w_j kd_loss(student, teacher j)`` instead of the mixture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kdcache.client import losses
from kdcache.client._divergences import divergence_terms, log1mexp, masked_mean, require_choice
from kdcache.core.errors import TemperatureNotCachedError

__all__ = [
    "TEACHER_WEIGHTS",
    "is_ensemble",
    "mixture_kd_loss",
    "teacher_key",
    "teacher_view",
    "teacher_weights",
]

TEACHER_WEIGHTS = "teacher_weights"
# keys an ensemble batch shares between its teachers (everything else is per teacher)
SHARED_KEYS: tuple[str, ...] = ("row", "input_ids", "loss_mask")


def teacher_key(j: int, field: str) -> str:
    """The batch key of teacher ``j``'s ``field``: ``teacher{j}_{field}``."""
    return f"teacher{j}_{field}"


def is_ensemble(batch: Mapping[str, Any]) -> bool:
    return TEACHER_WEIGHTS in batch


def teacher_weights(batch: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> Tensor:
    """The batch's teacher weights normalised to sum 1: (n,) or (B, n)."""
    w = torch.as_tensor(batch[TEACHER_WEIGHTS]).detach().to(dtype)
    if w.dim() not in (1, 2) or w.shape[-1] < 1:
        raise ValueError(f"{TEACHER_WEIGHTS} must be (n,) or (B, n); got {tuple(w.shape)}")
    if not (torch.isfinite(w).all() and (w >= 0).all() and (w.sum(-1) > 0).all()):
        raise ValueError(f"{TEACHER_WEIGHTS} must be finite, >= 0 and not all 0; got {w}")
    return w / w.sum(-1, keepdim=True)


def teacher_view(batch: Mapping[str, Any], j: int) -> dict[str, Any]:
    """Teacher ``j``'s part of an ensemble batch with single-teacher keys (``topk_logprobs``,
    ``hidden_<l>`` ...) plus the shared ones: what :func:`losses.kd_loss` and
    :func:`losses.hidden_losses` take for one teacher."""
    n = int(torch.as_tensor(batch[TEACHER_WEIGHTS]).shape[-1])
    if not 0 <= j < n:
        raise IndexError(f"teacher {j} is not in this batch of {n} teachers")
    prefix = teacher_key(j, "")
    view = {k: batch[k] for k in SHARED_KEYS if k in batch}
    view.update({k.removeprefix(prefix): v for k, v in batch.items() if k.startswith(prefix)})
    return view


def _log_weights(batch: Mapping[str, Any], b: int, dtype: torch.dtype, device: Any) -> Tensor:
    """log w: (B, 1, n), broadcastable against per-position teacher terms."""
    w = teacher_weights(batch, dtype).to(device)
    if w.dim() == 1:
        w = w.expand(b, -1)
    elif w.shape[0] != b:
        raise ValueError(f"{TEACHER_WEIGHTS} has {w.shape[0]} rows; the batch has {b}")
    return w.log()[:, None, :]


def _teacher_support(
    student_logits: Tensor, view: Mapping[str, Any], t: float, tail: str, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher j at temperature t: sorted ids (B, T, k), their log q (B, T, k), and the log of the
    estimate for each id it did not cache (B, T, 1), ``-inf`` when it cached all V."""
    logprobs, indices = losses._topk_inputs(student_logits, view)
    v, k = student_logits.shape[-1], indices.shape[-1]
    if tail == "renormalize":
        log_q = torch.log_softmax(logprobs.to(dtype) / t, dim=-1)
        log_u = torch.full_like(log_q[..., :1], float("-inf"))
    else:
        log_q = losses._teacher_topk(view, logprobs, t, dtype)
        if k == v:
            log_u = torch.full_like(log_q[..., :1], float("-inf"))
        else:
            log_r = log1mexp(torch.logsumexp(log_q, dim=-1, keepdim=True))
            log_u = log_r - math.log(v - k)
    order = indices.argsort(dim=-1)
    return indices.gather(-1, order), log_q.gather(-1, order), log_u


def _at(sorted_ids: Tensor, log_q: Tensor, log_u: Tensor, ids: Tensor) -> Tensor:
    """Teacher log-probabilities at ``ids`` (B, T, K): cached where ``sorted_ids`` holds the id,
    else the tail estimate ``log_u``."""
    pos = torch.searchsorted(sorted_ids, ids).clamp(max=sorted_ids.shape[-1] - 1)
    hit = sorted_ids.gather(-1, pos) == ids
    return torch.where(hit, log_q.gather(-1, pos), log_u.expand_as(ids).to(log_q.dtype))


def mixture_kd_loss(
    student_logits: Tensor,
    batch: Mapping[str, Any],
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    tail: str = "bucket",
    mask: Tensor | None = None,
    ensemble: str = "mixture",
) -> Tensor:
    """Ensemble KD loss of a student against an ensemble batch; a scalar tensor.

    student_logits: (B, T, V). batch: ``teacher_weights`` (n,) or (B, n) and, for each teacher j,
    ``teacher{j}_topk_logprobs`` (B, T, k_j), ``teacher{j}_topk_indices``,
    ``teacher{j}_topk_logsumexp`` (B, T, n_temps_j) and ``teacher{j}_temperatures``.
    Returns ``temperature**2 * divergence(mixture_t, student_t)`` averaged over positions (mask,
    else the batch's ``loss_mask``, else all), or the weighted sum of per-teacher losses for
    ``ensemble="sum"``. See the module docstring for the tail estimate.
    """
    require_choice(ensemble, losses.ENSEMBLES, "ensemble")
    require_choice(divergence, losses.DIVERGENCES, "divergence")
    require_choice(tail, losses.TAILS, "tail")
    t = losses._check_temperature(temperature)
    if student_logits.dim() != 3:
        raise ValueError(
            f"student_logits must be (B, T, V); got shape {tuple(student_logits.shape)}"
        )
    b, _, v = student_logits.shape
    dtype = losses._compute_dtype(student_logits)
    log_w = _log_weights(batch, b, dtype, student_logits.device)
    n = log_w.shape[-1]
    views = [teacher_view(batch, j) for j in range(n)]
    mask = losses._default_mask(batch, mask)
    if tail != "renormalize":
        _check_cached(views, t)
    if ensemble == "sum":
        w = log_w.exp()[:, 0, :]
        if not torch.equal(w, w[:1].expand_as(w)):
            raise ValueError("ensemble='sum' needs the same teacher_weights in every row")
        terms = [losses.kd_loss(student_logits, vw, t, divergence, tail, mask) for vw in views]
        return sum((w[0, j] * term for j, term in enumerate(terms)), torch.zeros((), dtype=dtype))

    support = [_teacher_support(student_logits, vw, t, tail, dtype) for vw in views]
    ids, first = _union(support, log_w, v)
    per_teacher = torch.stack([_at(*s, ids) for s in support], dim=-1)  # (B, T, K, n)
    log_q = torch.logsumexp(per_teacher + log_w[..., None, :], dim=-1)
    log_q = log_q.masked_fill(~first, float("-inf"))

    scaled = student_logits.to(dtype) / t
    student_at = scaled.gather(-1, ids).masked_fill(~first, float("-inf"))
    if tail == "renormalize":
        log_p = torch.log_softmax(student_at, dim=-1)
    else:
        log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)
        log_p = student_at - log_z
        if tail == "bucket":
            log_q = torch.cat([log_q, _merged_tail(support, log_w, first, v)], dim=-1)
            log_p = torch.cat([log_p, losses._student_tail(scaled, ids, log_z)], dim=-1)
    per_position = divergence_terms(log_q, log_p, divergence).sum(-1)
    return t**2 * masked_mean(per_position, mask)


def _check_cached(views: list[dict[str, Any]], t: float) -> None:
    """Refuse a temperature some teacher did not cache, naming each such teacher and its list."""
    lacking = []
    for j, view in enumerate(views):
        n_temps = torch.as_tensor(losses._get(view, "topk_logsumexp")).shape[-1]
        temps = losses._cached_temperatures(view, n_temps)
        try:
            losses._temperature_index(temps, t)
        except TemperatureNotCachedError:
            lacking.append(f"teacher {j} holds {list(temps)}")
    if lacking:
        raise TemperatureNotCachedError(
            f"temperature {t:g} is not cached by every teacher: {'; '.join(lacking)}. Use one "
            "every teacher holds, or tail='renormalize', which works at any temperature."
        )


def _union(
    support: list[tuple[Tensor, Tensor, Tensor]], log_w: Tensor, v: int
) -> tuple[Tensor, Tensor]:
    """The union of the cached ids of the teachers weighted in each row: ids (B, T, K) and
    ``first`` (B, T, K) bool, true on one slot per union id.

    A teacher of weight 0 in a row adds no ids there (they would only split the classes
    compared, and under ``renormalize`` spread the student over ids no teacher weighs). Its
    slots are counted out and hold a union id of the row, so gathers and scatters stay in range.
    """
    weighted = torch.isfinite(log_w)  # (B, 1, n)
    parts = [s[0].masked_fill(~weighted[..., j : j + 1], v) for j, s in enumerate(support)]
    ids = torch.cat(parts, dim=-1).sort(dim=-1).values  # (B, T, K), v = not in the union
    first = ids < v
    first[..., 1:] &= ids[..., 1:] != ids[..., :-1]
    return torch.where(first, ids, ids[..., :1]), first


def _merged_tail(
    support: list[tuple[Tensor, Tensor, Tensor]], log_w: Tensor, first: Tensor, v: int
) -> Tensor:
    """log of the mixture's mass outside the union: (B, T, 1), ``-inf`` when the union is all V.

    ``sum_j w_j r_j (V - |U|) / (V - k_j)`` with ``log r_j = log u_j + log(V - k_j)``, that is
    ``sum_j w_j u_j (V - |U|)``.
    """
    log_u = torch.cat([s[2] for s in support], dim=-1)  # (B, T, n)
    outside = (v - first.sum(-1, keepdim=True)).to(log_u.dtype)  # (B, T, 1)
    log_outside = torch.log(outside)  # -inf where the union covers the vocabulary
    return torch.logsumexp(log_u + log_w, dim=-1, keepdim=True) + log_outside
