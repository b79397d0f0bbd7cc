"""The global row order of an epoch, and which positions of it each (rank, worker) slot serves.

The order is a pure function of (seed, epoch, cache id, window): shards are permuted, consecutive
groups of ``window_shards`` permuted shards form a *window*, and rows are shuffled inside each
window. Reads stay local (a slot touches one window's shards at a time) and the order never
depends on the world size, the batch size or the number of DataLoader workers.

A *pass* serves the positions ``[start, N)`` of that order, then pads (repeating the first rows of
the order) or drops the tail so that the pass length ``L`` is a multiple of the global batch
``G = unit * world_size``. Position ``s`` of the pass belongs to unit ``u = s // unit``; unit ``u``
goes to rank ``u % world_size`` and, inside the rank, to DataLoader worker
``(u // world_size) % num_workers``, which is the order in which a DataLoader collects its
workers' batches. So global step ``i`` always holds the pass positions ``[i * G, (i + 1) * G)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["EpochOrder", "PassPlan", "Policy"]

Policy = Literal["pad", "drop", "none"]


def _cache_seed(cache_id: str) -> int:
    return int.from_bytes(hashlib.sha256(cache_id.encode()).digest()[:8], "little")


class EpochOrder:
    """The global order of one epoch: position ``p`` in ``[0, N)`` -> row ``rows_at(p)``.

    Only the shard permutation (one int per shard) is held; each window's row permutation is
    computed on demand from its own seed, so any window can be found without the others.
    """

    def __init__(
        self,
        num_rows: int,
        rows_per_shard: int,
        *,
        cache_id: str,
        seed: int,
        epoch: int,
        shuffle: bool,
        window_shards: int,
    ) -> None:
        if seed < 0 or epoch < 0:
            raise ValueError(f"seed and epoch must be >= 0; got seed={seed}, epoch={epoch}")
        if window_shards < 1:
            raise ValueError(
                f"the shuffle window must hold at least one shard; got {window_shards}"
            )
        self.num_rows = num_rows
        self.rows_per_shard = rows_per_shard
        self.shuffle = shuffle
        self._key = [seed, epoch, _cache_seed(cache_id)]
        n_shards = -(-num_rows // rows_per_shard)
        if shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([*self._key, 0]))
            self.shards = rng.permutation(n_shards)
        else:
            self.shards = np.arange(n_shards)
        sizes = np.minimum(rows_per_shard, num_rows - self.shards * rows_per_shard)
        self._groups = [
            self.shards[i : i + window_shards] for i in range(0, n_shards, window_shards)
        ]
        win_sizes = [
            int(sizes[i : i + window_shards].sum()) for i in range(0, n_shards, window_shards)
        ]
        self.window_starts = np.concatenate([[0], np.cumsum(win_sizes)]).astype(np.int64)
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def num_windows(self) -> int:
        return len(self._groups)

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        """Window index of each epoch position."""
        return np.searchsorted(self.window_starts, positions, side="right") - 1

    def window_rows(self, k: int) -> np.ndarray:
        """Rows of window ``k`` in epoch order: (rows in the window,) int64."""
        if self._cached is not None and self._cached[0] == k:
            return self._cached[1]
        per = self.rows_per_shard
        rows = np.concatenate(
            [np.arange(s * per, min((s + 1) * per, self.num_rows)) for s in self._groups[k]]
        ).astype(np.int64)
        if self.shuffle:
            rng = np.random.default_rng(np.random.SeedSequence([*self._key, 1, k]))
            rows = rows[rng.permutation(len(rows))]
        self._cached = (k, rows)
        return rows

    def shards_of_window(self, k: int) -> list[int]:
        return [int(s) for s in self._groups[k]]

    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        """Rows at epoch positions that all lie in one window."""
        if positions.size == 0:
            return np.empty(0, dtype=np.int64)
        k = int(self.window_of(positions[:1])[0])
        return self.window_rows(k)[positions - self.window_starts[k]]

    def all_rows(self) -> np.ndarray:
        """The whole epoch order: (N,) int64. For tests and small caches."""
        return np.concatenate([self.window_rows(k) for k in range(self.num_windows)])


@dataclass(frozen=True)
class PassPlan:
    """One pass over an epoch from position ``start``: its length, padding and slot schedule.

    ``unit``: rows per rank per global step (the per-rank batch size; 1 without one).
    ``policy``: ``"pad"`` repeats the first rows of the order up to a multiple of the global
    batch, ``"drop"`` drops the tail, ``"none"`` leaves ranks with unequal counts (evaluation).
    """

    num_rows: int
    start: int
    unit: int
    world_size: int
    policy: Policy = "pad"

    @property
    def global_batch(self) -> int:
        return self.unit * self.world_size

    @property
    def fresh(self) -> int:
        """Positions of the order this pass serves, before padding or dropping."""
        return max(0, self.num_rows - self.start)

    @property
    def length(self) -> int:
        g, n = self.global_batch, self.fresh
        if self.policy == "pad":
            return n + (-n) % g
        if self.policy == "drop":
            return n - n % g
        return n

    @property
    def padded(self) -> int:
        """Rows served twice in this pass (repeats of the order's first rows)."""
        return max(0, self.length - self.fresh)

    @property
    def dropped(self) -> int:
        """Rows of the order this pass leaves out."""
        return max(0, self.fresh - self.length)

    def rank_rows(self, rank: int) -> int:
        """Rows rank ``rank`` yields in this pass."""
        full, part = divmod(self.length, self.unit)
        ws = self.world_size
        units = (full - rank + ws - 1) // ws if full > rank else 0
        return units * self.unit + (part if full % ws == rank else 0)

    def epoch_position(self, s: np.ndarray) -> np.ndarray:
        """Pass positions -> epoch positions (padding wraps to the order's first rows)."""
        n = self.fresh
        return np.where(s < n, self.start + s, (s - n) % max(self.num_rows, 1))

    def slot_positions(
        self, lo: int, hi: int, rank: int, worker: int, num_workers: int, skip: int
    ) -> np.ndarray:
        """Pass positions in ``[lo, hi)`` of slot (rank, worker), ascending, past the first
        ``skip`` rows the rank already delivered."""
        b, ws = self.unit, self.world_size
        q, period = worker * ws + rank, ws * num_workers
        hi = min(hi, self.length)
        if hi <= lo:
            return np.empty(0, dtype=np.int64)
        u_lo, u_hi = lo // b, (hi - 1) // b
        first = u_lo + (q - u_lo) % period
        units = np.arange(first, u_hi + 1, period, dtype=np.int64)
        pos = (units[:, None] * b + np.arange(b, dtype=np.int64)[None, :]).ravel()
        pos = pos[(pos >= lo) & (pos < hi)]
        if skip:
            local = (pos // b // ws) * b + pos % b
            pos = pos[local >= skip]
        return pos

    def slot_groups(
        self, order: EpochOrder, rank: int, worker: int, num_workers: int, skip: int = 0
    ) -> Iterator[np.ndarray]:
        """The slot's epoch positions, in serving order, one array per window touched."""
        n = self.fresh
        first = int(order.window_of(np.array([self.start]))[0]) if n else order.num_windows
        for k in range(first, order.num_windows):
            a, b = int(order.window_starts[k]), int(order.window_starts[k + 1])
            s = self.slot_positions(
                max(a, self.start) - self.start, b - self.start, rank, worker, num_workers, skip
            )
            if s.size:
                yield self.epoch_position(s)
        pad = self.slot_positions(n, self.length, rank, worker, num_workers, skip)
        if pad.size:
            e = self.epoch_position(pad)
            w = order.window_of(e)
            cuts = np.flatnonzero(np.diff(w)) + 1
            yield from np.split(e, cuts)
