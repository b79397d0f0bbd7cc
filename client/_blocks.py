"""Read the rows one slot needs from one shuffle window, in chunk-aligned contiguous blocks.

Zarr decodes whole chunks, so reading rows one by one decodes each chunk many times. Here the rows
a window needs are sorted, grouped into runs of consecutive chunks, and each run is read with one
slice (which Zarr decodes concurrently); the rows are then picked out of the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from kdcache.client._fields import to_tensors
from kdcache.client._shardread import FastLayout, Task
from kdcache.client._shm import Arena, ArenaPool, worker_pool
from kdcache.core.format import Manifest
from kdcache.core.hidden_basis import Basis
from kdcache.core.reader import corrupt_as_integrity_error

__all__ = ["TENSOR_DTYPES", "BlockReader", "RowBlock", "batches", "read_rows"]

MAX_RUN_BYTES = 64 << 20
# the dtypes kdcache.client._fields.to_tensors gives; the fast path casts into them while decoding
TENSOR_DTYPES: dict[str, np.dtype[Any]] = {
    "input_ids": np.dtype(np.int64),
    "topk_indices": np.dtype(np.int64),
    "topk_logprobs": np.dtype(np.float32),
    "topk_logsumexp": np.dtype(np.float32),
    "sample_indices": np.dtype(np.int64),
    "sample_counts": np.dtype(np.int64),
    "sample_logprobs": np.dtype(np.float32),
    "sample_logprob_sums": np.dtype(np.float32),
}


def read_rows(
    arr: zarr.Array,
    rows: np.ndarray,
    seq_len: int | None = None,
    max_run_bytes: int = MAX_RUN_BYTES,
) -> np.ndarray:
    """Rows of ``arr`` (sorted, unique) as (len(rows), T', ...) in the stored dtype.

    ``seq_len`` crops axis 1 to its first ``seq_len`` positions; only those chunks are read.
    """
    crop = slice(None) if seq_len is None else slice(0, seq_len)
    row_shape = list(arr.shape[1:])
    if seq_len is not None:
        row_shape[0] = min(seq_len, row_shape[0])
    out = np.empty((len(rows), *row_shape), dtype=arr.dtype)
    if not len(rows):
        return out
    per_chunk = int(arr.chunks[0])
    row_bytes = max(1, out.itemsize * int(np.prod(row_shape, dtype=np.int64)))
    max_chunks = max(1, max_run_bytes // (row_bytes * per_chunk))
    chunk_ids = np.unique(rows // per_chunk)
    starts = np.flatnonzero(np.diff(chunk_ids) != 1) + 1
    n = arr.shape[0]
    for run in np.split(chunk_ids, starts):
        for piece in range(0, len(run), max_chunks):
            ids = run[piece : piece + max_chunks]
            lo, hi = int(ids[0]) * per_chunk, min((int(ids[-1]) + 1) * per_chunk, n)
            i0, i1 = np.searchsorted(rows, [lo, hi])
            per_shard = int((arr.shards or arr.chunks)[0])
            shards = range(lo // per_shard, (hi - 1) // per_shard + 1)
            with corrupt_as_integrity_error(str(arr.store_path), arr.path, shards):
                block = np.asarray(arr[lo:hi, crop] if seq_len is not None else arr[lo:hi])
            if i1 - i0 == hi - lo:
                out[i0:i1] = block
            else:
                out[i0:i1] = block[rows[i0:i1] - lo]
    return out


@dataclass
class RowBlock:
    """Decoded rows of one window, in the order they are yielded.

    ``tensors``: field -> (n, ...), row j of each is the j-th row to yield (a row repeated by
    padding appears twice); ``index``: (n,) ``arange(n)``, kept for readers of older blocks.
    """

    tensors: dict[str, torch.Tensor]
    index: np.ndarray
    nbytes: int

    def __len__(self) -> int:
        return len(self.index)

    def samples(self) -> Iterator[dict[str, torch.Tensor]]:
        """One dict per row (views into the block; no leading batch dimension)."""
        items = list(self.tensors.items())
        for j in range(len(self)):
            yield {k: v[j] for k, v in items}

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` as a batch: views into the block, no copy."""
        return {k: v[start:stop] for k, v in self.tensors.items()}


def batches(blocks: Iterator[RowBlock], size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive rows of ``blocks`` in batches of ``size`` (the last may be short), as
    ``DataLoader(batch_size=size)`` would collate them, but as views into the blocks: only a
    batch that spans two blocks is copied (``torch.cat``)."""
    carry: list[dict[str, torch.Tensor]] = []
    have = 0
    for block in blocks:
        n, i = len(block), 0
        if have:
            i = min(size - have, n)
            carry.append(block.rows(0, i))
            have += i
            if have == size:
                yield _joined(carry)
                carry, have = [], 0
        while n - i >= size:
            yield _own_rows(block.rows(i, i + size))
            i += size
        if i < n:
            carry.append(block.rows(i, n))
            have += n - i
    if have:
        yield _joined(carry)


def _joined(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if len(pieces) == 1:
        return _own_rows(pieces[0])
    return {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}


def _own_rows(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-row constants (``temperatures``, ensemble weights) are expanded (stride 0) views in a
    block; a batch gets real rows, as collating would give it."""
    for k, v in batch.items():
        if v.ndim and 0 in v.stride():
            batch[k] = v.contiguous()
    return batch


class BlockReader:
    """Reads blocks of rows of the selected fields for one process.

    ``shared``: decode into shared memory (:class:`Arena`), for a DataLoader worker whose
    batches torch would otherwise copy into shared memory to send them.

    ``fields``: every field asked, those without an array (a default ``loss_mask``) included.
    ``bases``: a pca cache's basis per layer, to decode its codes to full width.
    ``locate`` maps a store key to a local file when shard objects are on local disk (a local
    cache, or remote objects in the disk cache); those arrays take the fast path of
    :mod:`kdcache.client._shardread`. Without it, or for another layout, rows come through zarr.
    """

    def __init__(
        self,
        manifest: Manifest,
        arrays: Mapping[str, zarr.Array],
        seq_len: int | None,
        pool: ThreadPoolExecutor,
        locate: Callable[[str], str | None] | None = None,
        fields: Sequence[str] = (),
        bases: Basis | None = None,
        shared: bool = False,
    ) -> None:
        self.manifest = manifest
        self.shared = shared
        # a pass's blocks decoded into memory reused once the caller lets go of a block; a
        # DataLoader worker's come from its pass's shared pool (see kdcache.client._loader)
        self.arenas = ArenaPool()
        self.bases = bases
        self.fields = list(fields) or list(arrays)
        self.arrays = dict(arrays)
        self.seq_len = seq_len
        self.pool = pool
        self.locate = locate
        self.layouts = {f: FastLayout.of(a) if locate else None for f, a in self.arrays.items()}

    def _out_spec(self, field: str, layout: FastLayout) -> tuple[tuple[int, ...], np.dtype[Any]]:
        """Row shape and dtype the fast path decodes ``field`` into (cast while decoding)."""
        shape = list(layout.shape[1:])
        if self.seq_len is not None:
            shape[0] = min(self.seq_len, shape[0])
        coded = field == "topk_logprobs" and self.manifest.topk_codec != "fp16"
        dtype = layout.dtype if coded else TENSOR_DTYPES.get(field, layout.dtype)  # decoded later
        return tuple(shape), np.dtype(dtype)

    def end_pass(self) -> None:
        """Let go of the blocks kept for reuse (they are freed once the caller drops them)."""
        self.arenas.clear()

    def read(self, rows: np.ndarray) -> RowBlock:
        """Rows in yield order (repeats allowed) of every field, as a RowBlock.

        Each distinct row is decoded once, straight into its place in yield order (the fast
        path) or gathered there (zarr); a repeated row is copied from its first place.
        """
        rows = np.asarray(rows, dtype=np.int64)
        uniq, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        repeat = np.flatnonzero(first[inverse] != np.arange(len(rows)))
        locate = self.locate
        fast = {f: lay for f, lay in self.layouts.items() if lay is not None and locate}
        specs = {f: self._out_spec(f, layout) for f, layout in fast.items()}
        shapes = [((len(rows), *shape), dt) for shape, dt in specs.values()]
        shared = self.shared and bool(shapes)
        arena = Arena(shapes, shared, worker_pool() if shared else self.arenas)
        data: dict[str, np.ndarray] = dict(zip(fast, arena.arrays, strict=True))
        tasks: list[Task] = []
        for field, layout in fast.items():
            if locate is not None:
                tasks += layout.tasks(locate, uniq, data[field], self.seq_len, first)
        done = [self.pool.submit(t) for t in tasks]
        for field in self.layouts:
            if field not in fast:
                data[field] = read_rows(self.arrays[field], uniq, self.seq_len)[inverse]
        for fut in done:
            fut.result()
        if repeat.size:
            for field in fast:
                data[field][repeat] = data[field][first[inverse[repeat]]]
        data = {f: data[f] for f in self.arrays}
        tensors = to_tensors(self.manifest, rows, data, self.fields, self.seq_len, self.bases)
        tensors = {k: arena.adopt(t) for k, t in tensors.items()}
        nbytes = sum(
            t.numel() * t.element_size() for k, t in tensors.items() if k != "temperatures"
        )
        return RowBlock(tensors, np.arange(len(rows)), nbytes)
