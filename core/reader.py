"""Read a cache: the manifest, completed shards, and rows of any array as numpy.

Only rows of completed shards are readable: a shard without a completion record may be half
written (a worker died), so reading it raises :class:`ShardIncompleteError`. bfloat16 arrays come
back as their uint16 bits; ``kdcache.client`` views them as ``torch.bfloat16``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from kdcache.core.errors import (
    CacheFormatError,
    CacheNotFoundError,
    IntegrityError,
    KDCacheError,
    ShardIncompleteError,
)
from kdcache.core.format import MANIFEST_KEY, Manifest
from kdcache.core.layout import shard_key
from kdcache.core.shards import ShardRecord, checksum, list_records
from kdcache.core.storage import Storage, open_storage

__all__ = ["CacheReader", "ShardCheck", "corrupt_as_integrity_error", "load_manifest"]

Rows = slice | Sequence[int] | np.ndarray
# What decoding a corrupt chunk raises: zarr's CRC-32C check (ValueError), Blosc (RuntimeError),
# a garbled shard index or chunk of the wrong size (ValueError, TypeError, IndexError).
_DECODE_ERRORS = (ValueError, RuntimeError, TypeError, IndexError)


@contextmanager
def corrupt_as_integrity_error(where: str, array: str, shards: Iterable[int]) -> Iterator[None]:
    """Turn a failure to decode stored chunks into an :class:`IntegrityError` naming the array
    and the shards read, so a corrupt chunk is never mistaken for a bad argument."""
    try:
        yield
    except KDCacheError:
        raise
    except _DECODE_ERRORS as err:
        raise IntegrityError(
            f"{where}: {array} of shard(s) {sorted(set(shards))[:8]} cannot be decoded "
            f"({type(err).__name__}: {err}); the stored bytes are corrupt (kdcache verify)"
        ) from err


def load_manifest(group: zarr.Group, where: str) -> Manifest:
    raw = group.attrs.get(MANIFEST_KEY)
    if raw is None:
        raise CacheFormatError(f"{where} is a Zarr group without a kdcache manifest")
    return Manifest.from_dict(dict(raw))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ShardCheck:
    """The outcome of checking one completed shard against its record."""

    shard: int
    ok: bool
    problems: tuple[str, ...] = ()


class CacheReader:
    """Random access to a cache's completed rows.

    ``completed`` overrides where completion records come from (the service passes its
    database's view; by default they are read from the cache's ``_kdcache/shards``).
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: dict[str, Any] | None = None,
        storage: Storage | None = None,
        completed: Callable[[], Mapping[int, ShardRecord]] | None = None,
    ) -> None:
        self.url = str(url)
        self.storage = storage or open_storage(self.url, storage_options)
        try:
            self.group = zarr.open_group(
                self.storage.zarr_store(read_only=True), mode="r", zarr_format=3
            )
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, json.JSONDecodeError) as err:
            raise CacheNotFoundError(f"no kdcache cache at {self.url}: {err}") from None
        self.manifest = load_manifest(self.group, self.url)
        self.arrays: dict[str, zarr.Array] = {}
        for spec in self.manifest.arrays():
            try:
                self.arrays[spec.name] = self.group[spec.name]  # type: ignore[assignment]
            except KeyError:
                raise CacheFormatError(f"{self.url} lacks array {spec.name!r}") from None
        self._completed_source = completed or (lambda: list_records(self.storage))
        self._completed: Mapping[int, ShardRecord] | None = None
        self._present: set[tuple[str, int]] = set()

    def completed(self, refresh: bool = False) -> Mapping[int, ShardRecord]:
        """Completion records by shard index."""
        if self._completed is None or refresh:
            self._completed = dict(self._completed_source())
        return self._completed

    @property
    def is_complete(self) -> bool:
        return len(self.completed()) == self.manifest.num_shards

    @property
    def rows_done(self) -> int:
        return sum(r.rows for r in self.completed().values())

    def _check_rows(self, rows: Rows) -> None:
        n, per = self.manifest.num_rows, self.manifest.rows_per_shard
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(n)
            shards = (
                set(range(start // per, (max(stop, start + 1) - 1) // per + 1))
                if stop > start
                else set()
            )
        else:
            idx = np.asarray(rows, dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise IndexError(f"rows out of range [0, {n}): {idx[(idx < 0) | (idx >= n)][:5]}")
            shards = set((idx // per).tolist())
        missing = shards - set(self.completed())
        if missing and not set(self.completed(refresh=True)) >= shards:
            missing = shards - set(self.completed())
            raise ShardIncompleteError(
                f"rows of shard(s) {sorted(missing)[:8]} are not complete yet in {self.url}"
            )

    def _check_present(self, name: str, rows: Rows) -> list[int]:
        """A completed shard whose object is gone would read as zeros: refuse instead.

        Returns the shards ``rows`` touch."""
        per, n = self.manifest.rows_per_shard, self.manifest.num_rows
        if isinstance(rows, slice):
            start, stop, _ = rows.indices(n)
            shards = range(start // per, (stop - 1) // per + 1) if stop > start else range(0)
        else:
            shards = np.unique(np.asarray(rows, dtype=np.int64) // per).tolist()
        ndim = self.arrays[name].ndim
        for shard in shards:
            if (name, shard) in self._present:
                continue
            key = shard_key(name, shard, ndim)
            if not self.storage.exists(key):
                raise IntegrityError(
                    f"{self.url}: {key} is missing though shard {shard} is recorded complete"
                )
            self._present.add((name, shard))
        return list(shards)

    def read(self, name: str, rows: Rows) -> np.ndarray:
        """Rows of one array, in the order asked: (len(rows), *row_shape), stored dtype."""
        if name not in self.arrays:
            raise KeyError(f"no array {name!r}; the cache has {sorted(self.arrays)}")
        self._check_rows(rows)
        shards = self._check_present(name, rows)
        with corrupt_as_integrity_error(self.url, name, shards):
            return self._read(self.arrays[name], rows)

    @staticmethod
    def _read(arr: zarr.Array, rows: Rows) -> np.ndarray:
        if isinstance(rows, slice):
            return np.asarray(arr[rows])
        idx = np.asarray(rows, dtype=np.int64)
        if idx.size == 0:
            return np.empty((0, *arr.shape[1:]), dtype=arr.dtype)
        uniq, inverse = np.unique(idx, return_inverse=True)
        if uniq.size == uniq[-1] - uniq[0] + 1:
            block = np.asarray(arr[int(uniq[0]) : int(uniq[-1]) + 1])
        else:
            block = np.asarray(arr.get_orthogonal_selection((uniq,)))
        return block[inverse]

    def check_shard(self, shard: int) -> ShardCheck:
        """Recompute a completed shard's checksums from the stored data."""
        rec = self.completed().get(shard)
        if rec is None:
            return ShardCheck(shard, False, ("no completion record",))
        problems = []
        want = {s.name for s in self.manifest.arrays()}
        if set(rec.checksums) != want:
            problems.append(
                f"record lists arrays {sorted(rec.checksums)}, cache has {sorted(want)}"
            )
        if shard == 0:  # the pca basis is fitted on the first rows: it belongs to shard 0
            from kdcache.core.hidden_basis import basis_problems

            problems += basis_problems(self.group, self.storage, self.manifest)
        for name in sorted(want & set(rec.checksums)):
            key = shard_key(name, shard, self.arrays[name].ndim)
            if not self.storage.exists(key):
                problems.append(f"{name}: shard object {key} is missing")
                continue
            try:
                got = checksum(np.asarray(self.arrays[name][rec.start : rec.end]))
            except Exception as err:  # a corrupt object fails to decode in many ways
                problems.append(f"{name}: unreadable ({type(err).__name__}: {err})")
                continue
            if got != rec.checksums[name]:
                problems.append(f"{name}: checksum mismatch")
        return ShardCheck(shard, not problems, tuple(problems))

    def verify(self, shards: Sequence[int] | None = None) -> list[ShardCheck]:
        """Check every completed shard (or those given); the caller decides what to do."""
        todo = sorted(self.completed()) if shards is None else list(shards)
        return [self.check_shard(s) for s in todo]

    def verify_or_raise(self) -> None:
        bad = [c for c in self.verify() if not c.ok]
        if bad:
            lines = [f"shard {c.shard}: {'; '.join(c.problems)}" for c in bad]
            raise IntegrityError("corrupt shards in {}:\n{}".format(self.url, "\n".join(lines)))
