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

Indices keep their exact ids (the smallest integer type); the writer stores them with Blosc's
bit shuffle instead of byte shuffle, which removes the unused high bits of every id.

Every code has an ``-xz`` form (``lossless-xz``, ``q4c-xz``, ...; format v3): the same stored
values, and the three top-k arrays compressed harder, for caches that are written once and kept
(archives, object stores, slow links), at a slower decode (LZMA2 runs at tens of MB/s,
Blosc/zstd at hundreds)::

    topk/logprobs    the code's values; chunks transposed rank-major (zarr ``transpose``), byte
                     planes (numcodecs ``shuffle``), LZMA2 (numcodecs ``lzma``, raw, lc=3)
    topk/indices     each id replaced by its rank in the manifest's ``topk_id_order`` (the
                     dataset's most frequent input tokens first; array attribute ``coding:
                     "id_order"``), LZMA2 with 2- or 4-byte alignment (lp, pb)
    topk/logsumexp   byte planes, LZMA2

LZMA2 is an adaptive range coder, so it reaches the skewed entropy of frequent ids and of the
rank-ordered deltas that zstd's Huffman stage over 64 KiB chunks leaves behind. Every codec
ships with zarr-python and numcodecs: plain zarr-python opens each array and returns the codes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from kdcache.core.topk_companded import COMPANDED_LEVELS, decode_companded, encode_companded

# zarr-python warns on every array it opens whose chain holds a numcodecs codec (``lzma``,
# ``shuffle``: not in the Zarr v3 core spec). kdcache writes them on purpose (lossless-xz) and
# reads them with zarr-python itself; the warning would repeat for every array of every read.
warnings.filterwarnings(
    "ignore", message="Numcodecs codecs are not in the Zarr version 3 specification"
)

__all__ = [
    "TOPK_CODECS",
    "IdOrder",
    "decode_logprobs",
    "encode_logprobs",
    "is_xz",
    "logprobs_storage",
    "xz_codec",
]

XZ = "-xz"
"""Suffix of a code whose top-k arrays are LZMA2-compressed (format v3): ``lossless-xz``."""
_CODES: tuple[str, ...] = ("fp16", "lossless", "q8", "q4", *COMPANDED_LEVELS)
TOPK_CODECS: tuple[str, ...] = (*_CODES, *(c + XZ for c in _CODES))
ID_ORDER_LIMIT = 1 << 14
"""At most this many ids are listed in ``topk_id_order`` (the others follow in id order): the
list lives in the manifest (the group's zarr.json), so it stays under ~100 KB of JSON."""
ID_ORDER_TOKENS = 1 << 22
"""Input tokens counted for ``topk_id_order``: those of the dataset's first rows."""
_LEVELS = {"q8": 255, "q4": 15}


def _require(codec: str) -> str:
    """``codec``'s log-prob code (``codec`` without ``-xz``); refuses unknown codecs."""
    if codec not in TOPK_CODECS:
        raise ValueError(f"topk codec must be one of {', '.join(TOPK_CODECS)}; got {codec!r}")
    return codec.removesuffix(XZ)


def is_xz(codec: str) -> bool:
    """Whether ``codec``'s top-k arrays use the LZMA2 chains and the id order (format v3)."""
    return codec.endswith(XZ)


def logprobs_storage(codec: str, k: int) -> tuple[int, str]:
    """(last-axis length, stored dtype) of ``topk/logprobs`` under ``codec`` for top-``k``."""
    codec = _require(codec)
    if codec == "fp16":
        return k, "float16"
    if codec == "lossless":
        return k, "uint16"
    return k + 4, "uint8"


def encode_logprobs(lp: np.ndarray, codec: str) -> np.ndarray:
    """(..., k) float16 log-probs, sorted descending along k -> the stored array."""
    codec = _require(codec)
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
    codec = _require(codec)
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


class IdOrder:
    """A bijection of the vocabulary that lists ``order`` first: ``order[i]`` gets code ``i``, and
    every id not listed follows in increasing id order.

    ``topk_id_order`` lists the dataset's most frequent input tokens; a teacher's top-k is full
    of them, so their codes are small and repeat, which the entropy coder turns into bytes.
    """

    def __init__(self, order: list[int] | np.ndarray, vocab_size: int) -> None:
        listed = np.asarray(order, dtype=np.int64)
        if listed.ndim != 1 or (listed.size and (listed.min() < 0 or listed.max() >= vocab_size)):
            raise ValueError(f"topk_id_order must list ids in [0, {vocab_size})")
        seen = np.zeros(vocab_size, dtype=bool)
        seen[listed] = True
        if int(seen.sum()) != listed.size:
            raise ValueError("topk_id_order lists an id twice")
        self.ids = np.concatenate([listed, np.flatnonzero(~seen)])  # code -> id
        self.codes = np.empty(vocab_size, dtype=np.int64)  # id -> code
        self.codes[self.ids] = np.arange(vocab_size)

    @classmethod
    def of_tokens(cls, tokens: np.ndarray, vocab_size: int) -> list[int]:
        """``topk_id_order`` of some input tokens: ids by decreasing count (ties: smaller id
        first), those that occur, at most :data:`ID_ORDER_LIMIT`. Integers in, integers out:
        every worker that counts the same rows gets the same list."""
        flat = np.asarray(tokens).reshape(-1)[:ID_ORDER_TOKENS].astype(np.int64)
        flat = flat[(flat >= 0) & (flat < vocab_size)]
        counts = np.bincount(flat, minlength=vocab_size)
        order = np.argsort(-counts, kind="stable")
        return [int(i) for i in order[: min(int((counts > 0).sum()), ID_ORDER_LIMIT)]]

    def encode(self, ids: np.ndarray) -> np.ndarray:
        """Ids -> codes, in ``ids``' dtype."""
        return self.codes[ids].astype(ids.dtype, copy=False)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes -> ids (int64)."""
        return self.ids[np.asarray(codes, dtype=np.int64)]


def xz_codec(itemsize: int, *, literal_context: int = 0) -> dict[str, Any]:
    """numcodecs' ``lzma`` configuration for elements of ``itemsize`` bytes: raw LZMA2 (no .xz
    container; the chunk's CRC-32C is zarr's), preset 6, position bits matched to the element
    size, ``literal_context`` bits of the previous byte as literal context."""
    import lzma

    align = {1: 0, 2: 1, 4: 2}.get(itemsize, 0)
    lc = literal_context if align == 0 else min(literal_context, 4 - align)
    return {
        "format": lzma.FORMAT_RAW,
        "filters": [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": lc, "lp": align, "pb": align}],
    }
