"""CacheDataset: stream a teacher cache into student training, each row exactly once per epoch.

Order (see :mod:`kdcache.client._order`): shards are permuted and rows shuffled inside windows of
consecutive permuted shards, a pure function of (seed, epoch, cache id, window). Partitioning:
the order is dealt in units of ``batch_size`` rows to DDP ranks round-robin, and inside a rank to
DataLoader workers round-robin (the order in which a DataLoader collects their batches), so global
step i holds positions [i * G, (i + 1) * G) of the order for G = batch_size * world_size, for any
world size or worker count. Padding (repeating the order's first rows) or ``drop_last`` gives every
rank the same number of batches. Resume is arithmetic (see :mod:`kdcache.client._resume`).

Each DataLoader worker opens its own store (lazily, per process id, so fork and spawn both work)
and reads ahead in a background thread under a byte bound. Remote caches are read with retries,
optionally through a size-capped local disk cache of whole shard objects.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from kdcache.client._blocks import BlockReader, RowBlock, batches
from kdcache.client._diskcache import DiskCache
from kdcache.client._fields import expand_fields, stored_arrays
from kdcache.client._loader import CacheLoader
from kdcache.client._order import EpochOrder, PassPlan, Policy
from kdcache.client._prefetch import Prefetcher
from kdcache.client._remote import (
    RemoteStorage,
    download_objects,
    retry_call,
    shard_object_keys,
)
from kdcache.client._resume import DatasetState, ResumeError, resume_point
from kdcache.client._service import prefetch_rows
from kdcache.client._validate import check_ensemble_expectations
from kdcache.client.cache import hidden_bases, open_reader
from kdcache.client.ensemble import (
    as_sources,
    check_ensemble,
    check_weights,
    member_fields,
    merge_blocks,
)
from kdcache.core.errors import ShardIncompleteError
from kdcache.core.format import Manifest
from kdcache.core.reader import CacheReader
from kdcache.core.storage import LocalStorage, Storage, is_remote

__all__ = ["CacheDataset", "CacheLoader", "ResumeError"]

log = logging.getLogger(__name__)

Sample = dict[str, torch.Tensor]
DEFAULT_WINDOW_BYTES = 256 << 20


@dataclass
class _Opened:
    """One process's open cache: reader, arrays of the selected fields, remote storage, and the
    other teachers' caches of an ensemble."""

    pid: int
    reader: CacheReader
    blocks: BlockReader
    remote: RemoteStorage | None
    members: list[_Opened] = field(default_factory=list)


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _window_shards(m: Manifest, shuffle_window: int | None) -> int:
    """Shards per shuffle window: ``shuffle_window`` rows rounded up to whole shards, or by
    default as many shards as fit in 256 MiB of stored rows (never depends on ``fields``)."""
    per = m.rows_per_shard
    if shuffle_window is not None:
        if shuffle_window < 1:
            raise ValueError(f"shuffle_window must be >= 1 row; got {shuffle_window}")
        return max(1, -(-shuffle_window // per))
    row_bytes = sum(int(np.prod(s.row_shape)) * np.dtype(s.dtype).itemsize for s in m.arrays())
    return max(1, DEFAULT_WINDOW_BYTES // max(1, row_bytes * per))


def _local_locator(root: Path) -> Callable[[str], str | None]:
    def locate(key: str) -> str | None:
        path = root / key
        return str(path) if path.is_file() else None

    return locate


def _cache_locator(cache: DiskCache) -> Callable[[str], str | None]:
    def locate(key: str) -> str | None:
        path = cache.get(key)
        return None if path is None else str(path)

    return locate


class CacheDataset(IterableDataset[Sample]):
    """An IterableDataset over a teacher cache: one dict per row, each row once per epoch.

    source: a cache directory, ``s3://...`` URL, or ``http(s)://host/v1/caches/<id>`` service URL;
    or a list of them over the same rows, an ensemble of teachers (:mod:`kdcache.client.ensemble`:
    samples then carry ``teacher_weights`` and ``teacher{j}_<key>`` for each teacher's fields),
    with ``weights`` one per cache (normalised; uniform by default). The first cache decides
    the order, ``row``, ``input_ids`` and ``state_dict``.
    fields: field keys (``input_ids``, ``topk`` = the three topk keys, ``hidden_<layer>``,
    ``hidden`` = every layer); None for everything (in an ensemble, everything each cache
    holds). A sample is ``{"row": () int64,
    "input_ids": (T,) int64, "topk_logprobs": (T, k) float32, "topk_indices": (T, k) int64,
    "topk_logsumexp": (T, n_temps) float32, "temperatures": (n_temps,) float32,
    "loss_mask": (T,) bool, "hidden_<l>": (T, d) stored dtype}`` for the fields asked
    (``loss_mask`` comes with ``topk``); T is ``seq_len`` when cropping.
    rank, world_size: from torch.distributed when initialised, else 0 and 1, unless given.
    batch_size: rows per rank per step (the DataLoader's batch size). Steps then follow the global
    order exactly, and resume works across world sizes at step boundaries; None deals single rows.
    drop_last, pad: equal batch counts per rank by dropping the tail of the order, or (default)
    by repeating its first rows (``padded_rows`` says how many); both False leaves ranks unequal.
    shuffle_window: rows per shuffle window (rounded up to whole shards).
    prefetch_bytes: bound on decoded rows read ahead per process.
    cache_dir, cache_limit_bytes: local disk cache of remote shard objects and its size cap.
    token, storage_options: for the service (``KDCACHE_TOKEN`` by default) and for fsspec (S3).
    expect: what the run declares; any of ``vocab_size``, ``tokenizer_fingerprint`` or
    ``tokenizer`` (a directory), ``temperatures`` and ``layers`` (must be cached), ``topk``,
    ``seq_len``, ``cache_id``, ``teacher_fingerprint``, ``dataset_fingerprint``. Every mismatch is
    reported at once by a ManifestMismatchError before any row is read. For an ensemble every
    teacher's cache is checked; ``cache_id`` and ``teacher_fingerprint`` are then lists, one
    entry (or None) per cache.
    retries: attempts on transient remote errors; read_threads: decode threads per process.
    decode_hidden: for a ``pca:R`` cache, give ``hidden_<l>`` decoded to (T, d) float32 instead
    of its codes (T, R) (int8 / fp8 caches always decode to (T, d) float32).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        fields: Sequence[str] | str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        batch_size: int | None = None,
        drop_last: bool = False,
        pad: bool = True,
        seq_len: int | None = None,
        shuffle_window: int | None = None,
        prefetch_bytes: int = 256 << 20,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_limit_bytes: int = 16 << 30,
        token: str | None = None,
        storage_options: dict[str, Any] | None = None,
        expect: Mapping[str, Any] | None = None,
        retries: int = 3,
        read_threads: int = 4,
        decode_hidden: bool = False,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        d_rank, d_world = _dist_rank_world()
        self.rank = d_rank if rank is None else int(rank)
        self.world_size = d_world if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.sources = as_sources(source)
        self.source = self.sources[0]
        if weights is not None and len(self.sources) == 1:
            raise ValueError(
                "weights are for an ensemble of two or more caches; the source is one cache"
            )
        self.weights = check_weights(weights, len(self.sources)) if len(self.sources) > 1 else None
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.batch_size = batch_size
        self.policy: Policy = "drop" if drop_last else ("pad" if pad else "none")
        self.prefetch_bytes = int(prefetch_bytes)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.cache_limit_bytes = int(cache_limit_bytes)
        self.token, self.storage_options = token, storage_options
        self.retries, self.read_threads = int(retries), max(1, int(read_threads))
        self.decode_hidden = bool(decode_hidden)
        self._opened: _Opened | None = None
        reader = self._open_reader(None, self.source)
        self.manifest = reader.manifest
        m = self.manifest
        if not reader.is_complete:
            raise ShardIncompleteError(
                f"cache {m.cache_id} at {self.source} has {len(reader.completed())} of "
                f"{m.num_shards} shards complete; CacheDataset needs a complete cache"
            )
        self.fields = expand_fields(m, fields)
        self.member_manifests: list[Manifest] = []
        self.member_fields: list[list[str]] = []
        if len(self.sources) > 1:
            readers = [reader, *(self._open_reader(None, s) for s in self.sources[1:])]
            check_ensemble(readers, self.sources)
            self.member_manifests = [r.manifest for r in readers[1:]]
            # fields=None: each teacher's own fields (as MultiCache), not the first cache's
            asked = None if fields is None else self.fields
            self.member_fields = [
                member_fields(mm, asked, src)
                for mm, src in zip(self.member_manifests, self.sources[1:], strict=True)
            ]
        if seq_len is not None and not 1 <= seq_len <= m.seq_len:
            raise ValueError(
                f"seq_len must be in [1, {m.seq_len}] (the cached length); got {seq_len}"
            )
        self.seq_len = seq_len
        check_ensemble_expectations([m, *self.member_manifests], self.sources, expect)
        self.window_shards = _window_shards(m, shuffle_window)
        self.epoch, self._start, self._consumed = 0, 0, 0
        if self.policy == "none" and self.world_size > 1:
            log.warning("pad=False and drop_last=False: ranks may yield unequal numbers of rows")
        self._log_plan()

    def _log_plan(self) -> None:
        plan = self._plan()
        if plan.padded or plan.dropped:
            log.info(
                "%s %d rows of each epoch so all %d ranks get %d rows (global batch %d)",
                "repeating" if plan.padded else "dropping",
                plan.padded or plan.dropped,
                self.world_size,
                plan.length // self.world_size,
                self.global_batch,
            )

    def set_partition(self, rank: int, world_size: int, batch_size: int | None = None) -> None:
        """Deal rows to ``rank`` of ``world_size`` in units of ``batch_size`` (None: keep).

        For a trainer that learns the layout after the dataset was built (before the process
        group existed, say). A position inside the current pass is kept: it is carried over to
        the new layout as :meth:`load_state_dict` would.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        saved = self.state_dict() if (self._start or self._consumed) else None
        self.rank, self.world_size = int(rank), int(world_size)
        if batch_size is not None:
            self.batch_size = int(batch_size)
        if saved is not None:
            self.load_state_dict(saved)
        self._log_plan()

    # ---- opening, once per process -------------------------------------------------------
    def _open_reader(self, cache_id: str | None, source: str) -> CacheReader:
        """Open the cache; remote storage gets retries, and a disk cache once the id is known."""

        def wrap(storage: Storage) -> Storage:
            disk = None
            if self.cache_dir is not None and cache_id is not None:
                disk = DiskCache(self.cache_dir, self.cache_limit_bytes, namespace=cache_id)
            return RemoteStorage(storage, disk, retries=self.retries)

        return retry_call(
            lambda: open_reader(
                source,
                token=self.token,
                storage_options=self.storage_options,
                wrap_storage=wrap if is_remote(source) else None,
            ),
            self.retries,
            0.2,
            f"open {source}",
        )

    def _open_here(self) -> _Opened:
        """This process's open cache(s) (reopened after fork or unpickling)."""
        if self._opened is not None and self._opened.pid == os.getpid():
            return self._opened
        opened = self._open_one(self.source, self.manifest, self.fields)
        for m, src, names in zip(
            self.member_manifests, self.sources[1:], self.member_fields, strict=True
        ):
            opened.members.append(self._open_one(src, m, names))
        self._opened = opened
        return opened

    def _open_one(self, source: str, manifest: Manifest, fields: list[str]) -> _Opened:
        reader = self._open_reader(manifest.cache_id, source)
        names = stored_arrays(fields, reader.arrays)
        arrays = {f: reader.arrays[name] for f, name in names.items()}
        remote = reader.storage if isinstance(reader.storage, RemoteStorage) else None
        locate: Callable[[str], str | None] | None = None
        if remote is None and isinstance(reader.storage, LocalStorage):
            locate = _local_locator(reader.storage.root)
        elif remote is not None and remote.cache is not None:
            locate = _cache_locator(remote.cache)
        pool = ThreadPoolExecutor(self._threads_here(), thread_name_prefix="kdcache-read")
        bases = hidden_bases(reader) if self.decode_hidden else None
        shared = get_worker_info() is not None  # batches leave through torch's shared memory
        blocks = BlockReader(
            manifest, arrays, self.seq_len, pool, locate, fields, bases=bases, shared=shared
        )
        return _Opened(os.getpid(), reader, blocks, remote)

    def _threads_here(self) -> int:
        """Decode threads of this process: ``read_threads``, but inside a DataLoader worker no
        more than its share of the CPUs this process may use, so that N workers decode on N
        cores' worth of threads instead of N x ``read_threads`` threads fighting for them."""
        info = get_worker_info()
        if info is None:
            return self.read_threads
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
        return max(1, min(self.read_threads, cpus // info.num_workers))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_opened"] = None  # a store holds sockets and threads: each process opens its own
        return state

    # ---- order, partition, length ---------------------------------------------------------
    @property
    def cache_id(self) -> str:
        return self.manifest.cache_id

    @property
    def unit(self) -> int:
        return self.batch_size or 1

    @property
    def global_batch(self) -> int:
        return self.unit * self.world_size

    def epoch_order(self, epoch: int | None = None) -> EpochOrder:
        """The global order of ``epoch`` (default: the current one)."""
        m = self.manifest
        return EpochOrder(
            m.num_rows,
            m.rows_per_shard,
            cache_id=m.cache_id,
            seed=self.seed,
            epoch=self.epoch if epoch is None else epoch,
            shuffle=self.shuffle,
            window_shards=self.window_shards,
        )

    def _plan(self, start: int = 0) -> PassPlan:
        return PassPlan(self.manifest.num_rows, start, self.unit, self.world_size, self.policy)

    @property
    def padded_rows(self) -> int:
        """Rows a full epoch repeats (over all ranks) so every rank gets equal batches."""
        return self._plan().padded

    @property
    def dropped_rows(self) -> int:
        """Rows a full epoch leaves out with ``drop_last=True``."""
        return self._plan().dropped

    def __len__(self) -> int:
        """Rows this rank yields in a full epoch."""
        return self._plan().rank_rows(self.rank)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order; a new epoch starts from its beginning, the current one (e.g.
        after :meth:`load_state_dict`) keeps its position."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0; got {epoch}")
        if epoch != self.epoch:
            self.epoch, self._start, self._consumed = int(epoch), 0, 0

    # ---- resume ---------------------------------------------------------------------------
    def _state(self) -> DatasetState:
        m = self.manifest
        return DatasetState(
            cache_id=m.cache_id,
            num_rows=m.num_rows,
            seed=self.seed,
            shuffle=self.shuffle,
            window_shards=self.window_shards,
            epoch=self.epoch,
            world_size=self.world_size,
            unit=self.unit,
            policy=self.policy,
            start=self._start,
            consumed=self._consumed,
        )

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch: rows delivered in this process (by iterating the
        dataset here, or through :meth:`loader`) since the pass began. Save it from any rank."""
        return self._state().to_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved run's global order from where it stopped (no replay).

        Raises :class:`ResumeError` when this run cannot continue that order (another cache,
        seed or window; or a state taken mid-batch with another world size or batch size).
        """
        old = DatasetState.from_dict(state)
        start, skip = resume_point(old, self._state())
        self.epoch, self._start, self._consumed = old.epoch, start, skip

    def _end_pass(self) -> None:
        self._start, self._consumed = 0, 0

    def _count(self, rows: int) -> None:
        self._consumed += rows

    # ---- iteration ------------------------------------------------------------------------
    def _read(self, opened: _Opened, order: EpochOrder, positions: np.ndarray) -> RowBlock:
        """Decode the rows at ``positions`` (epoch positions of one window), of every teacher."""
        rows = order.rows_at(positions)
        block = self._read_rows(opened, rows)
        if not opened.members or self.weights is None:
            return block
        others = [self._read_rows(member, rows) for member in opened.members]
        return merge_blocks([block, *others], self.weights)

    @staticmethod
    def _read_rows(opened: _Opened, rows: np.ndarray) -> RowBlock:
        remote, blocks = opened.remote, opened.blocks
        if remote is None or remote.cache is None:
            names = [a.path for a in blocks.arrays.values()]
            prefetch_rows(opened.reader, names, rows)  # served caches: one or few requests
            return blocks.read(rows)
        shards = np.unique(rows // blocks.manifest.rows_per_shard).tolist()
        keys = shard_object_keys(list(blocks.arrays.values()), shards)
        with remote.cache.pinned(keys):
            download_objects(remote, keys, blocks.pool)
            return blocks.read(rows)

    def _blocks(
        self, opened: _Opened, plan: PassPlan, skip: int, worker: int, num_workers: int
    ) -> Iterator[RowBlock]:
        order = self.epoch_order()
        for positions in plan.slot_groups(order, self.rank, worker, num_workers, skip):
            yield self._read(opened, order, positions)

    def _pass_blocks(self) -> Iterator[RowBlock]:
        """This slot's blocks of the current pass, read ahead by a thread; ends the pass (in the
        main process) once the consumer asks past the last block."""
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers > 1 and self.batch_size is None and worker == 0:
            log.warning(
                "batch_size is unset with %d DataLoader workers: steps will not follow the global "
                "order; pass batch_size=<the DataLoader's batch size> (or use .loader())",
                num_workers,
            )
        opened = self._open_here()
        # the pass is fixed now: the counts below move while the thread reads ahead
        blocks = self._blocks(opened, self._plan(self._start), self._consumed, worker, num_workers)
        prefetch = Prefetcher(blocks, lambda b: b.nbytes, self.prefetch_bytes)
        try:
            yield from prefetch
            if info is None:
                self._end_pass()
        finally:
            prefetch.close()
            for o in (opened, *opened.members):
                o.blocks.end_pass()

    def __iter__(self) -> Iterator[Sample]:
        in_main = get_worker_info() is None
        for block in self._pass_blocks():
            for sample in block.samples():
                if in_main:
                    self._consumed += 1
                yield sample

    def iter_batches(self, batch_size: int) -> Iterator[Sample]:
        """The rows :meth:`__iter__` yields, in batches of ``batch_size`` (B, ...) as
        ``DataLoader(self, batch_size=batch_size)`` collates them, but without copying: a batch
        is a view of the decoded block (only one that spans two blocks is copied)."""
        in_main = get_worker_info() is None
        for batch in batches(self._pass_blocks(), batch_size):
            if in_main:
                self._consumed += len(batch["row"])
            yield batch

    def loader(self, batch_size: int | None = None, **kwargs: Any) -> CacheLoader:
        """A DataLoader over this dataset that counts delivered rows for :meth:`state_dict`.

        ``batch_size`` defaults to the dataset's and becomes it when the dataset has none;
        other keyword arguments go to ``torch.utils.data.DataLoader``.
        """
        size = batch_size or self.batch_size
        if size is None:
            raise ValueError("loader() needs a batch_size (here or in the dataset)")
        if self.batch_size is None:
            self.batch_size = size
        elif self.batch_size != size:
            raise ValueError(
                f"loader batch_size {size} differs from the dataset's batch_size "
                f"{self.batch_size}; they must match for steps to follow the global order"
            )
        return CacheLoader(self, size, **kwargs)

    def __repr__(self) -> str:
        return (
            f"CacheDataset({self.source!r}, fields={self.fields}, rows={self.manifest.num_rows}, "
            f"rank={self.rank}/{self.world_size}, epoch={self.epoch}, shuffle={self.shuffle})"
        )
