"""How ``topk/logprobs`` is stored: fp16 as is (format v1), or coded (format v2).

Every coding keeps one self-contained array per field, so a reader decodes a block of rows from
that array alone and plain zarr-python opens it (the integers are ordinary Zarr data; the array's
attribute ``coding`` names the transform and :func:`decode_logprobs` undoes it)::

    fp16      (N, T, k)      float16   as computed (format v1)
    lossless  (N, T, k)      uint16    delta of the fp16 bit patterns along k (mod 2**16); the
                                       log-probs are sorted descending, so bits rise and deltas
                                       are small: bit-exact, about half the bytes after zstd
    q8 | q4   (N, T, 4 + k)  uint8     bytes 0..3: the first and last log-prob (two float16);
                                       then k codes of ``ceil(levels * (lp0 - lp) / (lp0 -
                                       lp_last))`` in 0..255 / 0..15, delta-coded along k
                                       (lossy: each decoded value is at most the true one and
                                       at most (lp0 - lp_last) / levels below it, so the
                                       decoded top-k never holds more mass than the teacher's
                                       and the tail bucket 1 - sum stays positive)
    q8c | q6c (N, T, 4 + k)  uint8     q8's layout, codes companded (steps uniform in p**(1/3))
    q4c | q3c                          and rounded with mass feedback: several times less KL
                                       at the same bytes (core.topk_companded)

Indices are never coded (exact ids, the smallest integer type); the writer stores them with
Blosc's bit shuffle instead of byte shuffle, which removes the unused high bits of every id.
"""

from __future__ import annotations

import numpy as np

from kdcache.core.topk_companded import COMPANDED_LEVELS, decode_companded, encode_companded

__all__ = [
    "TOPK_CODECS",
    "decode_logprobs",
    "encode_logprobs",
    "logprobs_storage",
]

TOPK_CODECS: tuple[str, ...] = ("fp16", "lossless", "q8", "q4", *COMPANDED_LEVELS)
_LEVELS = {"q8": 255, "q4": 15}


def _require(codec: str) -> None:
    if codec not in TOPK_CODECS:
        raise ValueError(f"topk codec must be one of {', '.join(TOPK_CODECS)}; got {codec!r}")


def logprobs_storage(codec: str, k: int) -> tuple[int, str]:
    """(last-axis length, stored dtype) of ``topk/logprobs`` under ``codec`` for top-``k``."""
    _require(codec)
    if codec == "fp16":
        return k, "float16"
    if codec == "lossless":
        return k, "uint16"
    return k + 4, "uint8"


def encode_logprobs(lp: np.ndarray, codec: str) -> np.ndarray:
    """(..., k) float16 log-probs, sorted descending along k -> the stored array."""
    _require(codec)
    lp = np.ascontiguousarray(lp, dtype=np.float16)
    if codec == "fp16":
        return lp
    if codec == "lossless":
        bits = lp.view(np.uint16)
        out = bits.copy()
        out[..., 1:] = bits[..., 1:] - bits[..., :-1]  # wraps mod 2**16: always invertible
        return out
    if codec in COMPANDED_LEVELS:
        return encode_companded(lp, codec)
    levels = _LEVELS[codec]
    lp = np.nan_to_num(lp, neginf=float(np.finfo(np.float16).min))  # zero mass: the lowest float16
    ends = np.stack([lp[..., 0], lp[..., -1]], axis=-1)  # (..., 2) float16, kept exact
    top, low = (ends[..., :1].astype(np.float32), ends[..., 1:].astype(np.float32))
    span = top - low
    x = np.divide(
        top - lp.astype(np.float32), span, out=np.zeros(lp.shape, np.float32), where=span > 0
    )
    # rounded up (towards lower log-probs): rounding to nearest could push the decoded mass
    # over 1 where the tail is tiny, and an empty tail bucket is an unbounded KL
    codes = np.ceil(np.clip(x, 0.0, 1.0) * levels - 1e-4).astype(np.uint8)
    deltas = codes.copy()
    deltas[..., 1:] = codes[..., 1:] - codes[..., :-1]
    return np.concatenate([ends.view(np.uint8), deltas], axis=-1)


def decode_logprobs(stored: np.ndarray, codec: str) -> np.ndarray:
    """The stored array -> (..., k) log-probs: float16 (fp16, lossless), float32 (the lossy)."""
    _require(codec)
    if codec == "fp16":
        return stored
    if codec == "lossless":
        return np.cumsum(stored, axis=-1, dtype=np.uint16).view(np.float16)
    if codec in COMPANDED_LEVELS:
        return decode_companded(stored, codec)
    levels = _LEVELS[codec]
    raw = np.ascontiguousarray(stored, dtype=np.uint8)
    ends = raw[..., :4].copy().view(np.float16).astype(np.float32)  # (..., 2)
    codes = np.cumsum(raw[..., 4:], axis=-1, dtype=np.uint8).astype(np.float32)
    top, low = ends[..., :1], ends[..., 1:]
    return top - codes / levels * (top - low)
