"""One teacher pass over a block of rows -> the cache's arrays for those rows.

Per row block ``ids`` (B, T), :func:`extract` returns, keyed by the cache's array names::

    topk/logprobs    (B, T, k)       float16   z_v - lse_1 of the top-k, sorted descending
    topk/indices     (B, T, k)       index_dtype (uint16 when V <= 65536, else int32)
    topk/logsumexp   (B, T, n_temps) float32   log sum_v exp(z_v / t) over the full vocabulary
    hidden/<layer>   (B, T, d)       float16 | float32 | uint16 (the bits of bfloat16)

The logits math runs in float32, ``t_chunk`` positions at a time, so a float32 copy of the
whole (B, T, V) logits never exists at once; the model's own logits stay in its dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from kdcache.core.errors import DatasetError, TeacherError
from kdcache.core.format import (
    ARRAY_INDICES,
    ARRAY_LOGPROBS,
    ARRAY_LOGSUMEXP,
    hidden_array,
)
from kdcache.worker.teachers import Teacher

__all__ = [
    "CHUNK_BYTES",
    "CPU_CHUNK_BYTES",
    "check_ids",
    "default_t_chunk",
    "extract",
    "extract_batches",
    "hidden_to_numpy",
]

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 20
"""Target size of one chunk of float32 logits (B, t_chunk, V) on an accelerator."""
CPU_CHUNK_BYTES = 4 << 20
"""On a CPU, small chunks keep top-k and log-sum-exp in cache: 2.5x faster than 256 MiB chunks
(bench/teacher_pass.py --breakdown: 1.24 s -> 0.50 s for a d=256, V=8192 teacher)."""

_HIDDEN = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def default_t_chunk(batch: int, vocab_size: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that (batch, t_chunk, V) float32 logits take about ``budget``."""
    return max(1, budget // (4 * max(1, batch) * max(1, vocab_size)))


def check_ids(ids: np.ndarray, vocab_size: int, row_offset: int = 0) -> None:
    """Raise :class:`DatasetError` naming the first dataset row holding an id outside [0, V).

    ``ids``: (B, T) integers; row r of it is dataset row ``row_offset + r``.
    """
    if ids.ndim != 2:
        raise DatasetError(f"token ids must be a 2-D (rows, T) array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise DatasetError(f"token ids must be integers, got dtype {ids.dtype}")
    if ids.size == 0:
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if not bad.any():
        return
    r, j = np.argwhere(bad)[0]
    row, tok = row_offset + int(r), int(ids[r, j])
    why = f"{tok} < 0" if tok < 0 else f"{tok} >= vocab size {vocab_size}"
    raise DatasetError(f"row {row}: token id {why} (position {int(j)})", row=row)


def hidden_to_numpy(h: torch.Tensor, hidden_dtype: str) -> np.ndarray:
    """(B, T, d) tensor -> numpy in the cache dtype; bfloat16 becomes its uint16 bit pattern."""
    if hidden_dtype not in _HIDDEN:
        raise ValueError(f"hidden_dtype must be one of {sorted(_HIDDEN)}, got {hidden_dtype!r}")
    x = h.detach().to(_HIDDEN[hidden_dtype])
    if hidden_dtype == "bfloat16":
        return x.view(torch.int16).cpu().numpy().view(np.uint16)
    return x.cpu().numpy()


def _check_args(
    teacher: Teacher, topk: int, temperatures: Sequence[float], index_dtype: np.dtype
) -> None:
    v = teacher.vocab_size
    if not 0 <= topk <= v:
        raise ValueError(f"topk must be in 0..{v} (the vocab size), got {topk}")
    if topk and not temperatures:
        raise ValueError("temperatures must not be empty when topk > 0")
    if any(not t > 0 for t in temperatures):
        raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
    if topk and np.iinfo(index_dtype).max < v - 1:
        raise ValueError(f"index dtype {index_dtype} cannot hold vocabulary ids up to {v - 1}")


def _topk_chunk(
    z: torch.Tensor, topk: int, temperatures: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z: (B, t, V) float32 -> logprobs (B, t, k), indices (B, t, k), lse (B, t, n_temps)."""
    lses = [torch.logsumexp(z if t == 1.0 else z / t, dim=-1) for t in temperatures]
    lse1 = lses[list(temperatures).index(1.0)] if 1.0 in temperatures else z.logsumexp(-1)
    vals, idx = torch.topk(z, topk, dim=-1, sorted=True)
    return vals - lse1.unsqueeze(-1), idx, torch.stack(lses, dim=-1)


def extract(
    teacher: Teacher,
    ids: np.ndarray,
    *,
    topk: int,
    temperatures: Sequence[float],
    layers: Sequence[int],
    hidden_dtype: str,
    index_dtype: npt.DTypeLike,
    t_chunk: int | None = None,
    row_offset: int = 0,
) -> dict[str, np.ndarray]:
    """Run the teacher once on ``ids`` (B, T) and return the cache arrays for those rows.

    ``row_offset`` is the dataset row of ``ids[0]`` (named in errors). ``topk == 0`` omits the
    three ``topk/*`` arrays. Raises :class:`DatasetError` for ids outside the vocabulary and
    :class:`TeacherError` when the teacher's logits are not (B, T, V) or not finite.
    """
    idt = np.dtype(index_dtype)
    _check_args(teacher, topk, temperatures, idt)
    check_ids(ids, teacher.vocab_size, row_offset)
    b, t = ids.shape
    x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    out = teacher.forward(x, list(layers))
    v = teacher.vocab_size
    if tuple(out.logits.shape) != (b, t, v):
        raise TeacherError(
            f"{teacher.description}: logits of shape {tuple(out.logits.shape)}, "
            f"expected {(b, t, v)}"
        )
    result: dict[str, np.ndarray] = {}
    if topk:
        n = len(temperatures)
        logprobs = np.empty((b, t, topk), dtype=np.float16)
        indices = np.empty((b, t, topk), dtype=idt)
        lse = np.empty((b, t, n), dtype=np.float32)
        budget = CPU_CHUNK_BYTES if out.logits.device.type == "cpu" else CHUNK_BYTES
        step = t_chunk if t_chunk is not None and t_chunk > 0 else default_t_chunk(b, v, budget)
        with torch.inference_mode():
            for t0 in range(0, t, step):
                t1 = min(t, t0 + step)
                lp, ix, ls = _topk_chunk(out.logits[:, t0:t1].float(), topk, temperatures)
                if not torch.isfinite(ls).all():
                    r = int(torch.nonzero(~torch.isfinite(ls))[0, 0])
                    raise TeacherError(
                        f"{teacher.description}: non-finite logits at row {row_offset + r}"
                    )
                logprobs[:, t0:t1] = lp.to(torch.float16).cpu().numpy()
                indices[:, t0:t1] = ix.cpu().numpy().astype(idt, copy=False)
                lse[:, t0:t1] = ls.cpu().numpy()
        result[ARRAY_LOGPROBS] = logprobs
        result[ARRAY_INDICES] = indices
        result[ARRAY_LOGSUMEXP] = lse
    for layer in layers:
        result[hidden_array(layer)] = hidden_to_numpy(out.hidden[layer], hidden_dtype)
    return result


def extract_batches(
    teacher: Teacher,
    ids: np.ndarray,
    *,
    batch_size: int,
    row_offset: int = 0,
    topk: int,
    temperatures: Sequence[float],
    layers: Sequence[int],
    hidden_dtype: str,
    index_dtype: npt.DTypeLike,
    t_chunk: int | None = None,
) -> dict[str, np.ndarray]:
    """:func:`extract` over ``ids`` (N, T) in batches of ``batch_size`` rows; same keys, N rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_ids(ids, teacher.vocab_size, row_offset)  # fail before any forward, not mid-shard
    n = ids.shape[0]
    result: dict[str, np.ndarray] = {}
    for start in range(0, n, batch_size):
        end = min(n, start + batch_size)
        part = extract(
            teacher,
            ids[start:end],
            topk=topk,
            temperatures=temperatures,
            layers=layers,
            hidden_dtype=hidden_dtype,
            index_dtype=index_dtype,
            t_chunk=t_chunk,
            row_offset=row_offset + start,
        )
        if not result:
            result = {k: np.empty((n, *a.shape[1:]), dtype=a.dtype) for k, a in part.items()}
        for k, a in part.items():
            result[k][start:end] = a
        log.debug("extracted rows %d..%d", row_offset + start, row_offset + end)
    return result
