"""How ``hidden/<layer>`` is stored: as computed (``exact``), 8-bit per token, or ``pca:R``.

Hidden states dominate a cache's bytes at real widths (d = 4096 in bfloat16 is 8 KiB per token
per layer). ``outputs.hidden_codec`` picks the value coding of every cached layer::

    exact   hidden/<l>            (N, T, d)  hidden_dtype (bfloat16 as uint16 bits): format v1
    int8    hidden/<l>            (N, T, d)  int8     round(h / s), s = absmax(h_token) / 127
            hidden_scale/<l>      (N, T)     float32  s, one per token
    int6 | int5 | int4                            as int8 with s = absmax / 31 | 15 | 7: fewer
                                                  bits per value (int8 arrays, bit-shuffled,
                                                  so the unused high bit planes cost ~nothing)
    fp8     hidden/<l>            (N, T, d)  uint8    float8 e4m3 bits of h / s (round to nearest
                                                      even), s = absmax(h_token) / 448
            hidden_scale/<l>      (N, T)     float32  s, one per token
    pca:R   hidden/<l>            (N, T, R)  hidden_dtype: codes c = (h - mean) @ basis.T
            hidden_pca/<l>/basis  (R, d)     float32  orthonormal rows, by falling variance
            hidden_pca/<l>/mean   (d,)       float32

Every array is ordinary Zarr data (the fp8 bits are plain uint8, so any zarr-python opens them);
the array attribute ``coding`` names the codec, and :func:`decode_scaled` / :func:`decode_pca`
undo it. 8-bit codes are computed per token, so they are the same whatever the batching.

``pca:R``'s basis is fitted once per cache on the teacher's hidden states of the dataset's first
rows (:func:`fit_pca`, float64), before any shard is written, and stored in the cache: every
worker, and every re-leased or resumed shard, codes with that one stored basis.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "HIDDEN_CODECS",
    "PCA_FIT_TOKENS",
    "HiddenCodec",
    "decode_fp8",
    "decode_pca",
    "decode_scaled",
    "encode_fp8",
    "encode_pca",
    "encode_scaled",
    "fit_pca",
    "from_storage",
    "parse_hidden_codec",
    "pca_basis_array",
    "pca_fit_rows",
    "pca_mean_array",
    "scale_array",
    "to_storage",
]

HIDDEN_CODECS: tuple[str, ...] = ("exact", "int8", "int6", "int5", "int4", "fp8", "pca:R")
"""The codec names; ``pca:R`` takes the rank R, a positive integer at most the hidden width."""
PCA_FIT_TOKENS = 8192
"""The basis is fitted on at least this many tokens (and at least 16 R) of the first rows."""
_PCA = re.compile(r"^pca:([0-9]{1,6})$")
_INT_MAX = {"int8": 127.0, "int6": 31.0, "int5": 15.0, "int4": 7.0}
_FP8_MAX = 448.0  # the largest finite float8 e4m3 (fn) value


@dataclass(frozen=True)
class HiddenCodec:
    """A parsed ``outputs.hidden_codec``: ``kind`` is exact | int8 | fp8 | pca, ``rank`` R."""

    kind: str
    rank: int = 0

    @property
    def name(self) -> str:
        return f"pca:{self.rank}" if self.kind == "pca" else self.kind

    @property
    def scaled(self) -> bool:
        """Codes with a per-token scale array (int8 / int6 / int5 / int4, fp8)."""
        return self.kind in _INT_MAX or self.kind == "fp8"

    def width(self, hidden_size: int) -> int:
        """The last axis of ``hidden/<layer>``: R for pca, else d."""
        return self.rank if self.kind == "pca" else hidden_size

    def code_dtype(self, hidden_storage: str) -> str:
        """The stored dtype of ``hidden/<layer>`` (``hidden_storage``: exact's stored dtype)."""
        if self.kind in _INT_MAX:
            return "int8"
        return "uint8" if self.kind == "fp8" else hidden_storage


def parse_hidden_codec(value: str) -> HiddenCodec:
    """``"exact"`` | ``"int8"`` | ``"int6"`` | ``"int5"`` | ``"int4"`` | ``"fp8"`` | ``"pca:R"``
    -> :class:`HiddenCodec`; ValueError naming the accepted forms otherwise."""
    if value in ("exact", "fp8", *_INT_MAX):
        return HiddenCodec(value)
    m = _PCA.match(value) if isinstance(value, str) else None
    if m is None or int(m.group(1)) < 1:
        raise ValueError(
            "must be one of exact, int8, int6, int5, int4, fp8 or pca:R with R a positive "
            f"integer; got {value!r}"
        )
    return HiddenCodec("pca", int(m.group(1)))


def scale_array(layer: int) -> str:
    """Array name of a layer's per-token scales (int8, fp8)."""
    return f"hidden_scale/{layer}"


def pca_basis_array(layer: int) -> str:
    """Array name of a layer's pca basis (R, d) float32."""
    return f"hidden_pca/{layer}/basis"


def pca_mean_array(layer: int) -> str:
    """Array name of a layer's pca mean (d,) float32."""
    return f"hidden_pca/{layer}/mean"


# ---------------------------------------------------------------- 8-bit codes


@lru_cache(maxsize=1)
def _fp8_values() -> np.ndarray:
    """(256,) float32: the value of every float8 e4m3fn bit pattern (NaN at 0x7F and 0xFF)."""
    bits = np.arange(256, dtype=np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp, man = (bits >> 3) & 0xF, bits & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = man / 8.0 * 2.0**-6
    vals = sign * np.where(exp == 0, subnormal, normal)
    vals[(bits & 0x7F) == 0x7F] = np.nan
    return vals.astype(np.float32)


def encode_fp8(x: np.ndarray) -> np.ndarray:
    """float values with |x| <= 448 -> float8 e4m3fn bit patterns (uint8), round to nearest even."""
    mags = _fp8_values()[:127]  # codes 0..126: every finite non-negative value, increasing
    a = np.minimum(np.abs(np.asarray(x, dtype=np.float32)), _FP8_MAX)
    hi = np.searchsorted(mags, a, side="left").clip(1, 126)  # mags[hi - 1] < a <= mags[hi]
    lo = hi - 1
    d_lo, d_hi = a - mags[lo], mags[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(a == 0, 0, np.where(pick_hi, hi, lo)).astype(np.uint8)
    return code | np.where(np.signbit(x) & (code != 0), 0x80, 0).astype(np.uint8)


def decode_fp8(bits: np.ndarray) -> np.ndarray:
    """float8 e4m3fn bit patterns (uint8) -> float32 values."""
    return _fp8_values()[np.asarray(bits, dtype=np.uint8)]


def encode_scaled(h: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(..., d) float hidden states -> (codes (..., d) int8 | uint8, scales (...) float32).

    The scale of a token maps its largest magnitude to the code's largest value (127 for int8,
    31 / 15 / 7 for int6 / int5 / int4, 448 for fp8); an all-zero token gets scale 0 and zero
    codes.
    """
    x = np.asarray(h, dtype=np.float32)
    absmax = np.abs(x).max(axis=-1)
    top = _INT_MAX.get(kind, _FP8_MAX)
    scale = (absmax / top).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)[..., None]
    y = x / safe
    if kind in _INT_MAX:
        return np.clip(np.rint(y), -top, top).astype(np.int8), scale
    if kind == "fp8":
        return encode_fp8(y), scale
    raise ValueError(f"encode_scaled codes {', '.join(_INT_MAX)} or fp8, not {kind!r}")


def decode_scaled(codes: np.ndarray, scale: np.ndarray, kind: str) -> np.ndarray:
    """(codes (..., d), scales (...)) -> (..., d) float32 hidden states."""
    vals = decode_fp8(codes) if kind == "fp8" else np.asarray(codes, dtype=np.float32)
    return vals * np.asarray(scale, dtype=np.float32)[..., None]


# ---------------------------------------------------------------- pca


def pca_fit_rows(rank: int, num_rows: int, seq_len: int) -> int:
    """How many of the first rows the basis of rank ``rank`` is fitted on: enough for
    max(:data:`PCA_FIT_TOKENS`, 16 R) tokens, at most every row."""
    tokens = max(PCA_FIT_TOKENS, 16 * rank)
    return max(1, min(num_rows, -(-tokens // seq_len)))


def fit_pca(h: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``rank`` principal basis of hidden states ``h`` (..., d), fitted in float64.

    Returns (basis (R, d) float32, orthonormal rows by falling variance, each row's largest
    entry positive so the result is deterministic; mean (d,) float32). Needs R <= d and at
    least R tokens.
    """
    x = np.asarray(h, dtype=np.float64).reshape(-1, np.shape(h)[-1])
    n, d = x.shape
    if not 1 <= rank <= d:
        raise ValueError(f"pca rank must be in [1, {d}] (the hidden width), got {rank}")
    if n < rank:
        raise ValueError(f"pca:{rank} needs at least {rank} tokens to fit on, got {n}")
    mean = x.mean(axis=0)
    xc = x - mean
    _, vecs = np.linalg.eigh(xc.T @ xc)  # ascending eigenvalues
    basis = vecs[:, ::-1][:, :rank].T.copy()  # (R, d), by falling variance
    flip = np.sign(basis[np.arange(rank), np.abs(basis).argmax(axis=1)])
    basis *= np.where(flip == 0, 1.0, flip)[:, None]
    return basis.astype(np.float32), mean.astype(np.float32)


def encode_pca(h: np.ndarray, basis: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(..., d) hidden states -> (..., R) float32 codes ``(h - mean) @ basis.T``."""
    x = np.asarray(h, dtype=np.float32) - np.asarray(mean, dtype=np.float32)
    out: np.ndarray = x @ np.asarray(basis, dtype=np.float32).T
    return out


def decode_pca(codes: np.ndarray, basis: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(..., R) codes -> (..., d) float32: ``mean + codes @ basis`` (the projection of the
    hidden state onto the stored basis)."""
    c = np.asarray(codes, dtype=np.float32)
    out: np.ndarray = c @ np.asarray(basis, dtype=np.float32) + np.asarray(mean, np.float32)
    return out


# ---------------------------------------------------------------- float <-> stored


def to_storage(x: np.ndarray, hidden_dtype: str) -> np.ndarray:
    """float32 values -> the stored form of ``hidden_dtype`` (bfloat16: uint16 bits, rounded to
    nearest even like torch's cast)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if hidden_dtype == "bfloat16":
        bits = x.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        out: np.ndarray = (rounded >> np.uint32(16)).astype(np.uint16)
        return out
    return x.astype(hidden_dtype)


def from_storage(raw: np.ndarray, hidden_dtype: str) -> np.ndarray:
    """Stored hidden values (bfloat16 as uint16 bits) -> float32, exactly."""
    if hidden_dtype == "bfloat16":
        out: np.ndarray = (np.asarray(raw).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return out
    return np.asarray(raw, dtype=np.float32)
