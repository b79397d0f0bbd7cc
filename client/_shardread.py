"""A fast path for reading rows out of shard files that are on local disk.

kdcache writes every array with one layout: a Zarr v3 ``sharding_indexed`` codec (index at the
end, ``bytes`` + ``crc32c``) around inner chunks encoded ``bytes`` + ``blosc``. For that layout
this module reads the shard index itself, ``pread`` s only the inner chunks the rows need and
decompresses them in a thread pool (Blosc releases the GIL) straight into the output array, cast
on the way to the dtype the tensors need. That is several times faster than going through
zarr-python's asyncio pipeline; any other layout, or a remote store, uses zarr
(:func:`FastLayout.of` returns None).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from typing import Any

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

from kdcache.core.errors import IntegrityError

__all__ = ["FastLayout", "Task"]

Task = Callable[[], None]
_MISSING = 2**64 - 1


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

    @classmethod
    def of(cls, arr: zarr.Array) -> FastLayout | None:
        """The layout of ``arr``, or None when it is not the one this fast path reads."""
        m = arr.metadata
        if getattr(m, "zarr_format", None) != 3 or len(m.codecs) != 1:  # type: ignore[union-attr]
            return None
        sharding = m.codecs[0]  # type: ignore[union-attr]
        if not isinstance(sharding, ShardingCodec):
            return None
        inner = sharding.codecs
        crc = len(inner) == 3 and isinstance(inner[2], Crc32cCodec)
        inner_ok = (
            len(inner) in (2, 3)
            and isinstance(inner[0], BytesCodec)
            and isinstance(inner[1], BloscCodec)
            and (len(inner) == 2 or crc)
        )
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
    ) -> list[Task]:
        """Work items that fill ``out`` with ``rows`` (sorted, unique), each decoding one chunk.

        locate: store key -> local file path, or None when the object does not exist (an
        IntegrityError: kdcache writes every shard object of a completed shard).
        ``out``: (len(rows), T', ...) in any dtype; values are cast into it.
        """
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
            tasks += self._shard_tasks(path, shard, group, int(group_start), out, t_len, rest)
        return tasks

    def _shard_tasks(
        self,
        path: str,
        shard: int,
        rows: np.ndarray,
        offset: int,
        out: np.ndarray,
        t_len: int,
        rest: tuple[int, ...],
    ) -> list[Task]:
        with open(path, "rb") as f:
            index = self._index(f.fileno(), os.fstat(f.fileno()).st_size)
        local = rows - shard * self.shard[0]
        ci = local // self.inner[0]
        # chunks covering [0, t_len) on axis 1 and everything on the other axes
        spans = [range(-(-t_len // self.inner[1]))] + [range(g) for g in self.grid[2:]]
        tasks: list[Task] = []
        for c in np.unique(ci).tolist():
            sel = np.flatnonzero(ci == c)
            in_chunk, out_rows = local[sel] - c * self.inner[0], offset + sel
            for coords in product(*spans):
                start, nbytes = (int(v) for v in index[(c, *coords)])
                tasks.append(
                    self._chunk_task(
                        path,
                        shard,
                        start,
                        nbytes,
                        (c, *coords),
                        in_chunk,
                        out_rows,
                        out,
                        t_len,
                        rest,
                    )
                )
        return tasks

    def _decode(self, raw: bytes, shard: int, coords: tuple[int, ...]) -> np.ndarray:
        """One inner chunk's values; IntegrityError naming the shard when its bytes are corrupt."""
        where = f"{self.path}: chunk {coords} of shard {shard} ({self.key(shard)})"
        if self.crc:
            body, crc = raw[:-4], int.from_bytes(raw[-4:], "little")
            if len(raw) < 4 or google_crc32c.value(body) != crc:
                raise IntegrityError(f"{where}: CRC-32C mismatch; the stored bytes are corrupt")
            raw = body
        try:
            chunk = np.frombuffer(numcodecs.blosc.decompress(raw), dtype=self.dtype)
            return chunk.reshape(self.inner)
        except (RuntimeError, ValueError) as err:
            raise IntegrityError(f"{where}: cannot be decoded ({err}); it is corrupt") from err

    def _chunk_task(
        self,
        path: str,
        shard: int,
        start: int,
        nbytes: int,
        coords: tuple[int, ...],
        in_chunk: np.ndarray,
        out_rows: np.ndarray,
        out: np.ndarray,
        t_len: int,
        rest: tuple[int, ...],
    ) -> Task:
        region: list[slice] = []
        dst: list[slice] = []
        for axis, c in enumerate(coords[1:], start=1):
            lo = c * self.inner[axis]
            hi = min(lo + self.inner[axis], t_len if axis == 1 else rest[axis - 1])
            region.append(slice(0, hi - lo))
            dst.append(slice(lo, hi))
        n = len(out_rows)
        dense = n == self.inner[0] and int(out_rows[-1]) - int(out_rows[0]) == n - 1

        target: tuple[Any, ...] = (out_rows, *dst)
        source: tuple[Any, ...] = (in_chunk, *region)

        def run() -> None:
            if start == _MISSING:
                out[target] = self.fill
                return
            with open(path, "rb") as f:
                raw = os.pread(f.fileno(), nbytes, start)
            chunk = self._decode(raw, shard, coords)
            if dense:
                first = int(out_rows[0])
                out[(slice(first, first + n), *dst)] = chunk[(slice(None), *region)]
            else:
                out[target] = chunk[source]

        return run
