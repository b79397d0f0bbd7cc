"""The shard runner: teacher forward once per row, whole shards written, then published.

:func:`prepare_job` turns a spec into a loaded teacher, a dataset source and the cache manifest;
:class:`ShardRunner` computes and writes one shard (the unit a lease covers); :func:`run_job` is
the embedded mode, every missing shard in this process. Computing shard i+1 overlaps writing
shard i (torch and Blosc release the GIL), so the teacher is rarely idle.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from kdcache.core.errors import Problem, SpecError
from kdcache.core.format import (
    ARRAY_INDICES,
    ARRAY_INPUT_IDS,
    ARRAY_LOGPROBS,
    ARRAY_LOSS_MASK,
    ARRAY_SAMPLE_COUNTS,
    ARRAY_SAMPLE_INDICES,
    ARRAY_SAMPLE_LOGPROB_SUMS,
    ARRAY_SAMPLE_LOGPROBS,
    Manifest,
    index_dtype,
)
from kdcache.core.hidden_codec import parse_hidden_codec
from kdcache.core.layout import JOB_SPEC_KEY, cache_url
from kdcache.core.resolve import JobPlan, TeacherInfo, resolve_job
from kdcache.core.shards import ShardRecord
from kdcache.core.spec import JobSpec
from kdcache.core.topk_codec import ID_ORDER_TOKENS, IdOrder, encode_logprobs, is_xz
from kdcache.core.writer import CODECS, CacheWriter
from kdcache.worker.datasets import DatasetSource, open_checked
from kdcache.worker.extract import extract_batches
from kdcache.worker.hidden_coding import BasisHolder, encode_hidden
from kdcache.worker.progress import Progress
from kdcache.worker.sampling import logprob_sums
from kdcache.worker.teachers import Teacher, load_teacher

__all__ = [
    "PreparedJob",
    "ShardRunner",
    "build_manifest",
    "completed_cache",
    "prepare_job",
    "run_job",
]

log = logging.getLogger(__name__)


def build_manifest(
    plan: JobPlan,
    hidden_size: int | None,
    teacher_dtype: str | None = None,
    id_order: Sequence[int] = (),
) -> Manifest:
    """The manifest of ``plan``'s cache. Holds no file paths: moving files keeps the cache.

    ``teacher_dtype`` is the dtype the teacher really runs in (``auto`` resolves per device):
    a writer whose teacher resolves differently cannot open the cache, so one cache never mixes
    bfloat16 and float32 numbers. ``id_order``: a ``lossless-xz`` cache's ``topk_id_order``.
    """
    spec, info = plan.spec, plan.teacher
    if info.vocab_size is None or plan.num_rows is None:
        raise ValueError("build_manifest needs a completed plan (vocab size and rows known)")
    teacher = {
        "kind": "hf" if spec.teacher.hf else "module",
        "module": spec.teacher.module,
        "dtype": spec.teacher.dtype,
        "resolved_dtype": teacher_dtype,
        "num_layers": info.num_layers,
    }
    ds = spec.dataset
    dataset: dict[str, Any] = {"kind": "tokens" if ds.tokens else "jsonl" if ds.jsonl else "hf"}
    if ds.documents:
        dataset.update(seq_len=ds.seq_len, pack=ds.pack)
        if ds.messages_field:
            dataset.update(messages_field=ds.messages_field)
        else:
            dataset.update(text_field=ds.field)
        if ds.hf:
            dataset.update(split=ds.split or "train")
        if ds.max_rows is not None:
            dataset.update(max_rows=ds.max_rows)
    if spec.generate is not None:
        dataset.update(generate=spec.generate.identity)
    return Manifest(
        cache_id=plan.cache_id,
        num_rows=plan.num_rows,
        seq_len=plan.seq_len,
        vocab_size=info.vocab_size,
        topk=spec.outputs.topk,
        temperatures=list(spec.outputs.temperatures),
        hidden_layers=plan.layers,
        hidden_size=hidden_size if plan.layers else None,
        hidden_dtype=spec.outputs.hidden_dtype,
        rows_per_shard=spec.rows_per_shard,
        teacher_fingerprint=plan.teacher_fingerprint,
        dataset_fingerprint=plan.dataset_fingerprint,
        tokenizer_fingerprint=plan.tokenizer_fingerprint,
        layer_map={str(s): t for s, t in sorted(plan.layer_map.items())},
        index_dtype=index_dtype(info.vocab_size),
        name=spec.name,
        teacher=teacher,
        dataset=dataset,
        codecs=dict(CODECS),
        sample_draws=spec.outputs.sample_draws,
        sample_seed=spec.outputs.sample_seed,
        sample_logprobs=spec.outputs.sample_logprobs,
        loss_mask=True,
        topk_codec=spec.outputs.topk_codec,
        topk_id_order=list(id_order),
        hidden_codec=spec.outputs.hidden_codec,
        format_version=3
        if is_xz(spec.outputs.topk_codec)
        else 1
        if spec.outputs.topk_codec == "fp16" and spec.outputs.hidden_codec == "exact"
        else 2,
    )


@dataclass
class PreparedJob:
    """A job ready to run: its plan, manifest, loaded teacher and dataset source."""

    plan: JobPlan
    manifest: Manifest
    teacher: Teacher
    source: DatasetSource


def _hidden_size(teacher: Teacher, layers: list[int]) -> int | None:
    if not layers:
        return None
    if teacher.hidden_size is not None:
        return teacher.hidden_size
    import torch

    out = teacher.forward(torch.zeros((1, 2), dtype=torch.long), layers[:1])
    return int(out.hidden[layers[0]].shape[-1])


def prepare_job(
    spec: JobSpec,
    base_dir: str | os.PathLike[str] | None = None,
    plan: JobPlan | None = None,
    *,
    source: DatasetSource | None = None,
) -> PreparedJob:
    """Resolve ``spec``, load its teacher and dataset; every spec problem raises SpecError.

    ``source`` replaces the spec's dataset (a fleet worker reads a document job's prepared rows).
    The dataset is opened (and a document dataset checked, row by row) before the teacher loads.
    """
    plan = plan or resolve_job(spec, None if base_dir is None else Path(base_dir))
    source = source or open_checked(plan.spec.dataset, plan.spec.teacher.hf)
    teacher = load_teacher(plan.spec.teacher)
    if source.num_rows < 1:
        raise SpecError([Problem("dataset", "the dataset yields no rows")])
    id_order: list[int] = []
    outputs = plan.spec.outputs
    if is_xz(outputs.topk_codec) and (outputs.topk > 0 or outputs.sample_draws > 0):
        # counted on the dataset's first rows (of a generate job: its prompts), integers only,
        # so that every worker of the job derives the same list (their manifests must match)
        first = source.rows(0, min(source.num_rows, max(1, ID_ORDER_TOKENS // source.seq_len)))
        id_order = IdOrder.of_tokens(first, teacher.vocab_size)
    if plan.spec.generate is not None:  # the rows are prompts: the teacher continues them first
        from kdcache.worker.generate import GenerationSource

        source = GenerationSource(source, teacher, plan.spec.generate, plan.spec.batch_size)
    info = TeacherInfo(
        vocab_size=teacher.vocab_size,
        num_layers=teacher.num_layers,
        hidden_size=teacher.hidden_size,
        max_positions=teacher.max_positions,
    )
    plan = plan.complete(teacher=info, num_rows=source.num_rows)
    dtype = str(teacher.dtype).removeprefix("torch.")
    hidden_size = _hidden_size(teacher, plan.layers)
    codec = parse_hidden_codec(plan.spec.outputs.hidden_codec)
    if codec.kind == "pca" and hidden_size is not None and codec.rank > hidden_size:
        raise SpecError(
            [
                Problem(
                    "outputs.hidden_codec",
                    f"{codec.name}: R = {codec.rank} exceeds the teacher's hidden width "
                    f"{hidden_size}",
                )
            ]
        )
    manifest = build_manifest(plan, hidden_size, dtype, id_order)
    return PreparedJob(plan=plan, manifest=manifest, teacher=teacher, source=source)


class ShardRunner:
    """Computes and writes shards of one cache; one per worker process."""

    def __init__(self, job: PreparedJob, writer: CacheWriter) -> None:
        self.job = job
        self.writer = writer
        self.identity = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "teacher": job.teacher.description,
        }
        self.codec = parse_hidden_codec(job.manifest.hidden_codec)
        self.id_order = IdOrder(job.manifest.topk_id_order, job.manifest.vocab_size)
        self.basis = BasisHolder(job, writer) if self.codec.kind == "pca" else None

    def compute(
        self, shard: int, on_batch: Callable[[int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Every array's rows of ``shard``: one teacher forward per batch, nothing kept twice.

        ``on_batch(rows)`` is called after each batch (a progress bar within the shard)."""
        m, spec = self.job.manifest, self.job.plan.spec
        basis = None if self.basis is None else self.basis.get()  # before any shard is coded
        start, end = m.shard_rows(shard)
        ids = self.job.source.rows(start, end)
        coded = self.codec.kind != "exact"
        data = extract_batches(
            self.job.teacher,
            ids,
            batch_size=spec.batch_size,
            row_offset=start,
            topk=m.topk,
            temperatures=m.temperatures,
            layers=m.hidden_layers,
            hidden_dtype="float32" if coded else m.hidden_dtype,
            index_dtype=m.index_dtype,
            on_batch=on_batch,
            sample_draws=m.sample_draws,
            sample_seed=m.sample_seed,
        )
        if not m.sample_logprobs and m.sample_draws:
            data[ARRAY_SAMPLE_LOGPROB_SUMS] = logprob_sums(
                data[ARRAY_SAMPLE_INDICES],
                data[ARRAY_SAMPLE_COUNTS],
                data.pop(ARRAY_SAMPLE_LOGPROBS),
                data.get(ARRAY_INDICES),
            )
        if ARRAY_LOGPROBS in data:
            data[ARRAY_LOGPROBS] = encode_logprobs(data[ARRAY_LOGPROBS], m.topk_codec)
        for name in (ARRAY_INDICES, ARRAY_SAMPLE_INDICES):
            if m.topk_id_order and name in data:
                data[name] = self.id_order.encode(data[name])
        if coded:
            raw = {k: v for k, v in data.items() if k.startswith("hidden/")}
            encode_hidden(data, m, basis)
            # another worker's fit may have been published since: code with the one that won
            while self.basis is not None and not self.basis.current():
                data.update(raw)
                encode_hidden(data, m, self.basis.get())
        data[ARRAY_INPUT_IDS] = np.ascontiguousarray(ids, dtype=np.int32)
        data[ARRAY_LOSS_MASK] = np.ascontiguousarray(self.job.source.loss_mask(start, end))
        return data

    def write(self, shard: int, data: dict[str, np.ndarray], *, commit: bool = True) -> ShardRecord:
        record = self.writer.write_shard(shard, data, writer=self.identity)
        if commit:
            self.writer.commit(record)
        return record

    def run_shard(self, shard: int, *, commit: bool = True) -> ShardRecord:
        t0 = time.perf_counter()
        record = self.write(shard, self.compute(shard), commit=commit)
        log.debug("shard %d done in %.2fs", shard, time.perf_counter() - t0)
        return record


def open_writer(
    job: PreparedJob, root: str, storage_options: dict[str, Any] | None = None
) -> CacheWriter:
    """Create (or reopen) the cache of ``job`` under ``root`` and record its job spec there."""
    url = cache_url(root, job.manifest.cache_id)
    writer = CacheWriter.open(url, job.manifest, storage_options)
    if not writer.storage.exists(JOB_SPEC_KEY):
        writer.storage.write_bytes(
            JOB_SPEC_KEY, json.dumps(job.plan.spec.model_dump(), indent=1).encode()
        )
    return writer


def completed_cache(
    plan: JobPlan, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> str | None:
    """The URL of ``plan``'s cache under ``root`` when every shard of it is complete, else None.

    Needs only the plan (fingerprints come from remembered hashes), so rerunning a finished
    job neither loads the teacher nor reads its weights.
    """
    from kdcache.core.errors import KDCacheError
    from kdcache.core.reader import CacheReader

    url = cache_url(root, plan.cache_id)
    try:
        reader = CacheReader(url, storage_options=storage_options)
        done = reader.manifest.cache_id == plan.cache_id and reader.is_complete
    except (KDCacheError, OSError, ValueError):
        return None
    return reader.url if done else None


def run_job(
    spec: JobSpec,
    root: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    progress_stream: TextIO | None = None,
    job: PreparedJob | None = None,
) -> str:
    """Embedded mode: run every missing shard of ``spec``'s cache in this process.

    Resumable: shards with a completion record are skipped, so a rerun after a crash does only
    what is missing and ends with the same bytes. Returns the cache's URL.
    """
    job = job or prepare_job(spec, base_dir)
    writer = open_writer(job, str(root), storage_options)
    stale = writer.clean_partial()
    if stale:
        log.info("removed %d partial files left by an interrupted run", stale)
    todo = writer.missing_shards()
    m = job.manifest
    progress = Progress(
        m.num_rows,
        m.seq_len,
        done_rows=m.num_rows - sum(m.shard_rows(s)[1] - m.shard_rows(s)[0] for s in todo),
        stream=progress_stream,
    )
    runner = ShardRunner(job, writer)
    pending: Future[ShardRecord] | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-write") as pool:
        try:
            for shard in todo:
                with progress.shard(shard, m.shard_rows(shard)[1] - m.shard_rows(shard)[0]) as step:
                    data = runner.compute(shard, on_batch=step)
                if pending is not None:
                    progress.update(pending.result().rows)
                pending = pool.submit(runner.write, shard, data)
            if pending is not None:
                progress.update(pending.result().rows)
                pending = None
        finally:
            if pending is not None and not pending.cancelled():
                pending.exception()  # let the shard in flight land before the error propagates
    progress.close()
    return writer.storage.url
