"""A job's shard rows: made at submit (rows known) or when its prepare step completes.

Shared by the job store (submit) and the lease book (a document job's prepare lease completes),
peers over one :class:`~kdcache.service.db.Database`. A new job keeps every shard already complete
for its cache: done shards of earlier jobs, and completion records in the cache's storage.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

from sqlalchemy import select

from kdcache.core.format import shard_rows
from kdcache.core.layout import cache_url
from kdcache.core.shards import ShardRecord, list_records
from kdcache.core.storage import open_storage
from kdcache.service.db import PREPARE_SHARD, Database, JobRow, ShardRow

__all__ = ["carried_records", "prepare_row", "shard_rows_of"]

log = logging.getLogger(__name__)


def carried_records(
    db: Database, root: str, cache_id: str, num_rows: int, per: int
) -> dict[int, dict[str, Any]]:
    """Shards already complete for this cache: earlier jobs' and the cache's own records."""
    found: dict[int, dict[str, Any]] = {}
    with db.read() as s:
        q = (
            select(ShardRow.shard, ShardRow.record)
            .join(JobRow, JobRow.id == ShardRow.job_id)
            .where(JobRow.cache_id == cache_id, ShardRow.status == "done")
        )
        for shard, record in s.execute(q):
            if record is not None:
                found.setdefault(shard, record)
    try:
        on_disk: Mapping[int, ShardRecord] = list_records(open_storage(cache_url(root, cache_id)))
    except OSError as err:
        log.warning("cannot list completion records of %s: %s", cache_id, err)
        on_disk = {}
    for shard, record in on_disk.items():
        found.setdefault(shard, asdict(record))
    valid = {}
    for shard, rec in found.items():
        try:
            ok = shard_rows(shard, per, num_rows) == (rec.get("start"), rec.get("end"))
        except IndexError:
            ok = False
        if ok:
            valid[shard] = rec
    return valid


def shard_rows_of(
    job_id: str, n: int, per: int, num_rows: int, carried: Mapping[int, dict[str, Any]]
) -> Iterator[ShardRow]:
    """The ``n`` shard rows of a job; those in ``carried`` are done already."""
    for i in range(n):
        start, end = shard_rows(i, per, num_rows)
        rec = carried.get(i)
        yield ShardRow(
            job_id=job_id,
            shard=i,
            start=start,
            end=end,
            status="done" if rec is not None else "pending",
            attempts=0,
            record=rec,
            tokens=int(rec.get("tokens", 0)) if rec is not None else 0,
            carried=rec is not None,
        )


def prepare_row(job_id: str) -> ShardRow:
    """The prepare step of a document job whose rows are not known yet (no rows, no record)."""
    return ShardRow(
        job_id=job_id,
        shard=PREPARE_SHARD,
        start=0,
        end=0,
        status="pending",
        attempts=0,
        tokens=0,
        carried=False,
    )
