"""A fast path for reading rows out of shard files that are on local disk.

kdcache writes every array with one layout: a Zarr v3 ``sharding_indexed`` codec (index at the
end, ``bytes`` + ``crc32c``) around inner chunks encoded ``bytes`` + ``blosc``. For that layout
this module reads the shard index itself, ``pread`` s only the inner chunks the rows need and
decompresses them in a thread pool (Blosc releases the GIL) straight into the output array, cast
on the way to the dtype the tensors need. That is several times faster than going through
zarr-python's asyncio pipeline; any other layout, or a remote store, uses zarr
(:func:`FastLayout.of` returns None).

The read path copies as little as it can: a chunk's stored bytes are read once (``pread``), its
CRC-32C is checked over those bytes in place, and a chunk whose rows are wanted whole and whose
dtype is the tensor's is decompressed directly into the output; others go through one scratch
buffer per thread and one casting copy. Chunks are bundled into tasks of a few MiB so that the
per-task cost of the pool stays small next to the decoding.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import Any

import google_crc32c
import numcodecs
import numcodecs.blosc
import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, TransposeCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from kdcache.core.errors import IntegrityError

__all__ = ["FastLayout", "Task"]

Task = Callable[[], None]
_MISSING = 2**64 - 1
# CRC-32C of (data + its own CRC, little-endian) is this constant: checking a chunk needs no copy
# of its body without the trailing checksum.
_CRC32C_RESIDUE = 0x48674BC7
TASK_BYTES = 4 << 20
"""Decoded bytes per pool task: large enough that submitting is cheap, small enough to spread."""
_scratch = threading.local()


def _scratch_array(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A per-thread buffer of ``shape`` and ``dtype``, reused across chunks (no fresh pages)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _scratch.buf = bytearray(nbytes)
    return np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)


@dataclass(frozen=True)
class _Chunk:
    """One stored inner chunk to decode, and where its values go in the output."""

    start: int
    nbytes: int
    coords: tuple[int, ...]
    source: tuple[Any, ...]  # selection in the decoded chunk
    target: tuple[Any, ...]  # selection in the output (same shape as ``source``'s result)
    direct: bool  # the target is the whole chunk, contiguous, in the stored dtype
    basic: bool  # ``target`` is basic indexing: ``out[target]`` is a view


_TORCH_PIECE = 16384
"""Elements per torch copy: below torch's parallel grain, so a cast never starts OpenMP threads
inside a decode thread."""


def _cast_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src`` with a cast. numpy converts float16 to float32 one element at a time
    (~20x slower than decoding it); torch's vectorised copy does it at memory speed."""
    if (
        dst.dtype == np.float32
        and src.dtype == np.float16
        and dst.flags.c_contiguous
        and src.flags.c_contiguous
    ):
        d, s = torch.from_numpy(dst).view(-1), torch.from_numpy(src).view(-1)
        for i in range(0, d.numel(), _TORCH_PIECE):
            d[i : i + _TORCH_PIECE].copy_(s[i : i + _TORCH_PIECE])
    else:
        np.copyto(dst, src, casting="unsafe")


@dataclass(frozen=True)
class FastLayout:
    """Geometry of one array written in kdcache's shard layout."""

    path: str
    shape: tuple[int, ...]
    shard: tuple[int, ...]
    inner: tuple[int, ...]
    dtype: np.dtype[Any]
    fill: Any
    crc: bool = False  # inner chunks end in a CRC-32C (caches written since issue 11)
    chain: tuple[Any, ...] = ()
    """Bytes-to-bytes decoders, first applied first, when the chunk is not plain Blosc (the
    rank-major and ``-xz`` top-k codes: numcodecs ``shuffle`` / ``lzma``, Blosc): decoded into a
    buffer, then placed. Empty: plain Blosc, decompressed straight into its place."""
    order: tuple[int, ...] | None = None
    """The chunk's zarr ``transpose`` order (its values are stored in this axis order)."""

    @classmethod
    def of(cls, arr: zarr.Array) -> FastLayout | None:
        """The layout of ``arr``, or None when it is not the one this fast path reads."""
        m = arr.metadata
        if getattr(m, "zarr_format", None) != 3 or len(m.codecs) != 1:  # type: ignore[union-attr]
            return None
        sharding = m.codecs[0]  # type: ignore[union-attr]
        if not isinstance(sharding, ShardingCodec):
            return None
        inner = list(sharding.codecs)
        order = None
        first = inner[0] if inner else None
        if isinstance(first, TransposeCodec):
            order = tuple(int(a) for a in first.order)
            inner = inner[1:]
        crc = len(inner) >= 3 and isinstance(inner[-1], Crc32cCodec)
        squeeze = inner[1:-1] if crc else inner[1:]
        chain = tuple(_decoder(c) for c in squeeze)
        inner_ok = (
            len(inner) >= 2
            and isinstance(inner[0], BytesCodec)
            and (crc or (len(inner) == 2 and order is None))
            and bool(chain)
            and all(d is not None for d in chain)
        )
        plain = order is None and len(squeeze) == 1 and isinstance(squeeze[0], BloscCodec)
        index_ok = (
            len(sharding.index_codecs) == 2
            and isinstance(sharding.index_codecs[0], BytesCodec)
            and isinstance(sharding.index_codecs[1], Crc32cCodec)
            and sharding.index_location == ShardingCodecIndexLocation.end
        )
        dtype = np.dtype(arr.dtype)
        if not (inner_ok and index_ok) or dtype.byteorder == ">":
            return None
        if arr.metadata.encode_chunk_key((0,) * arr.ndim) != "c/" + "/".join(["0"] * arr.ndim):
            return None
        return cls(
            path=arr.path,
            shape=tuple(arr.shape),
            shard=tuple(arr.shards or arr.chunks),
            inner=tuple(sharding.chunk_shape),
            dtype=dtype,
            fill=np.asarray(arr.fill_value, dtype=dtype).item(),
            crc=crc,
            chain=() if plain else chain,
            order=order,
        )

    def key(self, shard: int) -> str:
        """Store key of row shard ``shard``'s object."""
        return f"{self.path}/c/{shard}" + "/0" * (len(self.shape) - 1)

    @property
    def grid(self) -> tuple[int, ...]:
        """Inner chunks per shard along each axis."""
        return tuple(s // i for s, i in zip(self.shard, self.inner, strict=True))

    def _index(self, fd: int, size: int) -> np.ndarray:
        n = int(np.prod(self.grid))
        raw = os.pread(fd, 16 * n + 4, size - 16 * n - 4)
        body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
        if google_crc32c.value(body) != crc:
            raise IntegrityError(f"{self.path}: shard index checksum mismatch")
        return np.frombuffer(body, dtype="<u8").reshape(*self.grid, 2)

    def tasks(
        self,
        locate: Callable[[str], str | None],
        rows: np.ndarray,
        out: np.ndarray,
        seq_len: int | None,
        positions: np.ndarray | None = None,
    ) -> list[Task]:
        """Work items that fill ``out`` with ``rows`` (sorted, unique), each decoding a few
        chunks of one shard object.

        locate: store key -> local file path, or None when the object does not exist (an
        IntegrityError: kdcache writes every shard object of a completed shard).
        ``out``: (P, T', ...) in any dtype; values are cast into it. Row ``rows[i]`` goes to
        ``out[positions[i]]`` (default: ``out[i]``), so rows can land in the order they are used.
        """
        where = np.arange(len(rows)) if positions is None else np.asarray(positions)
        t_len = self.shape[1] if seq_len is None else min(seq_len, self.shape[1])
        rest = self.shape[1:]
        shard_of = rows // self.shard[0]
        bounds = np.flatnonzero(np.diff(shard_of)) + 1
        tasks: list[Task] = []
        for group_start, group in zip(
            np.concatenate([[0], bounds]), np.split(rows, bounds), strict=True
        ):
            shard = int(shard_of[group_start])
            path = locate(self.key(shard))
            if path is None:
                raise IntegrityError(
                    f"{self.path}: shard object {self.key(shard)} is missing "
                    f"though shard {shard} is recorded complete"
                )
            places = where[int(group_start) : int(group_start) + len(group)]
            chunks = self._shard_chunks(path, shard, group, places, out, t_len, rest)
            tasks += self._bundle(path, shard, chunks, out)
        return tasks

    def _shard_chunks(
        self,
        path: str,
        shard: int,
        rows: np.ndarray,
        places: np.ndarray,
        out: np.ndarray,
        t_len: int,
        rest: tuple[int, ...],
    ) -> list[_Chunk]:
        with open(path, "rb") as f:
            index = self._index(f.fileno(), os.fstat(f.fileno()).st_size)
        local = rows - shard * self.shard[0]
        ci = local // self.inner[0]
        # chunks covering [0, t_len) on axis 1 and everything on the other axes
        spans = [range(-(-t_len // self.inner[1]))] + [range(g) for g in self.grid[2:]]
        parts = [
            (
                coords,
                int(np.ravel_multi_index(coords, self.grid[1:])),
                *self._regions(coords, t_len, rest),
            )
            for coords in product(*spans)
        ]
        whole_rows = t_len == self.shape[1] and self.inner[1:] == rest
        same_dtype = out.dtype == self.dtype
        spans_of = index.reshape(index.shape[0], -1, 2).tolist()  # [chunk row][coords] -> pair
        chunks: list[_Chunk] = []
        # ``rows`` are sorted, so each chunk's rows are one run of ``ci``
        cuts = np.flatnonzero(np.diff(ci)) + 1
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ci)], strict=True):
            c = int(ci[lo])
            in_chunk, out_rows = local[lo:hi] - c * self.inner[0], places[lo:hi]
            n = hi - lo
            first = int(out_rows[0])
            dense = n == self.inner[0] and int(out_rows[-1]) - first == n - 1
            dense = dense and (n < 3 or bool(np.all(np.diff(out_rows) == 1)))
            direct = dense and whole_rows and same_dtype
            basic = dense or n == 1
            for coords, flat, region, dst in parts:
                start, nbytes = spans_of[c][flat]
                if dense:
                    source: tuple[Any, ...] = (slice(None), *region)
                    target: tuple[Any, ...] = (slice(first, first + n), *dst)
                elif n == 1:  # one row of the chunk: basic indexing, no fancy-index temporary
                    source, target = (int(in_chunk[0]), *region), (first, *dst)
                else:
                    source, target = (in_chunk, *region), (out_rows, *dst)
                chunks.append(_Chunk(start, nbytes, (c, *coords), source, target, direct, basic))
        return chunks

    def _regions(
        self, coords: tuple[int, ...], t_len: int, rest: tuple[int, ...]
    ) -> tuple[list[slice], list[slice]]:
        """(selection in the chunk, selection in the output) along axes 1.. of chunk ``coords``."""
        region: list[slice] = []
        dst: list[slice] = []
        for axis, c in enumerate(coords, start=1):
            lo = c * self.inner[axis]
            hi = min(lo + self.inner[axis], t_len if axis == 1 else rest[axis - 1])
            region.append(slice(0, hi - lo))
            dst.append(slice(lo, hi))
        return region, dst

    def _bundle(self, path: str, shard: int, chunks: list[_Chunk], out: np.ndarray) -> list[Task]:
        """Group ``chunks`` (of one shard object) into tasks of about TASK_BYTES decoded."""
        per_task = max(1, TASK_BYTES // max(1, int(np.prod(self.inner)) * self.dtype.itemsize))
        return [
            self._task(path, shard, chunks[i : i + per_task], out)
            for i in range(0, len(chunks), per_task)
        ]

    def _task(self, path: str, shard: int, chunks: list[_Chunk], out: np.ndarray) -> Task:
        def run() -> None:
            with open(path, "rb", buffering=0) as f:
                fd = f.fileno()
                for chunk in chunks:
                    self._fill(fd, shard, chunk, out)

        return run

    def _fill(self, fd: int, shard: int, chunk: _Chunk, out: np.ndarray) -> None:
        """Decode one chunk into ``out``."""
        if chunk.start == _MISSING:
            out[chunk.target] = self.fill
            return
        raw = os.pread(fd, chunk.nbytes, chunk.start)
        where = f"{self.path}: chunk {chunk.coords} of shard {shard} ({self.key(shard)})"
        if len(raw) != chunk.nbytes:
            raise IntegrityError(f"{where}: the shard object is truncated")
        body = memoryview(raw)
        if self.crc:
            if len(raw) < 4 or google_crc32c.value(raw) != _CRC32C_RESIDUE:
                raise IntegrityError(f"{where}: CRC-32C mismatch; the stored bytes are corrupt")
            body = body[:-4]
        if self.chain:
            self._place(self._decode_chain(body, where), chunk, out)
            return
        dest = out[chunk.target] if chunk.direct else _scratch_array(self.inner, self.dtype)
        try:
            # Blosc's header (bytes 4..8: decompressed size) guards ``dest`` against a short chunk
            size = int.from_bytes(body[4:8], "little") if len(body) >= 16 else -1
            if size != dest.nbytes:
                raise ValueError(f"its header says {size} bytes, not {dest.nbytes}")
            numcodecs.blosc.decompress(body, dest)
        except (RuntimeError, ValueError) as err:
            raise IntegrityError(f"{where}: cannot be decoded ({err}); it is corrupt") from err
        if not chunk.direct:
            self._place(dest, chunk, out)

    def _decode_chain(self, body: memoryview, where: str) -> np.ndarray:
        """A non-plain chunk's values, shaped and ordered like the chunk (maybe a view)."""
        data: Any = body
        try:
            for decode in reversed(self.chain):
                data = decode(data)
        except Exception as err:  # zlib, lzma, Blosc errors alike: the bytes are not a chunk
            raise IntegrityError(f"{where}: cannot be decoded ({err!r}); it is corrupt") from err
        flat = np.frombuffer(data, dtype=self.dtype)
        if flat.size != int(np.prod(self.inner)):
            raise IntegrityError(
                f"{where}: decodes to {flat.size} values, not {int(np.prod(self.inner))}"
            )
        if self.order is None:
            return flat.reshape(self.inner)
        stored = flat.reshape([self.inner[a] for a in self.order])
        return stored.transpose(np.argsort(self.order))

    def _place(self, values: np.ndarray, chunk: _Chunk, out: np.ndarray) -> None:
        """Copy ``chunk``'s rows of its decoded ``values`` (chunk-shaped) into ``out``."""
        if chunk.basic:
            dst, picked = out[chunk.target], values[chunk.source]
            if dst.dtype == picked.dtype:
                np.copyto(dst, picked)
            else:
                _cast_into(dst, np.ascontiguousarray(picked))
        elif out.dtype == np.float32 and values.dtype == np.float16:
            # rows of the chunk scattered to their places: row by row, so each is a basic
            # view that _cast_into converts at memory speed (numpy's fancy-index cast does not)
            src_rows, dst_rows, rest = chunk.source[0], chunk.target[0], chunk.source[1:]
            for i, j in zip(src_rows.tolist(), dst_rows.tolist(), strict=True):
                _cast_into(out[(j, *chunk.target[1:])], np.ascontiguousarray(values[(i, *rest)]))
        else:
            out[chunk.target] = values[chunk.source]


def _decoder(codec: Any) -> Callable[[Any], Any] | None:
    """How the fast path undoes one bytes-to-bytes codec, or None when it does not know it."""
    if isinstance(codec, BloscCodec):
        return numcodecs.blosc.decompress
    inner = getattr(codec, "_codec", None)  # zarr's wrapper of a numcodecs codec
    if isinstance(inner, (numcodecs.LZMA, numcodecs.Shuffle, numcodecs.Zstd)):
        return inner.decode
    return None
