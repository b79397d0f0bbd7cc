"""Cache format version 1: array names, dtypes, chunking, codecs and the manifest.

A cache is one Zarr v3 group. Row i of every array is dataset row i; position j of ``topk/*`` is
the teacher's prediction of token j+1::

    input_ids        (N, T)          int32
    loss_mask        (N, T)          bool      position j's prediction of token j+1 is trained
    topk/logprobs    (N, T, k)       float16   z_v - lse_1 of the top-k, sorted descending
    topk/indices     (N, T, k)       uint16 | int32 (smallest that holds V)
    topk/logsumexp   (N, T, n_temps) float32   log sum_v exp(z_v / t), full vocabulary
    hidden/<layer>   (N, T, d)       float16 | float32 | uint16 bits with attr dtype: bfloat16
    sample/indices   (N, T, m)       index dtype: unique ids drawn from the teacher at t=1
    sample/counts    (N, T, m)       uint8 | uint16: how often each was drawn, 0 = padding
    sample/logprobs  (N, T, m)       float16   z_v - lse_1 of each drawn id (0 on padding)
    sample/logprob_sums (N, T, 2)    float32   instead of sample/logprobs when
                                               ``outputs.sample_logprobs`` is false (see below)

With ``outputs.hidden_codec`` other than ``exact`` (format v2), ``hidden/<layer>`` holds codes and
``hidden_scale/<layer>`` or ``hidden_pca/<layer>/{basis,mean}`` what decodes them
(:mod:`kdcache.core.hidden_codec`).

Every array is sharded along rows: one Zarr shard = ``rows_per_shard`` rows = one lease, so a
worker always writes whole shard objects. Inside a shard, chunks are small enough that reading one
row touches little else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kdcache.core.errors import CacheFormatError
from kdcache.core.hidden_codec import (
    parse_hidden_codec,
    pca_basis_array,
    pca_mean_array,
    scale_array,
)
from kdcache.core.layout import shard_key
from kdcache.core.topk_codec import is_xz, logprobs_storage
from kdcache.core.topk_companded import COMPANDED_LEVELS

__all__ = [
    "ARRAY_INPUT_IDS",
    "ARRAY_LOGPROBS",
    "ARRAY_INDICES",
    "ARRAY_LOGSUMEXP",
    "ARRAY_LOSS_MASK",
    "ARRAY_SAMPLE_COUNTS",
    "ARRAY_SAMPLE_INDICES",
    "ARRAY_SAMPLE_LOGPROBS",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "ArraySpec",
    "Manifest",
    "array_specs",
    "hidden_array",
    "index_dtype",
    "plan_chunks",
    "sample_count_dtype",
    "shard_key",
    "shard_rows",
]

FORMAT_VERSION = 1
FORMAT_VERSIONS = (1, 2, 3)
"""Versions this code reads and writes: 2 = 1 plus coded ``topk/logprobs`` (core.topk_codec)
and coded hidden states (core.hidden_codec); 3 = 2 plus the ``-xz`` top-k codes (LZMA2 chains
and the ``topk_id_order`` code of ``topk/indices``), which readers of version 2 cannot decode."""
MANIFEST_KEY = "kdcache"
ARRAY_INPUT_IDS = "input_ids"
ARRAY_LOGPROBS = "topk/logprobs"
ARRAY_INDICES = "topk/indices"
ARRAY_LOGSUMEXP = "topk/logsumexp"
ARRAY_LOSS_MASK = "loss_mask"
"""(N, T) bool: position j's prediction of token j+1 is trained (issue 8)."""
ARRAY_SAMPLE_INDICES = "sample/indices"
"""(N, T, m): unique ids drawn from the teacher at t=1 (issue 9)."""
ARRAY_SAMPLE_COUNTS = "sample/counts"
"""(N, T, m): how often each of ``sample/indices`` was drawn; 0 = padding (issue 9)."""
ARRAY_SAMPLE_LOGPROBS = "sample/logprobs"
"""(N, T, m) float16: the teacher's exact log-probability at t=1 of each drawn id (issue 9)."""
ARRAY_SAMPLE_LOGPROB_SUMS = "sample/logprob_sums"
"""(N, T, 2) float32, the draws' teacher side of the t=1 forward KL without a log-prob per draw:
``sum_i (c_i / N) log q_1(x_i)`` over all draws [0] and over the draws outside the cached top-k
[1] (all draws without top-k), summed from the float16 log-probs sample/logprobs would hold, so
the t=1 estimates equal those of a cache with them. A third of the sampled bytes (issue 9)."""
CHUNK_TARGET_BYTES = 1 << 20
ROW_CHUNK_BYTES = 64 << 10
XZ_ROW_CHUNK_BYTES = 256 << 10
"""Rows per chunk of an ``xz-*`` array: LZMA2 adapts over a chunk, so it gains from longer ones."""
HIDDEN_STORAGE = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}


def hidden_array(layer: int) -> str:
    """Array name of a hidden layer: ``hidden/<layer>``."""
    return f"hidden/{layer}"


def index_dtype(vocab_size: int) -> str:
    """The smallest of uint16 / int32 that holds every id of a vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "int32"


def sample_count_dtype(draws: int) -> str:
    """The smallest of uint8 / uint16 that holds a count of up to ``draws``."""
    return "uint8" if draws <= 255 else "uint16"


def _largest_divisor_at_most(n: int, cap: int) -> int:
    cap = max(1, min(n, cap))
    return next(d for d in range(cap, 0, -1) if n % d == 0)


def plan_chunks(
    row_shape: tuple[int, ...],
    itemsize: int,
    rows_per_shard: int,
    target: int = CHUNK_TARGET_BYTES,
    row_target: int = ROW_CHUNK_BYTES,
) -> tuple[int, ...]:
    """Inner chunk shape for an array of rows shaped ``row_shape``.

    Rows per chunk divide ``rows_per_shard`` and positions per chunk divide T (Zarr needs the
    shard shape to be a multiple of the chunk shape). A row of ``target`` bytes or more is split
    along T into chunks near ``target``. Smaller rows share a chunk only up to ``row_target``
    bytes: a reader (a DDP rank, a DataLoader worker) that wants one row of a shuffled window
    decodes the whole chunk, so chunks of many large rows make every reader decode the others'
    rows too; tiny rows (token ids, masks) are grouped so each chunk is worth a decoder call.
    """
    t, rest = row_shape[0], row_shape[1:]
    per_pos = itemsize * int(np.prod(rest, dtype=np.int64)) if rest else itemsize
    row_bytes = per_pos * t
    if row_bytes >= target:
        return (1, _largest_divisor_at_most(t, max(1, target // per_pos)), *rest)
    return (_largest_divisor_at_most(rows_per_shard, row_target // row_bytes), t, *rest)


def shard_rows(shard: int, rows_per_shard: int, num_rows: int) -> tuple[int, int]:
    """Row range [start, end) of a shard."""
    start = shard * rows_per_shard
    if shard < 0 or start >= num_rows:
        raise IndexError(f"shard {shard} out of range for {num_rows} rows")
    return start, min(start + rows_per_shard, num_rows)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a cache: its name, per-row shape, stored dtype and logical dtype."""

    name: str
    row_shape: tuple[int, ...]
    dtype: str
    logical_dtype: str
    coding: str = ""
    """The transform :mod:`kdcache.core.topk_codec` applied (array attribute ``coding``)."""
    shuffle: str = "shuffle"
    """Blosc's shuffle for this array: ``shuffle`` (bytes) or ``bitshuffle``."""
    compression: str = "blosc"
    """The writer's codec chain: ``blosc`` (every array by default), ``blosc-ranks`` (chunks
    transposed rank-major, Blosc bit shuffle: companded top-k codes), or one of the ``xz-*``
    chains of a ``lossless-xz`` cache's top-k arrays (core.writer.XZ_CHAINS)."""


@dataclass(frozen=True)
class Manifest:
    """What a cache holds; stored in the group's attributes under ``kdcache``."""

    cache_id: str
    num_rows: int
    seq_len: int
    vocab_size: int
    topk: int
    temperatures: list[float]
    hidden_layers: list[int]
    hidden_size: int | None
    hidden_dtype: str
    rows_per_shard: int
    teacher_fingerprint: str
    dataset_fingerprint: str
    tokenizer_fingerprint: str | None = None
    layer_map: dict[str, int] = field(default_factory=dict)
    index_dtype: str = "uint16"
    name: str = ""
    teacher: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    codecs: dict[str, Any] = field(default_factory=dict)
    sample_draws: int = 0
    sample_seed: int = 0
    sample_logprobs: bool = True
    """``sample/logprobs`` per draw (any cached temperature), else ``sample/logprob_sums`` (t=1)."""
    loss_mask: bool = False
    """The cache has a ``loss_mask`` array (caches written before issue 8 do not)."""
    topk_codec: str = "fp16"
    topk_id_order: list[int] = field(default_factory=list)
    """An ``-xz`` code's ids listed first in ``topk/indices``' code (topk_codec.IdOrder)."""
    hidden_codec: str = "exact"
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    @property
    def num_tokens(self) -> int:
        return self.num_rows * self.seq_len

    @property
    def sample_width(self) -> int:
        """m, the last axis of ``sample/*``: no position has more distinct draws than this."""
        return min(self.sample_draws, self.vocab_size)

    @property
    def hidden_width(self) -> int | None:
        """The last axis of ``hidden/<layer>`` rows: R for ``pca:R``, else the hidden size d
        (what a student's projection maps to: ``HiddenProjector(map, d_s, m.hidden_width)``)."""
        if self.hidden_size is None:
            return None
        return parse_hidden_codec(self.hidden_codec).width(self.hidden_size)

    def basis_arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the pca basis and mean arrays (float32, not per row); empty unless
        ``hidden_codec`` is ``pca:R``."""
        codec = parse_hidden_codec(self.hidden_codec)
        if codec.kind != "pca" or self.hidden_size is None:
            return []
        d = self.hidden_size
        return [
            item
            for layer in self.hidden_layers
            for item in ((pca_basis_array(layer), (codec.rank, d)), (pca_mean_array(layer), (d,)))
        ]

    def shard_rows(self, shard: int) -> tuple[int, int]:
        return shard_rows(shard, self.rows_per_shard, self.num_rows)

    def shard_of_row(self, row: int) -> int:
        return row // self.rows_per_shard

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Parse a manifest; refuse versions this code does not know."""
        version = data.get("format_version")
        if version not in FORMAT_VERSIONS:
            raise CacheFormatError(
                f"cache format version {version!r} is not supported (this kdcache reads "
                f"versions {', '.join(map(str, FORMAT_VERSIONS))})"
            )
        known = set(cls.__dataclass_fields__)
        try:
            m = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as err:
            raise CacheFormatError(f"malformed kdcache manifest: {err}") from None
        return m

    def arrays(self) -> list[ArraySpec]:
        return array_specs(self)


def array_specs(m: Manifest) -> list[ArraySpec]:
    """Every array a cache with this manifest holds."""
    t = m.seq_len
    out = [ArraySpec(ARRAY_INPUT_IDS, (t,), "int32", "int32")]
    if m.loss_mask:
        out.append(ArraySpec(ARRAY_LOSS_MASK, (t,), "bool", "bool"))
    if m.topk > 0:
        k, n = m.topk, len(m.temperatures)
        coded = m.topk_codec != "fp16"
        width, stored = logprobs_storage(m.topk_codec, k)
        coding = m.topk_codec if coded else ""
        shuffle = "bitshuffle" if coded else "shuffle"
        ids_coding, ids_chain, lse_chain = "", "blosc", "blosc"
        # companded codes: each chunk rank-major, then bit planes, so every rank's small
        # codes (and every position's ends) sit together: 10-35% fewer bytes
        lp_chain = "blosc-ranks" if m.topk_codec in COMPANDED_LEVELS else "blosc"
        if is_xz(m.topk_codec):
            ids_coding = "id_order" if m.topk_id_order else ""
            lp_chain, ids_chain, lse_chain = "xz-ranks", "xz-ids", "xz-planes"
        idx = m.index_dtype
        out += [
            ArraySpec(ARRAY_LOGPROBS, (t, width), stored, "float16", coding, compression=lp_chain),
            ArraySpec(
                ARRAY_INDICES, (t, k), idx, idx, ids_coding, shuffle=shuffle, compression=ids_chain
            ),
            ArraySpec(ARRAY_LOGSUMEXP, (t, n), "float32", "float32", compression=lse_chain),
        ]
    if m.hidden_layers:
        if m.hidden_size is None:
            raise CacheFormatError("manifest has hidden layers but no hidden_size")
        codec = parse_hidden_codec(m.hidden_codec)
        stored = codec.code_dtype(HIDDEN_STORAGE[m.hidden_dtype])
        logical = m.hidden_dtype if codec.kind in ("exact", "pca") else stored
        coding = "" if codec.kind == "exact" else codec.name
        for layer in m.hidden_layers:
            row = (t, codec.width(m.hidden_size))
            # int8 codes near zero share their high (sign) bits: bit shuffle stores ~10% fewer
            # bytes than byte shuffle (measured by bench/hidden_codecs.py); fp8 does better without
            shuffle = "bitshuffle" if codec.code_dtype("") == "int8" else "shuffle"
            out.append(ArraySpec(hidden_array(layer), row, stored, logical, coding, shuffle))
            if codec.scaled:
                out.append(ArraySpec(scale_array(layer), (t,), "float32", "float32"))
    if m.sample_draws:
        w, counts = m.sample_width, sample_count_dtype(m.sample_draws)
        # an -xz code compresses the draws like the top-k: ids in the id order, LZMA2
        xz = is_xz(m.topk_codec)
        ids_chain, chain = ("xz-ids", "xz-planes") if xz else ("blosc", "blosc")
        ids_coding = "id_order" if xz and m.topk_id_order else ""
        idx = m.index_dtype
        out += [
            ArraySpec(ARRAY_SAMPLE_INDICES, (t, w), idx, idx, ids_coding, compression=ids_chain),
            ArraySpec(ARRAY_SAMPLE_COUNTS, (t, w), counts, counts, compression=chain),
        ]
        if m.sample_logprobs:
            out.append(
                ArraySpec(ARRAY_SAMPLE_LOGPROBS, (t, w), "float16", "float16", compression=chain)
            )
        else:
            out.append(
                ArraySpec(
                    ARRAY_SAMPLE_LOGPROB_SUMS, (t, 2), "float32", "float32", compression=chain
                )
            )
    return out
