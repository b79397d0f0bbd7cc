"""The "prepare" unit of work of a document job (jsonl, hf) run by the fleet.

A worker holding a job's prepare lease tokenises the whole dataset once
(:class:`~kdcache.worker.datasets.TextSource`) and stores its rows and loss masks beside the cache
(:mod:`kdcache.core.prepared`); shard leases then read their rows from there. Idempotent: a store
already prepared for the same cache is reused, and a preparer killed half-way leaves nothing a
reader trusts (``meta.json`` is written last).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np

from kdcache.core.errors import ManifestMismatchError
from kdcache.core.prepared import (
    PreparedMeta,
    PreparedRows,
    read_prepared_meta,
    write_prepared,
)
from kdcache.core.resolve import JobPlan, resolve_job
from kdcache.core.spec import JobSpec
from kdcache.core.storage import Storage
from kdcache.worker.datasets import DatasetSource, open_checked

__all__ = ["prepare_documents"]

log = logging.getLogger(__name__)


def _shards(source: DatasetSource, per: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, source.num_rows, per):
        end = min(start + per, source.num_rows)
        yield source.rows(start, end).astype(np.int32), source.loss_mask(start, end)


def _reusable(storage: Storage, cache_id: str, spec: JobSpec) -> PreparedMeta | None:
    meta = read_prepared_meta(storage)
    if meta is None or meta.cache_id != cache_id or meta.rows_per_shard != spec.rows_per_shard:
        return None
    try:  # every object there and intact, or tokenise again
        rows = PreparedRows(storage, meta)
        for shard in range(meta.num_shards):
            rows.rows(shard * meta.rows_per_shard, shard * meta.rows_per_shard + 1)
    except Exception as err:  # a broken store is rebuilt, whatever broke it
        log.warning("prepared rows of cache %s are unusable (%s); preparing again", cache_id, err)
        return None
    return meta


def prepare_documents(
    spec: JobSpec,
    storage: Storage,
    cache_id: str,
    *,
    should_stop: Callable[[], bool] = lambda: False,
    plan: JobPlan | None = None,
) -> PreparedMeta | None:
    """Tokenise ``spec``'s documents into ``storage`` (its ``prepared_url``); None when stopped.

    ``plan`` is the job's plan when known (a lease's, checked against this host's files); else
    the spec is resolved here. Raises :class:`ManifestMismatchError` when that gives another
    cache (this host's files differ from the service's), and :class:`SpecError` naming the field
    and row of bad data.
    """
    plan = plan or resolve_job(spec)
    if plan.cache_id != cache_id:
        raise ManifestMismatchError(
            f"this worker resolves the job to cache {plan.cache_id}, the service to {cache_id}: "
            "its dataset, tokenizer or teacher files differ here"
        )
    found = _reusable(storage, cache_id, plan.spec)
    if found is not None:
        log.info("cache %s: reusing %d prepared rows", cache_id, found.num_rows)
        return found
    source = open_checked(plan.spec.dataset, plan.spec.teacher.hf)
    per = plan.spec.rows_per_shard
    meta = write_prepared(
        storage,
        cache_id=cache_id,
        num_rows=source.num_rows,
        seq_len=source.seq_len,
        rows_per_shard=per,
        shards=_shards(source, per),
        source=source.fingerprint_extra,
        should_stop=should_stop,
    )
    if meta is not None:
        log.info("cache %s: prepared %d rows of %d", cache_id, meta.num_rows, meta.seq_len)
    return meta
