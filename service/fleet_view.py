"""What the dashboard polls: jobs with progress, active leases, and workers by last heartbeat.

A lease's deadline moves to ``now + lease_seconds`` at each heartbeat, so the last heartbeat of
an active lease is ``deadline - lease_seconds`` (the grant counts as the first beat).
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select

from kdcache.service.db import JobRow, LeaseRow
from kdcache.service.store import JobStore

__all__ = ["fleet_view"]

RECENT_LEASES = 200


def _lease(row: LeaseRow, names: dict[str, str], lease_seconds: float) -> dict[str, Any]:
    active = row.state == "active"
    return {
        "id": row.id,
        "job_id": row.job_id,
        "job_name": names.get(row.job_id, ""),
        "shard": row.shard,
        "worker": row.worker,
        "attempt": row.attempt,
        "state": row.state,
        "created_at": row.created_at,
        "deadline": row.deadline,
        "last_heartbeat": max(row.created_at, row.deadline - lease_seconds) if active else None,
    }


def _workers(leases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for lease in leases:
        w = by.setdefault(
            lease["worker"],
            {"worker": lease["worker"], "active": 0, "done": 0, "failed": 0, "last_seen": 0.0},
        )
        if lease["state"] == "active":
            w["active"] += 1
        elif lease["state"] == "done":
            w["done"] += 1
        elif lease["state"] in ("failed", "expired"):
            w["failed"] += 1
        seen = lease["last_heartbeat"] or lease["created_at"]
        w["last_seen"] = max(w["last_seen"], seen)
    return sorted(by.values(), key=lambda w: -w["last_seen"])


def fleet_view(store: JobStore, lease_seconds: float, job_limit: int = 50) -> dict[str, Any]:
    """Jobs (newest first), the recent leases, and a row per worker seen in them."""
    jobs = store.list_jobs(limit=job_limit)
    with store.read() as s:
        rows = list(
            s.scalars(select(LeaseRow).order_by(LeaseRow.created_at.desc()).limit(RECENT_LEASES))
        )
        ids = {r.job_id for r in rows}
        names = (
            dict(s.execute(select(JobRow.id, JobRow.name).where(JobRow.id.in_(ids))).all())
            if ids
            else {}
        )
    leases = [_lease(r, names, lease_seconds) for r in rows]
    return {
        "now": time.time(),
        "lease_seconds": lease_seconds,
        "jobs": [j.model_dump(mode="json", exclude={"spec"}) for j in jobs],
        "leases": [x for x in leases if x["state"] == "active"],
        "workers": _workers(leases),
    }
