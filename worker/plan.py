"""``kdcache plan``: what a job will cost before anything is written.

Runs the job's own teacher on a few rows spread over the dataset, writes those rows with the real
:class:`~kdcache.core.writer.CacheWriter` into a temporary directory (the cache's own arrays,
chunks, codecs and coding), and scales what they take on disk and how long the teacher took to
the whole dataset. The prediction is per array, so a user sees what each output costs.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from kdcache.core.inspect import inspect_cache
from kdcache.core.spec import JobSpec
from kdcache.core.writer import CacheWriter
from kdcache.worker.runner import PreparedJob, ShardRunner, prepare_job

__all__ = ["SizePlan", "plan_job", "sample_blocks"]

_BLOCKS = 4


@dataclass(frozen=True)
class SizePlan:
    """A job's predicted cache: bytes per array, total, tokens and teacher-pass seconds."""

    cache_id: str
    name: str
    num_rows: int
    seq_len: int
    num_shards: int
    sample_rows: int
    sample_seconds: float
    """Teacher seconds for the sampled rows (after a warm-up forward)."""
    arrays: dict[str, int]
    """Predicted bytes on disk of each array (what ``kdcache inspect`` reports after the run)."""
    device: str

    @property
    def tokens(self) -> int:
        return self.num_rows * self.seq_len

    @property
    def total_bytes(self) -> int:
        return sum(self.arrays.values())

    @property
    def bytes_per_token(self) -> float:
        return self.total_bytes / self.tokens

    @property
    def teacher_seconds(self) -> float:
        """Predicted seconds of teacher work for every row (writing overlaps it)."""
        return self.sample_seconds / self.sample_rows * self.num_rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache_id": self.cache_id,
            "name": self.name,
            "rows": self.num_rows,
            "seq_len": self.seq_len,
            "tokens": self.tokens,
            "shards": self.num_shards,
            "sample_rows": self.sample_rows,
            "sample_seconds": round(self.sample_seconds, 4),
            "arrays": dict(self.arrays),
            "bytes": self.total_bytes,
            "bytes_per_token": self.bytes_per_token,
            "teacher_seconds": round(self.teacher_seconds, 2),
            "device": self.device,
        }


def sample_blocks(num_rows: int, rows: int, blocks: int = _BLOCKS) -> list[tuple[int, int]]:
    """Up to ``blocks`` contiguous [start, end) ranges, ``rows`` rows in all, spread evenly over
    the dataset (the first starts at row 0): a plan sees more than the dataset's head."""
    rows = max(1, min(rows, num_rows))
    n = max(1, min(blocks, rows))
    sizes = [rows // n + (i < rows % n) for i in range(n)]
    out: list[tuple[int, int]] = []
    for i, size in enumerate(sizes):
        start = min(i * num_rows // n, num_rows - size)
        start = max(start, out[-1][1] if out else 0)
        out.append((start, start + size))
    return out


class _SampledRows:
    """A DatasetSource of the rows in ``blocks`` of another source, renumbered from 0."""

    def __init__(self, source: Any, blocks: list[tuple[int, int]]) -> None:
        self.ids = np.concatenate([source.rows(s, e) for s, e in blocks])
        self.mask = np.concatenate([source.loss_mask(s, e) for s, e in blocks])
        self.num_rows, self.seq_len = self.ids.shape
        self.fingerprint_extra: dict[str, Any] = dict(source.fingerprint_extra)

    def rows(self, start: int, end: int) -> np.ndarray:
        return self.ids[start:end]

    def loss_mask(self, start: int, end: int) -> np.ndarray:
        return self.mask[start:end]


def plan_job(
    spec: JobSpec,
    *,
    rows: int | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    job: PreparedJob | None = None,
) -> SizePlan:
    """Predict ``spec``'s cache from ``rows`` rows (default: two batches, at least 16, at most
    one shard). Writes only to a temporary directory, removed before returning."""
    job = job or prepare_job(spec, base_dir)
    m = job.manifest
    want = rows if rows is not None else max(16, 2 * job.plan.spec.batch_size)
    n = max(1, min(want, m.num_rows, m.rows_per_shard))
    rows_of = _SampledRows(job.source, sample_blocks(m.num_rows, n))
    sample = replace(job, manifest=replace(m, num_rows=n), source=rows_of)
    with torch.inference_mode():  # warm-up: lazy init, allocator pools, kernels picked
        job.teacher.forward(torch.as_tensor(rows_of.ids[:1], dtype=torch.long), m.hidden_layers)
    with tempfile.TemporaryDirectory(prefix="kdcache-plan-") as tmp:
        # the real shard code and writer: coding, chunks and codecs are the run's own
        writer = CacheWriter.open(os.path.join(tmp, "cache"), sample.manifest)
        runner = ShardRunner(sample, writer)
        t0 = time.perf_counter()
        data = runner.compute(0)
        seconds = time.perf_counter() - t0
        runner.write(0, data)
        info = inspect_cache(writer.storage.url)
    arrays = {
        a["name"]: round(int(a["bytes"]) * m.num_rows / n) if a["per_row"] else int(a["bytes"])
        for a in info["arrays"]
    }
    return SizePlan(
        cache_id=m.cache_id,
        name=m.name,
        num_rows=m.num_rows,
        seq_len=m.seq_len,
        num_shards=m.num_shards,
        sample_rows=n,
        sample_seconds=seconds,
        arrays=arrays,
        device=str(job.teacher.device),
    )
