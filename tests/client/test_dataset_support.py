"""Support for the dataset tests (no tests here): simulated DataLoader workers, global order."""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from kdcache.client.dataset import CacheDataset
from kdcache.core.spec import parse_spec
from kdcache.worker import toy
from kdcache.worker.runner import run_job

# what tests/client/conftest.py puts in its caches
SEQ_LEN = 16
TOPK = 8
TEMPERATURES = [1.0, 2.0]
LAYERS = [1, 2]


@contextlib.contextmanager
def as_worker(worker: int, num_workers: int) -> Iterator[None]:
    """Make the dataset believe it runs in DataLoader worker ``worker`` of ``num_workers``."""
    info = types.SimpleNamespace(id=worker, num_workers=num_workers, seed=0, dataset=None)
    with mock.patch("kdcache.client.dataset.get_worker_info", return_value=info):
        yield


def rows(samples: Iterator[dict]) -> list[int]:
    return [int(s["row"]) for s in samples]


def worker_rows(ds: CacheDataset, worker: int, num_workers: int) -> list[int]:
    with as_worker(worker, num_workers):
        return rows(iter(ds))


def rank_batches(ds: CacheDataset, workers: int, batch: int) -> list[list[int]]:
    """The batches a DataLoader(ds, batch_size=batch, num_workers=workers) hands one rank.

    Like torch: each worker batches its own stream; batches are taken from the workers in turn,
    skipping workers that are exhausted.
    """
    if workers == 0:
        stream = rows(iter(ds))
        return [stream[i : i + batch] for i in range(0, len(stream), batch)]
    per_worker = []
    for w in range(workers):
        stream = worker_rows(ds, w, workers)
        per_worker.append([stream[i : i + batch] for i in range(0, len(stream), batch)])
    out: list[list[int]] = []
    for i in range(max(len(b) for b in per_worker)):
        out += [b[i] for b in per_worker if i < len(b)]
    return out


def global_sequence(per_rank: list[list[list[int]]]) -> list[int]:
    """Global steps in order: step i = rank 0's batch i, rank 1's batch i, ..."""
    out: list[int] = []
    for step in range(max(len(b) for b in per_rank)):
        for batches in per_rank:
            if step < len(batches):
                out += batches[step]
    return out


def take(ds: CacheDataset, n: int) -> list[int]:
    """The first ``n`` rows of a pass, iterated in this process (so the dataset counts them)."""
    it = iter(ds)
    got = rows(islice(it, n))
    it.close()
    return got


def padded_order(ds: CacheDataset) -> np.ndarray:
    """The epoch order followed by the rows a full pass repeats as padding."""
    order = ds.epoch_order().all_rows()
    return np.concatenate([order, order[np.arange(ds.padded_rows) % len(order)]])


class CacheFactory:
    """Builds caches under a session temp dir; remembers each one's job spec and root."""

    def __init__(self, tmp: pytest.TempPathFactory, teacher: Path) -> None:
        self.tmp, self.teacher = tmp, teacher
        self.made: dict[tuple[int, int], str] = {}
        self.specs: dict[str, dict[str, Any]] = {}
        self.roots: dict[str, Path] = {}

    def __call__(self, n_rows: int = 37, rows_per_shard: int = 8) -> str:
        if (n_rows, rows_per_shard) not in self.made:
            base = self.tmp.mktemp(f"cache-{n_rows}-{rows_per_shard}")
            tokens = toy.make_tokens(base / "tokens.npy", n_rows, SEQ_LEN, 320, seed=n_rows)
            spec = {
                "teacher": {"hf": str(self.teacher), "dtype": "float32", "device": "cpu"},
                "dataset": {"tokens": str(tokens)},
                "outputs": {"topk": TOPK, "temperatures": TEMPERATURES, "hidden_layers": LAYERS},
                "rows_per_shard": rows_per_shard,
                "batch_size": 16,
            }
            url = run_job(parse_spec(spec), base / "root")
            self.made[(n_rows, rows_per_shard)] = url
            self.specs[url], self.roots[url] = spec, base / "root"
        return self.made[(n_rows, rows_per_shard)]


def copy_with_loss_mask(cache: str, dest: Path, mask: np.ndarray) -> str:
    """A copy of ``cache`` at ``dest`` holding ``mask`` (N, T) bool as its ``loss_mask`` array,
    chunked and sharded like its ``input_ids`` (as a writer that stores masks lays it out)."""
    import shutil

    import zarr

    shutil.copytree(cache, dest)
    group = zarr.open_group(str(dest), mode="r+")
    ids = group["input_ids"]
    assert isinstance(ids, zarr.Array) and mask.shape == ids.shape
    if "loss_mask" in group:  # written by kdcache since issue 8: give it these values
        arr = group["loss_mask"]
        assert isinstance(arr, zarr.Array) and arr.shards == ids.shards
    else:
        arr = group.create_array(
            "loss_mask",
            shape=ids.shape,
            dtype="bool",
            chunks=ids.chunks,
            shards=ids.shards,
            compressors=ids.compressors,
            fill_value=False,
        )
    arr[...] = mask
    return str(dest)
