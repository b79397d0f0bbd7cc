"""Sampled targets: draws from the teacher's distribution at t=1, as unique ids with counts.

``N`` ids are drawn with replacement per position by inverse-CDF sampling. The uniforms come
from a counter-based generator keyed by ``(seed, dataset row)``, so a row gets the same draws
whatever batch, chunk or worker computes it: a re-leased shard is written with the same bytes.

Per position the draws become ``m = min(N, V)`` slots, ordered by count (descending) then id::

    indices   (B, t, m) int64    distinct drawn ids; 0 on padding
    counts    (B, t, m) int64    how often each was drawn; 0 = padding
    logprobs  (B, t, m) float32  z_v - lse_1 of each drawn id; 0 on padding

The log-probabilities (with the cached log-normalisers) give the importance weights that make
the client's estimators unbiased at any cached temperature.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["logprob_sums", "row_uniforms", "sample_chunk"]


def row_uniforms(seed: int, rows: Sequence[int], seq_len: int, draws: int) -> np.ndarray:
    """Uniforms in [0, 1) for ``rows`` (dataset row numbers): (len(rows), seq_len, draws) float64.

    Row r's values depend only on ``(seed, r)`` (Philox keyed by both).
    """
    out = np.empty((len(rows), seq_len, draws), dtype=np.float64)
    for i, row in enumerate(rows):
        gen = np.random.Generator(np.random.Philox(key=[int(seed), int(row)]))
        out[i] = gen.random((seq_len, draws))
    return out


def sample_chunk(
    z: torch.Tensor, lse1: torch.Tensor, uniforms: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw from softmax(z) per position and collapse the draws to unique ids with counts.

    z: (B, t, V) float32 logits at t=1; lse1: (B, t) their log-sum-exp; uniforms: (B, t, N)
    float64 in [0, 1). Returns ``(indices, counts, logprobs)``, each (B, t, width) (see the
    module docstring); ``width`` must be at least min(N, V).
    """
    b, t, v = z.shape
    n = uniforms.shape[-1]
    if width < min(n, v):
        raise ValueError(f"width {width} cannot hold up to {min(n, v)} distinct draws")
    cdf = torch.exp(z - lse1.unsqueeze(-1)).to(torch.float64).cumsum(-1)
    target = uniforms.to(cdf.device) * cdf[..., -1:]
    # right=True skips ids of zero mass: their cdf equals their predecessor's.
    draws = torch.searchsorted(cdf, target.contiguous(), right=True).clamp_(max=v - 1)
    ids, _ = draws.sort(dim=-1)
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]
    slot = first.cumsum(-1) - 1
    counts = torch.zeros_like(ids).scatter_add_(-1, slot, torch.ones_like(ids))
    uniq = torch.zeros_like(ids).scatter_(-1, slot, ids)
    # count descending, then id ascending; padding (count 0) last
    key = torch.where(counts > 0, -counts * (v + 1) + uniq, torch.full_like(uniq, 1 << 62))
    order = key.argsort(dim=-1)
    counts = counts.gather(-1, order)
    uniq = uniq.gather(-1, order)
    logprobs = (z.gather(-1, uniq) - lse1.unsqueeze(-1)).masked_fill(counts == 0, 0.0)
    if width > n:
        pad = (0, width - n)
        uniq, counts = torch.nn.functional.pad(uniq, pad), torch.nn.functional.pad(counts, pad)
        logprobs = torch.nn.functional.pad(logprobs, pad)
    return uniq[..., :width], counts[..., :width], logprobs[..., :width]


def logprob_sums(
    indices: np.ndarray,
    counts: np.ndarray,
    logprobs: np.ndarray,
    topk_indices: np.ndarray | None = None,
) -> np.ndarray:
    """``sample/logprob_sums`` (B, t, 2) float32 from a batch's draws (each (B, t, m)).

    [0] = sum_i (c_i / N) log q_1(x_i) over every draw, [1] = the same over the draws outside
    ``topk_indices`` (B, t, k) (every draw when None): the teacher's side of the t=1 forward-KL
    estimates (plain and hybrid), so a cache can keep these two numbers per position instead of
    a log-probability per draw. ``logprobs`` are the float16 values ``sample/logprobs`` holds.
    """
    c = counts.astype(np.float64)
    w = c / np.maximum(c.sum(-1, keepdims=True), 1)
    lp = logprobs.astype(np.float32).astype(np.float64)
    out = np.empty((*indices.shape[:-1], 2), np.float64)
    out[..., 0] = (w * lp).sum(-1)
    if topk_indices is None:
        out[..., 1] = out[..., 0]
    else:
        for r in range(0, len(indices), 8):  # bounded (8, t, m, k) comparisons
            inside = (indices[r : r + 8, ..., None] == topk_indices[r : r + 8, ..., None, :]).any(
                -1
            )
            out[r : r + 8, ..., 1] = (np.where(inside, 0.0, w[r : r + 8]) * lp[r : r + 8]).sum(-1)
    return out.astype(np.float32)
