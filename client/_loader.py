"""CacheLoader: a DataLoader over a CacheDataset that tells the dataset what training received.

With DataLoader workers the rows are produced in other processes, and read ahead, so only the
main process knows which batches training actually got. The loader counts them into the
dataset, which makes ``dataset.state_dict()`` exact at any step.

Batches are made by the dataset (:meth:`CacheDataset.iter_batches`: views of decoded blocks)
rather than collated row by row by the DataLoader, which would copy every row once more, in the
main process when there are no workers. A worker decodes a block into shared memory and sends
it to the main process once; its batches then cross as offsets into it (:mod:`._shm`), so they
are neither copied nor passed as one file descriptor per tensor.

With ``pin_memory=True`` where torch pins, workers' batches still cross packed: the loader pins
them itself, in a thread of its own (as the DataLoader's pinning thread would), after unpacking.
Left to the DataLoader, its pinning thread would need torch's own tensors from the workers, one
file descriptor per tensor per batch and each block copied into fresh shared memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.client import _shm
from kdcache.client._prefetch import Prefetcher
from kdcache.client._shm import ArenaPool, PackedBatch, Packer, Unpacker, release_board, use_pool

if TYPE_CHECKING:
    from kdcache.client.dataset import CacheDataset

__all__ = ["CacheLoader"]


class _Batches(IterableDataset[Any]):
    """The dataset's batches as the items of an IterableDataset (a DataLoader with
    ``batch_size=None`` passes them through as they are); ``pack``: in a worker, as
    :class:`PackedBatch` es (see :mod:`kdcache.client._shm`); False sends torch's own tensors
    (what ``bench/stream.py`` compares packing with)."""

    def __init__(self, dataset: CacheDataset, batch_size: int, pack: bool = True) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.pack = pack
        self.board: torch.Tensor | None = None  # this pass's release board (set per iteration)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        batches = self.dataset.iter_batches(self.batch_size)
        info = get_worker_info()
        if not self.pack or info is None:
            return batches
        board = self.board
        pool = None if board is None else ArenaPool(board[info.id].numpy())
        return _packed(batches, Packer(info.id, pool), pool)


def _packed(
    batches: Iterator[Any], packer: Packer, pool: ArenaPool | None
) -> Iterator[PackedBatch]:
    """A worker's batches packed by one packer (each block's storage sent once); with a pool,
    its blocks decoded into storages the pool reuses."""
    with use_pool(pool) if pool is not None else contextlib.nullcontext():
        for b in batches:
            yield packer.pack(b)


def _pins() -> bool:
    """Whether a DataLoader with ``pin_memory=True`` pins here (as torch decides it)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:  # torch < 2.6: its DataLoader pins where CUDA is
        return bool(torch.cuda.is_available())
    if not accelerator.is_available():
        return False
    acc = accelerator.current_accelerator()
    return acc is not None and acc.type != "mps"


PINNED_AHEAD = 2
"""Pinned batches the loader's pinning thread keeps ready (the DataLoader's own keeps its
workers' prefetch, and pins them one at a time)."""


def _pin(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's tensors copied into pinned (page-locked) memory."""
    return {k: v.pin_memory() for k, v in batch.items()}


def _current_device() -> int | None:
    """The current accelerator's device index (the pinning thread sets it, as torch's does, so
    pinning creates no context on another device), or None where torch has no such notion."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return int(accelerator.current_device_index())
    return int(torch.cuda.current_device()) if torch.cuda.is_available() else None


def _pinned(
    batches: Iterator[dict[str, torch.Tensor]], device: int | None
) -> Iterator[dict[str, torch.Tensor]]:
    """Run in the pinning thread: each batch (unpacked there) pinned. The unpacked views are
    dropped once pinned, so their storages go back to the workers' pools."""
    torch.set_num_threads(1)  # thread-local: one copy must not take every core
    if device is not None:
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None:
            accelerator.set_device_index(device)
        else:
            torch.cuda.set_device(device)
    for batch in batches:
        pinned = _pin(batch)
        del batch  # not held while the pinned copy waits for the caller
        yield pinned


class CacheLoader:
    """Iterate batches of a :class:`CacheDataset`: dicts of (B, ...) tensors.

    Keyword arguments go to ``torch.utils.data.DataLoader`` (``num_workers``, ``pin_memory``,
    ``multiprocessing_context``, ``prefetch_factor`` ...). ``persistent_workers`` is refused:
    persistent workers keep the dataset copy of the first epoch and would miss ``set_epoch``
    and ``load_state_dict``.

    On a GPU host give it a worker or two: without workers the cache is decoded in threads of
    the training process, which contend with the training loop for the GIL. With workers and
    ``pin_memory=True`` the loader pins their batches itself, in a thread of its own
    (``self.dataloader.pin_memory`` is then False), so they still cross as shared-memory views.
    """

    def __init__(self, dataset: CacheDataset, batch_size: int, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError(
                "persistent_workers=True would keep each worker's copy of the dataset from the "
                "first epoch, so set_epoch and load_state_dict would not reach them"
            )
        for key in ("sampler", "batch_sampler", "shuffle", "drop_last"):
            if key in kwargs:
                raise ValueError(
                    f"{key!r} is decided by the CacheDataset (shuffle, drop_last, pad), not the "
                    "loader"
                )
        self.dataset = dataset
        self.batch_size = batch_size
        # where torch would pin (not without an accelerator, nor on MPS), workers' batches are
        # pinned here, after unpacking, so they still cross packed; without workers the
        # DataLoader pins its own batches in the main thread, as the dataset counts them there
        workers = int(kwargs.get("num_workers", 0))
        self._pin = bool(kwargs.get("pin_memory")) and _pins() and workers > 0
        if self._pin:
            kwargs = {**kwargs, "pin_memory": False}
        self._batches = _Batches(dataset, batch_size)
        # per worker, in the last pass: shared storages made and reused for blocks (workers only)
        self.arenas: dict[int, tuple[int, int]] = {}
        self.dataloader: DataLoader[Any] = DataLoader(self._batches, batch_size=None, **kwargs)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        workers = self.dataloader.num_workers
        counting = workers > 0  # without workers the dataset counts itself
        # a fresh board each pass: its workers are new, and number the storages they send anew
        board = release_board(workers) if workers and self._batches.pack and _shm.REUSE else None
        self._batches.board = board
        unpacker = Unpacker(board)
        self.arenas = unpacker.arenas
        items = iter(self.dataloader)  # workers start here, in the calling thread
        batches: Iterator[dict[str, torch.Tensor]] = (
            unpacker.unpack(i) if isinstance(i, PackedBatch) else i for i in items
        )
        pinned = None
        if self._pin:  # unpacked and pinned in the pinning thread
            pinned = Prefetcher(
                _pinned(batches, _current_device()), lambda _: 1, PINNED_AHEAD, name="kdcache-pin"
            )
            batches = pinned
        try:
            for batch in batches:
                if counting:
                    self.dataset._count(len(batch["row"]))
                yield batch
        finally:
            if pinned is not None:
                pinned.close()
        if counting:
            self.dataset._end_pass()
