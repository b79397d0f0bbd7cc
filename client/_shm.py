"""DataLoader workers' batches in shared memory: decoded there, sent once per block.

A worker's batches reach the main process through a ``multiprocessing`` queue; torch pickles a
tensor by moving its storage into shared memory first, which for a block decoded into ordinary
memory is one more copy of every byte (into fresh pages) before the first batch of the block can
leave. Here the fast-path fields of a block are carved out of one shared storage allocated
before decoding (as ``default_collate`` does for the batches it stacks in a worker), so pickling
a batch only passes a handle to memory that already holds the values; :class:`Packer` and
:class:`Unpacker` then pass that handle once per block rather than once per tensor per batch.

Fresh shared memory costs a page fault per 4 KiB on first write, and torch creates a new
shared-memory object for each storage: more CPU than decoding the block. A worker therefore
reuses a block's storage for a later block once nothing holds it (:class:`ArenaPool`): the main
process marks a storage's id on a shared release board when its batches' tensors are gone, and the
worker checks that no tensor of its own still views it. A dataset read without workers reuses its
blocks' private memory the same way, by the use count alone.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Arena",
    "ArenaPool",
    "PackedBatch",
    "Packer",
    "Unpacker",
    "release_board",
    "use_pool",
    "worker_pool",
]

_ALIGN = 64
_MIN_MAPPED = 1 << 20
INLINE_BYTES = 64 << 10
_MADV_POPULATE_WRITE = 23  # Linux 5.14+; not among Python 3.11's mmap constants
RELEASE_SLOTS = 1 << 20  # storage ids per worker and pass the board has room for
# free storages a pool keeps beyond the one it hands out: one, so a pass holds at most one spare
# block beyond those in use (keeping none lost a third of the reuse when two blocks were let go
# at once); the main process keeps a few mappings per worker of storages the worker may reuse
KEEP_IDLE = 1
KEEP_MAPPED = 3

_POOL: ArenaPool | None = None  # this process's pool while a DataLoader worker iterates
# False: every block decoded into fresh memory, nothing reused (as before pools; for benches)
REUSE = True


def _use_count(storage: torch.UntypedStorage) -> int | None:
    """References to the storage's memory in this process (tensors, storages), or None where
    this torch does not say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(storage._cdata))


def _held_only_by_caller(storage: torch.UntypedStorage) -> bool:
    """Whether the caller's one reference is all that holds ``storage`` in this process: no
    tensor views it (its use count: ours) and no other object holds the storage object itself
    (its Python reference count: the caller's, this call's argument and getrefcount's)."""
    return _use_count(storage) == 1 and sys.getrefcount(storage) == 3


def release_board(workers: int) -> torch.Tensor:
    """(workers, RELEASE_SLOTS) uint8 in shared memory, zero: the main process sets [w, i] when
    it holds nothing of the storage worker w sent as id i (see :class:`ArenaPool`): 1 MiB per
    worker. Made before the workers start, so each inherits it (fork) or receives it with the
    dataset (spawn)."""
    return torch.zeros((max(workers, 1), RELEASE_SLOTS), dtype=torch.uint8).share_memory_()


def worker_pool() -> ArenaPool | None:
    """The pool of this DataLoader worker's pass (see :func:`use_pool`), if any."""
    return _POOL


@contextlib.contextmanager
def use_pool(pool: ArenaPool) -> Any:
    """Shared arenas made in this process come from ``pool`` while the block is open."""
    global _POOL
    previous, _POOL = _POOL, pool
    try:
        yield pool
    finally:
        _POOL = previous


@dataclass
class _Held:
    storage: torch.UntypedStorage
    ids: set[int]


class ArenaPool:
    """Storages for decoded blocks, reused for later blocks once nothing holds them.

    With a ``board`` (this DataLoader worker's row of :func:`release_board`) the storages are
    shared memory the worker sends to the main process; without one, private memory of this
    process (a dataset read without workers). A storage is free when (1) with a board, the main
    process has released every id the worker sent it under (the packer never refers to an id
    again once a batch leaves it out, so after the release no batch in flight or to come uses
    it) and (2) this process holds no other reference to its memory (a block still being
    batched, a batch not yet pickled or still in the caller's hands). Only then is it handed out
    again, so no reader can see a block's values change. At most ``keep`` free storages are
    kept; the rest are let go. Where torch cannot count references the pool never reuses
    (every arena is fresh, as without it).
    """

    def __init__(self, board: np.ndarray | None = None, keep: int = KEEP_IDLE) -> None:
        self.board = board
        self.shared = board is not None
        self.keep = keep
        self._held: dict[int, _Held] = {}  # data_ptr -> storage and the ids it went out under
        self._lock = threading.Lock()  # blocks may be decoded in a read-ahead thread
        self.reused = 0
        self.made = 0

    def new(self, nbytes: int) -> torch.UntypedStorage:
        """A shared storage of at least ``nbytes``: the smallest free one that holds them, else
        a fresh one."""
        with self._lock:
            return self._new(nbytes)

    def _new(self, nbytes: int) -> torch.UntypedStorage:
        if not REUSE:
            self.made += 1
            return _fresh(nbytes, self.shared)
        free = [h for h in self._held.values() if self._is_free(h)]
        fits = [h for h in free if nbytes <= h.storage.nbytes()]  # already paid for: any size
        pick = min(fits, key=lambda h: h.storage.nbytes()) if fits else None
        idle = [h for h in free if h is not pick]
        for h in sorted(idle, key=lambda h: h.storage.nbytes())[: max(len(idle) - self.keep, 0)]:
            del self._held[h.storage.data_ptr()]
        if pick is not None:
            self.reused += 1
            return pick.storage
        storage = _fresh(nbytes, self.shared)
        self.made += 1
        if _use_count(storage) is not None:
            self._held[storage.data_ptr()] = _Held(storage, set())
        return storage

    def sent(self, sid: int, storage: torch.UntypedStorage) -> None:
        """``storage`` went to the main process as id ``sid``."""
        with self._lock:
            self._sent(sid, storage)

    def clear(self) -> None:
        """Let go of every storage (each lives on while anything else holds it)."""
        with self._lock:
            self._held.clear()

    def _sent(self, sid: int, storage: torch.UntypedStorage) -> None:
        h = self._held.get(storage.data_ptr())
        if h is None or h.storage.nbytes() != storage.nbytes() or self.board is None:
            return
        if sid >= self.board.shape[0]:  # no slot to hear back on: never reuse it
            del self._held[storage.data_ptr()]
            return
        h.ids.add(sid)

    def _is_free(self, h: _Held) -> bool:
        board = self.board
        h.ids = {i for i in h.ids if not board[i]} if board is not None else h.ids
        return not h.ids and _held_only_by_caller(h.storage)  # h's reference


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
        self,
        specs: Sequence[tuple[tuple[int, ...], np.dtype[Any]]],
        shared: bool = False,
        pool: ArenaPool | None = None,
    ) -> None:
        offsets, end = [], 0
        for shape, dtype in specs:
            offsets.append(end)
            end += -(-_nbytes(shape, dtype) // _ALIGN) * _ALIGN
        self.nbytes = end
        self.storage: torch.UntypedStorage | None = None  # set when shared
        size = max(end, 1)
        if pool is not None and pool.shared == shared:
            storage = pool.new(size)
        else:
            storage = _fresh(size, shared)
        if shared:
            self.storage = storage
        raw = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
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


def _fresh(nbytes: int, shared: bool) -> torch.UntypedStorage:
    """A new storage: torch shared memory, or a private mapping (kept alive by the storage)."""
    if shared:
        return torch.UntypedStorage._new_shared(nbytes)
    return torch.from_numpy(_mapped(nbytes)).untyped_storage()


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
    arenas: tuple[int, int] = (0, 0)  # the worker's pool so far: storages made, reused


class Packer:
    """Worker side: sends each shared storage (a decoded block) once, then views of it.

    torch pickles every tensor of a batch with a file descriptor of its storage, passed to the
    main process through a socket connection per tensor; a batch of seven fields costs seven
    such round trips, more than decoding it. Here a block's storage crosses with the first
    batch that uses it, and later batches carry offsets and strides. The packer holds each
    storage it sent until a batch no longer uses it (blocks are consumed in order), so a
    storage's address cannot be reused while the main process may still look it up by id.
    """

    def __init__(self, worker: int, pool: ArenaPool | None = None) -> None:
        self.worker = worker
        self.pool = pool
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
                if self.pool is not None:
                    self.pool.sent(entry[0], s)
            used[ptr] = entry
            offset = int(t.storage_offset())
            items[key] = _View(entry[0], t.dtype, offset, tuple(t.shape), tuple(t.stride()))
        self._sent = used
        arenas = (self.pool.made, self.pool.reused) if self.pool is not None else (0, 0)
        return PackedBatch(self.worker, new, tuple(i for i, _ in used.values()), items, arenas)


class Unpacker:
    """Main-process side of :class:`Packer`: rebuilds each batch's tensors as views of the
    storages received, dropping a storage once its worker no longer refers to it.

    With a ``board`` (see :func:`release_board`), a dropped storage is released to its worker
    once no tensor here views it, and its mapping is kept (a few per worker): when the worker
    sends the storage again with a later block, torch finds the mapping by the shared object's
    inode and maps nothing anew, so reading the block costs no page faults either.
    """

    def __init__(self, board: torch.Tensor | None = None) -> None:
        self._storages: dict[tuple[int, int], torch.UntypedStorage] = {}
        self._board = board.numpy() if board is not None else None
        self._idle: list[tuple[int, int, torch.UntypedStorage]] = []  # dropped, maybe in use
        self._kept: dict[int, tuple[int, torch.UntypedStorage]] = {}  # data_ptr -> released
        self.arenas: dict[int, tuple[int, int]] = {}  # worker -> shared storages made, reused

    def _release(self) -> None:
        board = self._board
        if board is None:
            return
        idle, self._idle = self._idle, []
        while idle:
            w, i, s = idle.pop()
            if not _held_only_by_caller(s):  # s's reference
                self._idle.append((w, i, s))
                continue
            if i < board.shape[1]:
                board[w, i] = 1
            self._kept[s.data_ptr()] = (w, s)
            mine = [p for p, (v, _) in self._kept.items() if v == w]
            for p in mine[: max(len(mine) - KEEP_MAPPED, 0)]:  # oldest first
                del self._kept[p]
            del s

    def unpack(self, packed: PackedBatch) -> dict[str, torch.Tensor]:
        w = packed.worker
        self.arenas[w] = packed.arenas
        for i, t in packed.storages.items():
            storage = t.untyped_storage()
            self._kept.pop(storage.data_ptr(), None)  # a kept mapping, in use again
            self._storages[(w, i)] = storage
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
            if self._board is not None:
                self._idle.append((*k, self._storages[k]))
            del self._storages[k]
        self._release()
        return out
