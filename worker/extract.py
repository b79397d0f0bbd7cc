"""One teacher pass over a block of rows -> the cache's arrays for those rows.

Per row block ``ids`` (B, T), :func:`extract` returns, keyed by the cache's array names::

    topk/logprobs    (B, T, k)       float16   z_v - lse_1 of the top-k, sorted descending
    topk/indices     (B, T, k)       index_dtype (uint16 when V <= 65536, else int32)
    topk/logsumexp   (B, T, n_temps) float32   log sum_v exp(z_v / t) over the full vocabulary
    hidden/<layer>   (B, T, d)       float16 | float32 | uint16 (the bits of bfloat16)
    sample/*         (B, T, m)       draws from the teacher at t=1 (:mod:`kdcache.worker.sampling`)

The logits math runs in float32, ``t_chunk`` positions at a time (:func:`chunk_arrays`), so a
float32 copy of the whole (B, T, V) logits never exists at once. For a teacher with a linear LM
head (:class:`~kdcache.worker.teachers.FusedTeacher`) the head itself runs per chunk, so no
(B, T, V) tensor exists at all; other teachers' logits stay in the model's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from kdcache.core.errors import DatasetError, TeacherError
from kdcache.core.format import (
    ARRAY_INDICES,
    ARRAY_LOGPROBS,
    ARRAY_LOGSUMEXP,
    ARRAY_SAMPLE_COUNTS,
    ARRAY_SAMPLE_INDICES,
    ARRAY_SAMPLE_LOGPROBS,
    hidden_array,
    sample_count_dtype,
)
from kdcache.worker.sampling import row_uniforms, sample_chunk
from kdcache.worker.teachers import FusedTeacher, Teacher

__all__ = [
    "CHUNK_BYTES",
    "CPU_CHUNK_BYTES",
    "CPU_MIN_CHUNK_ROWS",
    "LogitOutputs",
    "check_ids",
    "chunk_arrays",
    "default_t_chunk",
    "extract",
    "extract_batches",
    "hidden_to_numpy",
]

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 20
"""Target size of one chunk of float32 logits (B, t_chunk, V) on an accelerator."""
CPU_CHUNK_BYTES = 16 << 20
"""On a CPU, small chunks keep top-k and log-sum-exp in cache: 2.5x faster than 256 MiB chunks
(bench/teacher_pass.py --breakdown: 1.24 s -> 0.50 s for a d=256, V=8192 teacher); below
~16 MiB the fused head's products get too short to run at full speed (64 positions x 8 rows)."""

_HIDDEN = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


CPU_MIN_CHUNK_ROWS = 128
"""On a CPU, at least this many rows (B x t_chunk) per chunk, above the byte budget if need be:
the fused head reads its whole (V, d) weight once per chunk, so short chunks are bound by that
read. At V=131072, d=64, B=8 (extraction alone): 81 tokens/s at 32 rows (16 MiB chunks), 130 at
128 rows (64 MiB), 150 at 256 rows (128 MiB: the pass's peak then reaches 25% of one batch's
float32 logits, bench/teacher_pass.py's bound), 85 for the unfused path."""


def default_t_chunk(
    batch: int, vocab_size: int, budget: int = CHUNK_BYTES, min_rows: int = 0
) -> int:
    """Positions per chunk so that (batch, t_chunk, V) float32 logits take about ``budget``,
    and batch x t_chunk is at least ``min_rows``."""
    b = max(1, batch)
    return max(1, budget // (4 * b * max(1, vocab_size)), -(-min_rows // b))


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
    x = _hidden_on_device(h, hidden_dtype).cpu().numpy()
    return x.view(np.uint16) if hidden_dtype == "bfloat16" else x


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


@dataclass(frozen=True)
class LogitOutputs:
    """What the cache keeps of each position's logits: the parameters of :func:`chunk_arrays`."""

    topk: int
    temperatures: tuple[float, ...]
    sample_draws: int = 0
    sample_seed: int = 0

    def uniforms(self, row_offset: int, b: int, t: int) -> torch.Tensor | None:
        """The draws' uniforms of rows row_offset.. (B, T, N) float64, or None without draws."""
        if not self.sample_draws:
            return None
        rows = range(row_offset, row_offset + b)
        return torch.from_numpy(row_uniforms(self.sample_seed, rows, t, self.sample_draws))


def _log_sums(s: torch.Tensor, temps: Sequence[float], in_place: bool) -> dict[float, torch.Tensor]:
    """log sum_v exp(s_v / t) (B, t) for each temperature, from shifted logits s <= 0 (B, t, V).

    t=1 is one exp; t=2 takes the square root of those exps instead of a second exp (exact but
    for terms below e^-87 of the largest, which float32 cannot add to it anyway); others use a
    buffer of their own. ``in_place`` lets the exps overwrite ``s``.
    """
    out: dict[float, torch.Tensor] = {}
    buf: torch.Tensor | None = None
    for t in dict.fromkeys(temps):
        if t not in (1.0, 2.0):
            buf = torch.mul(s, 1.0 / t, out=buf) if buf is not None else s * (1.0 / t)
            out[t] = buf.exp_().sum(dim=-1).log_()
    e = s.exp_() if in_place else torch.exp(s, out=buf) if buf is not None else s.exp()
    out[1.0] = e.sum(dim=-1).log_()
    if 2.0 in temps:
        out[2.0] = e.sqrt_().sum(dim=-1).log_()
    return out


def chunk_arrays(
    z: torch.Tensor,
    want: LogitOutputs,
    uniforms: torch.Tensor | None = None,
    *,
    consume: bool = False,
) -> dict[str, torch.Tensor]:
    """The cache arrays of one chunk of positions, from its logits; everything stays on z's device.

    ``z``: (B, t, V) float32 logits of t positions (never the whole sequence at once). Returns
    ``topk/logprobs`` (B, t, k) float16, ``topk/indices`` (B, t, k) int32 (narrowed to the cache's
    index dtype on the host) and ``topk/logsumexp`` (B, t, n_temps) float32 when ``want.topk``;
    with ``uniforms`` (B, t, N) float64 also ``sample/indices`` (B, t, m) int32,
    ``sample/counts`` (B, t, m) int32 and ``sample/logprobs`` (B, t, m) float16.
    ``consume``: z is the caller's to lose; without draws the math then runs in it, with no
    (B, t, V) buffer of its own (each pass over V is as long as the head's product on a CPU).
    """
    temps = want.temperatures
    # lse_t = m/t + log sum exp((z - m)/t): one max serves every temperature
    m = z.amax(dim=-1, keepdim=True)
    in_place = consume and uniforms is None
    s = z.sub_(m) if in_place else z - m
    out: dict[str, torch.Tensor] = {}
    if want.topk:  # the order of z - m is the order of z
        vals, idx = torch.topk(s, want.topk, dim=-1, sorted=True)
    log_sums = _log_sums(s, temps, in_place)
    m1 = m.squeeze(-1)
    lse1 = log_sums[1.0] + m1
    if want.topk:
        out[ARRAY_LOGPROBS] = (vals - log_sums[1.0].unsqueeze(-1)).to(torch.float16)
        out[ARRAY_INDICES] = idx.to(torch.int32)
        out[ARRAY_LOGSUMEXP] = torch.stack([log_sums[t] + m1 / t for t in temps], dim=-1)
    if uniforms is not None:
        width = min(want.sample_draws, z.shape[-1])
        ids, counts, logprobs = sample_chunk(z, lse1, uniforms.to(z.device), width)
        out[ARRAY_SAMPLE_INDICES] = ids.to(torch.int32)
        out[ARRAY_SAMPLE_COUNTS] = counts.to(torch.int32)
        out[ARRAY_SAMPLE_LOGPROBS] = logprobs.to(torch.float16)
    return out


def _logit_chunks(
    t: int, step: int, logits_of: Callable[[int, int], torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor]]:
    """(t0, float32 logits (B, t1 - t0, V)) for each chunk [t0, t1) of the T positions."""
    for t0 in range(0, t, step):
        yield t0, logits_of(t0, min(t, t0 + step))


class _Landing:
    """Host buffers one batch's results land in, a chunk at a time.

    On CUDA the buffers are pinned and every copy is asynchronous, so queueing the next batch's
    forward does not wait for this one; :meth:`arrays` waits. On a CPU the copies are plain.
    """

    def __init__(self, b: int, t: int) -> None:
        self.shape = (b, t)
        self.bufs: dict[str, torch.Tensor] = {}
        self.events: list[torch.cuda.Event] = []
        self.devices: set[torch.device] = set()

    def put(self, name: str, t0: int, x: torch.Tensor) -> None:
        """Copy ``x`` (B, t, ...) into positions t0.. of the host buffer ``name``."""
        cuda = x.device.type == "cuda"
        buf = self.bufs.get(name)
        if buf is None:
            shape = (*self.shape, *x.shape[2:])
            buf = self.bufs[name] = torch.empty(shape, dtype=x.dtype, pin_memory=cuda)
        buf[:, t0 : t0 + x.shape[1]].copy_(x, non_blocking=cuda)
        if cuda:
            self.devices.add(x.device)

    def close(self) -> None:
        """Mark the end of this batch's queued copies (one event per GPU involved)."""
        for dev in self.devices:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
            self.events.append(ev)

    def arrays(self) -> dict[str, np.ndarray]:
        for ev in self.events:
            ev.synchronize()
        return {k: v.numpy() for k, v in self.bufs.items()}


def _hidden_on_device(h: torch.Tensor, hidden_dtype: str) -> torch.Tensor:
    """(B, T, d) -> the cache dtype on h's device; bfloat16 as its int16 bits."""
    if hidden_dtype not in _HIDDEN:
        raise ValueError(f"hidden_dtype must be one of {sorted(_HIDDEN)}, got {hidden_dtype!r}")
    x = h.detach().to(_HIDDEN[hidden_dtype])
    return x.view(torch.int16) if hidden_dtype == "bfloat16" else x


def _chunk_rows(b: int, v: int, t_chunk: int | None, cpu: bool) -> int:
    """Positions per chunk of a (b, T, v) batch: ``t_chunk``, else the device's default."""
    if t_chunk is not None and t_chunk > 0:
        return t_chunk
    if cpu:
        return default_t_chunk(b, v, CPU_CHUNK_BYTES, CPU_MIN_CHUNK_ROWS)
    return default_t_chunk(b, v, CHUNK_BYTES)


def _logits_buffer(
    scratch: dict[str, torch.Tensor] | None,
    rows: int,
    v: int,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """A float32 (rows, v) buffer kept in ``scratch`` for a float32 fused head (``dtype``: its
    weight's) on a CPU, else None.

    One buffer serves every chunk of every batch: allocating each chunk's logits afresh costs
    the kernel's page faults on every chunk (on a CPU the chunk's results are copied out before
    the next chunk runs, so reuse is safe).
    """
    if scratch is None or device.type != "cpu" or dtype != torch.float32:
        return None
    buf = scratch.get("logits")
    if buf is None or buf.shape[0] < rows or buf.shape[1] != v:
        buf = scratch["logits"] = torch.empty((rows, v), dtype=torch.float32, device=device)
    return buf


def _launch(
    teacher: Teacher,
    ids: np.ndarray,
    want: LogitOutputs,
    layers: Sequence[int],
    hidden_dtype: str,
    t_chunk: int | None,
    fused: bool,
    row_offset: int = 0,
    scratch: dict[str, torch.Tensor] | None = None,
) -> _Landing:
    """Queue one batch: forward, per-chunk logits work and copies to the host; no waiting.

    ``scratch`` keeps buffers from one batch to the next (see :func:`_logits_buffer`)."""
    b, t = ids.shape
    v = teacher.vocab_size
    x = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
    if teacher.device.type == "cuda":  # pinned: the copy to the GPU does not wait for its queue
        x = x.pin_memory()
    logits_of: Callable[[int, int], torch.Tensor]
    if fused and isinstance(teacher, FusedTeacher) and teacher.head is not None:
        head = teacher.head
        fo = teacher.forward_features(x, list(layers))
        features, hidden, device = fo.features, fo.hidden, head.weight.device
        if tuple(features.shape[:2]) != (b, t):
            raise TeacherError(
                f"{teacher.description}: features of shape {tuple(features.shape)}, "
                f"expected {(b, t)} + (d,)"
            )
        step = _chunk_rows(b, v, t_chunk, device.type == "cpu")
        buf = _logits_buffer(scratch, b * min(t, step), v, device, head.weight.dtype)
        logits_of = lambda t0, t1: head(features[:, t0:t1], out=buf)  # noqa: E731
        # each chunk's logits are the pass's own (fresh, or the reused buffer whose previous
        # chunk's results were copied out already): the math may run in them
        owned = True
    else:
        out = teacher.forward(x, list(layers))
        logits, hidden, device = out.logits, out.hidden, out.logits.device
        if tuple(logits.shape) != (b, t, v):
            raise TeacherError(
                f"{teacher.description}: logits of shape {tuple(logits.shape)}, "
                f"expected {(b, t, v)}"
            )
        logits_of = lambda t0, t1: logits[:, t0:t1].float()  # noqa: E731
        owned = logits.dtype != torch.float32  # else the chunks are views of the model's output
        step = _chunk_rows(b, v, t_chunk, device.type == "cpu")
    land = _Landing(b, t)
    with torch.inference_mode():
        if want.topk or want.sample_draws:
            uniforms = want.uniforms(row_offset, b, t)
            for t0, z in _logit_chunks(t, step, logits_of):
                u = None if uniforms is None else uniforms[:, t0 : t0 + z.shape[1]]
                for name, part in chunk_arrays(z, want, u, consume=owned).items():
                    land.put(name, t0, part)
        for layer in layers:
            land.put(hidden_array(layer), 0, _hidden_on_device(hidden[layer], hidden_dtype))
    land.close()
    return land


def _finish(
    land: _Landing,
    teacher: Teacher,
    index_dtype: np.dtype,
    hidden_dtype: str,
    row_offset: int,
    sample_draws: int = 0,
) -> dict[str, np.ndarray]:
    """Wait for a launched batch; its arrays in the cache dtypes, non-finite logits refused."""
    out = land.arrays()
    for name in (ARRAY_LOGSUMEXP, ARRAY_SAMPLE_LOGPROBS):
        if name not in out:
            continue
        finite = np.isfinite(out[name]).reshape(out[name].shape[0], -1)
        if not finite.all():
            r = int(np.argmin(finite.all(axis=1)))
            raise TeacherError(f"{teacher.description}: non-finite logits at row {row_offset + r}")
    if ARRAY_INDICES in out:
        out[ARRAY_INDICES] = out[ARRAY_INDICES].astype(index_dtype, copy=False)
    if ARRAY_SAMPLE_INDICES in out:
        out[ARRAY_SAMPLE_INDICES] = out[ARRAY_SAMPLE_INDICES].astype(index_dtype, copy=False)
        count_dtype = sample_count_dtype(sample_draws)
        out[ARRAY_SAMPLE_COUNTS] = out[ARRAY_SAMPLE_COUNTS].astype(count_dtype)
    if hidden_dtype == "bfloat16":
        for k, a in out.items():
            if k.startswith("hidden/"):
                out[k] = a.view(np.uint16)
    return out


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
    fused: bool = True,
    sample_draws: int = 0,
    sample_seed: int = 0,
) -> dict[str, np.ndarray]:
    """Run the teacher once on ``ids`` (B, T) and return the cache arrays for those rows.

    ``row_offset`` is the dataset row of ``ids[0]`` (named in errors; it keys the draws).
    ``topk == 0`` omits the three ``topk/*`` arrays, ``sample_draws == 0`` the ``sample/*`` ones.
    ``fused`` (default) applies a :class:`FusedTeacher`'s LM head a
    chunk of positions at a time instead of asking the model for (B, T, V) logits; teachers
    without a linear head run unfused either way. Raises :class:`DatasetError` for ids outside
    the vocabulary and :class:`TeacherError` when the teacher's logits are not (B, T, V) or not
    finite.
    """
    idt = np.dtype(index_dtype)
    _check_args(teacher, topk, temperatures, idt)
    check_ids(ids, teacher.vocab_size, row_offset)
    want = LogitOutputs(topk, tuple(float(t) for t in temperatures), sample_draws, sample_seed)
    land = _launch(teacher, ids, want, layers, hidden_dtype, t_chunk, fused, row_offset, {})
    return _finish(land, teacher, idt, hidden_dtype, row_offset, sample_draws)


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
    fused: bool = True,
    on_batch: Callable[[int], None] | None = None,
    sample_draws: int = 0,
    sample_seed: int = 0,
) -> dict[str, np.ndarray]:
    """:func:`extract` over ``ids`` (N, T) in batches of ``batch_size`` rows; same keys, N rows.

    ``on_batch(rows)`` is called after each batch (progress within a shard)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idt = np.dtype(index_dtype)
    _check_args(teacher, topk, temperatures, idt)
    check_ids(ids, teacher.vocab_size, row_offset)  # fail before any forward, not mid-shard
    want = LogitOutputs(topk, tuple(float(t) for t in temperatures), sample_draws, sample_seed)
    n = ids.shape[0]
    result: dict[str, np.ndarray] = {}
    scratch: dict[str, torch.Tensor] = {}

    def land(start: int, batch: _Landing) -> None:
        part = _finish(batch, teacher, idt, hidden_dtype, row_offset + start, sample_draws)
        if not result:
            result.update({k: np.empty((n, *a.shape[1:]), dtype=a.dtype) for k, a in part.items()})
        for k, a in part.items():
            result[k][start : start + a.shape[0]] = a
        log.debug("extracted rows %d..%d", row_offset + start, row_offset + start + len(a))
        if on_batch is not None:
            on_batch(len(a))

    # Batch i+1 is queued before batch i's results are awaited: on a GPU its forward overlaps
    # the copies of batch i to the host.
    pending: tuple[int, _Landing] | None = None
    for start in range(0, n, batch_size):
        end = min(n, start + batch_size)
        batch = _launch(
            teacher,
            ids[start:end],
            want,
            layers,
            hidden_dtype,
            t_chunk,
            fused,
            row_offset + start,
            scratch,
        )
        if pending is not None:
            land(*pending)
        pending = (start, batch)
    if pending is not None:
        land(*pending)
    return result
