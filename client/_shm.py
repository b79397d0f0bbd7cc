"""DataLoader workers' batches in shared memory: decoded there, sent once per block.

A worker's batches reach the main process through a ``multiprocessing`` queue; torch pickles a
tensor by moving its storage into shared memory first, which for a block decoded into ordinary
memory is one more copy of every byte (into fresh pages) before the first batch of the block can
leave. Here the fast-path fields of a block are carved out of one shared storage allocated
before decoding (as ``default_collate`` does for the batches it stacks in a worker), so pickling
a batch only passes a handle to memory that already holds the values; :class:`Packer` and
:class:`Unpacker` then pass that handle once per block rather than once per tensor per batch.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["PackedBatch", "Packer", "Arena", "Unpacker"]

_ALIGN = 64
_MIN_MAPPED = 1 << 20
INLINE_BYTES = 64 << 10
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; not among Python 3.11's mmap constants


class Arena:
    """One buffer holding arrays of the given ``(shape, dtype)`` each, its pages mapped up front.

    ``arrays``: numpy views to decode into, in the order given. Writing fresh memory page by
    page costs a page fault per 4 KiB, which on a loaded machine cost more CPU than decoding
    the values (0.8 s of system time per 344 MB here); the arena's memory is mapped in one call
    instead: ``shared`` (for a DataLoader worker) as one torch shared-memory storage, otherwise
    an anonymous mapping populated by ``madvise`` (transparent huge pages where the kernel gives
    them). :meth:`adopt` turns a tensor made from a shared arena's array
    (``torch.from_numpy``, possibly re-viewed, e.g. as bfloat16) into a tensor on the shared
    storage itself, which torch then sends without copying.
    """

    def __init__(
        self, specs: Sequence[tuple[tuple[int, ...], np.dtype[Any]]], shared: bool = False
    ) -> None:
        offsets, end = [], 0
        for shape, dtype in specs:
            offsets.append(end)
            end += -(-_nbytes(shape, dtype) // _ALIGN) * _ALIGN
        self.nbytes = end
        self.storage: torch.UntypedStorage | None = None
        if shared:
            self.storage = torch.UntypedStorage._new_shared(max(end, 1))
            raw = torch.empty(0, dtype=torch.uint8).set_(self.storage).numpy()
        else:
            raw = _mapped(max(end, 1))
        self.base = int(raw.ctypes.data)
        self.arrays = [
            raw[o : o + _nbytes(shape, dt)].view(dt).reshape(shape)
            for o, (shape, dt) in zip(offsets, specs, strict=True)
        ]

    def adopt(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a view of the shared storage when its memory lies in it, else ``t``."""
        offset = t.data_ptr() - self.base
        if self.storage is None or not 0 <= offset < self.nbytes or t.numel() == 0:
            return t
        if offset % t.element_size():
            return t
        out = torch.empty(0, dtype=t.dtype)
        return out.set_(self.storage, offset // t.element_size(), t.shape, t.stride())


def _nbytes(shape: tuple[int, ...], dtype: np.dtype[Any]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _mapped(nbytes: int) -> np.ndarray:
    """(nbytes,) uint8 of private memory, its pages allocated in one call (huge pages where the
    kernel has them) on Linux; the array keeps the mapping alive, unmapped with its last view."""
    if sys.platform != "linux" or nbytes < _MIN_MAPPED:
        return np.empty(nbytes, dtype=np.uint8)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in (mmap.MADV_HUGEPAGE, _MADV_POPULATE_WRITE):  # huge pages first, then fill
        with contextlib.suppress(OSError):  # an older kernel: pages fault in as written
            m.madvise(advice)
    return np.frombuffer(m, dtype=np.uint8)


@dataclass(frozen=True)
class _View:
    """A tensor as a view of a storage its worker sent earlier (or with this batch)."""

    storage: int
    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Inline:
    """A small tensor that is not in shared memory, sent by value (its bytes pickled)."""

    data: np.ndarray
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> _Inline:
        flat = t.detach().contiguous().view(-1)
        return cls(flat.view(torch.uint8).numpy(), t.dtype, tuple(t.shape))

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.data).view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class PackedBatch:
    """A batch as it crosses from a DataLoader worker: shared storages it needs that were not
    sent before (``storages``: id -> 1-D uint8 tensor over the whole storage), the ids the
    worker may still refer to (``live``), and each key's tensor or :class:`_View`."""

    worker: int
    storages: dict[int, torch.Tensor]
    live: tuple[int, ...]
    items: dict[str, torch.Tensor | _View | _Inline]


class Packer:
    """Worker side: sends each shared storage (a decoded block) once, then views of it.

    torch pickles every tensor of a batch with a file descriptor of its storage, passed to the
    main process through a socket connection per tensor; a batch of seven fields costs seven
    such round trips, more than decoding it. Here a block's storage crosses with the first
    batch that uses it, and later batches carry offsets and strides. The packer holds each
    storage it sent until a batch no longer uses it (blocks are consumed in order), so a
    storage's address cannot be reused while the main process may still look it up by id.
    """

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self._sent: dict[int, tuple[int, torch.UntypedStorage]] = {}
        self._next = 0

    def pack(self, batch: Mapping[str, torch.Tensor]) -> PackedBatch:
        new: dict[int, torch.Tensor] = {}
        items: dict[str, torch.Tensor | _View | _Inline] = {}
        used: dict[int, tuple[int, torch.UntypedStorage]] = {}
        for key, t in batch.items():
            s = t.untyped_storage()
            if not s.is_shared():
                small = t.numel() * t.element_size() <= INLINE_BYTES
                # row ids, temperatures: cheaper by value than by a file descriptor; anything
                # else takes torch's own path (copied into shared memory once)
                items[key] = _Inline.of(t) if small else t
                continue
            ptr = s.data_ptr()
            entry = used.get(ptr) or self._sent.get(ptr)
            if entry is None or entry[1].nbytes() != s.nbytes():
                entry = (self._next, s)
                self._next += 1
                new[entry[0]] = torch.empty(0, dtype=torch.uint8).set_(s)
            used[ptr] = entry
            offset = int(t.storage_offset())
            items[key] = _View(entry[0], t.dtype, offset, tuple(t.shape), tuple(t.stride()))
        self._sent = used
        return PackedBatch(self.worker, new, tuple(i for i, _ in used.values()), items)


class Unpacker:
    """Main-process side of :class:`Packer`: rebuilds each batch's tensors as views of the
    storages received, dropping a storage once its worker no longer refers to it."""

    def __init__(self) -> None:
        self._storages: dict[tuple[int, int], torch.UntypedStorage] = {}

    def unpack(self, packed: PackedBatch) -> dict[str, torch.Tensor]:
        w = packed.worker
        for i, t in packed.storages.items():
            self._storages[(w, i)] = t.untyped_storage()
        out: dict[str, torch.Tensor] = {}
        for key, v in packed.items.items():
            if isinstance(v, _View):
                s = self._storages[(w, v.storage)]
                out[key] = torch.empty(0, dtype=v.dtype).set_(s, v.offset, v.shape, v.stride)
            elif isinstance(v, _Inline):
                out[key] = v.tensor()
            else:
                out[key] = v
        live = set(packed.live)
        for k in [k for k in self._storages if k[0] == w and k[1] not in live]:
            del self._storages[k]
        return out
