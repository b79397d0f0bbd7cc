"""Companded lossy codes of ``topk/logprobs``: ``q8c``, ``q6c``, ``q4c``, ``q3c``.

The layout is q8's (see :mod:`kdcache.core.topk_codec`): per position ``(4 + k)`` uint8, bytes
0..3 the first and last log-prob as two float16, then ``k`` codes in ``0..levels`` delta-coded
along k. What differs is what a code means and how it is chosen:

- **companded**: codes are uniform steps in ``y = p ** (1/3)`` (``exp(lp / 3)``) between the two
  ends, not in ``lp``. The error that matters is the KL over the top-k plus the tail, about
  ``sum p_i * err_i ** 2`` for log-prob errors ``err_i``; for such a weighted squared error the
  best density of reconstruction points goes as ``weight ** (1/3)``, so the steps are fine where
  the mass is and coarse over the many small log-probs at the bottom of the top-k (which also
  makes the codes compress better);
- **mass-feedback rounding**: each value is rounded down or up (never further than one step in
  ``y``). Walking along k, a code that decodes above the true value (more mass) is taken only while
  the running decoded mass stays at or below the input's, otherwise the code below it. Rounding
  errors then cancel instead of piling up on one side, and the decoded top-k mass never exceeds
  the input's, so the tail bucket ``1 - sum`` stays positive (rounding always down, as q8/q4 do,
  is what keeps their tail positive, at 4-9x the KL at the same bytes).

Measured on the demo teacher (V=2048, k=64; bench/storage.py): see docs/format.md.
"""

from __future__ import annotations

import numpy as np

__all__ = ["COMPANDED_LEVELS", "decode_companded", "encode_companded"]

COMPANDED_LEVELS: dict[str, int] = {"q8c": 255, "q6c": 63, "q4c": 15, "q3c": 7}
_LOWEST = float(np.finfo(np.float16).min)  # log-prob of zero mass, as q8/q4 decode it


def _decode(codes: np.ndarray, ends: np.ndarray, levels: int) -> np.ndarray:
    """codes (..., k) in 0..levels, ends (..., 2) float32 -> (..., k) float32 log-probs."""
    y0 = np.exp(ends[..., :1] / 3)
    y1 = np.exp(ends[..., 1:] / 3)
    y = y0 - codes.astype(np.float32) / levels * (y0 - y1)
    with np.errstate(divide="ignore"):
        lp = 3 * np.log(np.maximum(y, 0))
    lp = np.maximum(lp, _LOWEST)
    # code 0 is the first value and code ``levels`` the last, both stored exactly
    lp = np.where(codes == 0, ends[..., :1], lp)
    return np.where(codes == levels, ends[..., 1:], lp).astype(np.float32)


def encode_companded(lp: np.ndarray, codec: str) -> np.ndarray:
    """(..., k) float16 log-probs sorted descending -> (..., 4 + k) uint8 (module docstring)."""
    levels = COMPANDED_LEVELS[codec]
    lp = np.nan_to_num(np.asarray(lp, dtype=np.float16), neginf=_LOWEST)
    ends = np.stack([lp[..., 0], lp[..., -1]], axis=-1)  # (..., 2) float16, kept exact
    e32 = ends.astype(np.float32)
    lp32 = lp.astype(np.float32)
    y0, y1 = np.exp(e32[..., :1] / 3), np.exp(e32[..., 1:] / 3)
    span = y0 - y1
    x = np.divide(y0 - np.exp(lp32 / 3), span, out=np.zeros(lp.shape, np.float32), where=span > 0)
    x = np.clip(x * levels, 0, levels)
    lo = np.floor(x)  # the larger value
    hi = np.minimum(np.ceil(x), levels)
    p = np.exp(lp32.astype(np.float64))
    q_lo = np.exp(_decode(lo, e32, levels).astype(np.float64))
    q_hi = np.exp(_decode(hi, e32, levels).astype(np.float64))
    codes = np.empty(lp.shape, np.uint8)
    excess = np.zeros(lp.shape[:-1], np.float64)  # decoded minus input mass so far, kept <= 0
    prev = np.zeros(lp.shape[:-1], np.float32)
    for i in range(lp.shape[-1]):
        over = excess + q_lo[..., i] - p[..., i]
        take_lo = (over <= 0) & (lo[..., i] >= prev)  # codes never fall: decoded stays sorted
        codes[..., i] = np.where(take_lo, lo[..., i], hi[..., i])
        excess = np.where(take_lo, over, excess + q_hi[..., i] - p[..., i])
        prev = codes[..., i].astype(np.float32)
    deltas = codes.copy()
    deltas[..., 1:] = codes[..., 1:] - codes[..., :-1]  # sorted input: codes rise, deltas small
    return np.concatenate([ends.view(np.uint8), deltas], axis=-1)


def decode_companded(stored: np.ndarray, codec: str) -> np.ndarray:
    """(..., 4 + k) uint8 -> (..., k) float32 log-probs."""
    levels = COMPANDED_LEVELS[codec]
    raw = np.ascontiguousarray(stored, dtype=np.uint8)
    ends = raw[..., :4].copy().view(np.float16).astype(np.float32)  # (..., 2)
    codes = np.cumsum(raw[..., 4:], axis=-1, dtype=np.uint8)
    return _decode(codes, ends, levels)
