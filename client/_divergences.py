"""Divergences between a teacher and a student given as log-probabilities over the same classes.

Everything here works elementwise on log-probabilities so that classes with exactly zero mass
(``-inf``) are handled without ``0 * log 0`` NaNs, in the values and in the gradients. Summing the
per-class terms over all classes gives the divergence; summing over a subset gives the partial sum
that ``tail="ignore"`` uses.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DIVERGENCES", "divergence_terms", "log1mexp", "masked_mean", "require_choice"]

DIVERGENCES: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

_LOG2 = math.log(2.0)


def require_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    """Raise ValueError naming the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``a * (log a - log b)`` per class, exactly 0 where ``a`` is 0.

    log_a, log_b: (..., C). Zero-mass entries of ``a`` are replaced before the arithmetic rather
    than after, so neither the value nor the gradient sees ``-inf - -inf``.
    """
    zero = torch.isneginf(log_a)
    la = log_a.masked_fill(zero, 0.0)
    lb = log_b.masked_fill(zero, 0.0)
    return torch.where(zero, torch.zeros_like(la), la.exp() * (la - lb))


def _log_mixture(log_q: Tensor, log_p: Tensor) -> Tensor:
    """log((p + q) / 2) per class, ``-inf`` where both are 0 with finite gradients there."""
    both = torch.isneginf(log_q) & torch.isneginf(log_p)
    mixed = torch.logaddexp(log_q.masked_fill(both, 0.0), log_p.masked_fill(both, 0.0)) - _LOG2
    return mixed.masked_fill(both, float("-inf"))


def divergence_terms(log_q: Tensor, log_p: Tensor, divergence: str) -> Tensor:
    """Per-class terms of a divergence between teacher ``q`` and student ``p``.

    log_q: (..., C) teacher log-probabilities (no gradient expected).
    log_p: (..., C) student log-probabilities, same shape.
    Returns (..., C); ``.sum(-1)`` is ``KL(q || p)`` for ``"forward_kl"``, ``KL(p || q)`` for
    ``"reverse_kl"`` and ``0.5 KL(q || m) + 0.5 KL(p || m)``, ``m = (p + q) / 2``, for ``"jsd"``.

    Reverse KL reads a teacher class of exactly zero mass (a tail bucket whose mass rounds to
    nothing) as the smallest normal float of the dtype, so that the loss and its gradient stay
    finite; every class with representable mass is used as is.
    """
    require_choice(divergence, DIVERGENCES, "divergence")
    if divergence == "forward_kl":
        return _kl_terms(log_q, log_p)
    if divergence == "reverse_kl":
        floor = math.log(torch.finfo(log_q.dtype).tiny)
        return _kl_terms(log_p, log_q.masked_fill(torch.isneginf(log_q), floor))
    log_m = _log_mixture(log_q, log_p)
    return 0.5 * _kl_terms(log_q, log_m) + 0.5 * _kl_terms(log_p, log_m)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf; ``-inf`` at x = 0.

    Values above 0 (a mass that rounds above 1) are clamped to 0 first.
    """
    x = x.clamp(max=0.0)
    near_zero = x > -_LOG2
    return torch.where(near_zero, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of per-position values over all positions, or over those where ``mask`` is True.

    values: (B, T) float; mask: (B, T) bool (or 0/1 integers), or None. A mask with no True entry
    gives 0 (still attached to the graph) rather than the NaN of an empty mean.
    """
    if mask is None:
        return values.mean()
    if tuple(mask.shape) != tuple(values.shape):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected {tuple(values.shape)} (B, T)"
        )
    keep = mask.to(device=values.device, dtype=torch.bool)
    total = torch.where(keep, values, torch.zeros_like(values)).sum()
    return total / keep.sum().clamp(min=1).to(values.dtype)
