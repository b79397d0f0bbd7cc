"""Mid-epoch resume by arithmetic: where a new pass starts, given an old run's state.

A state records the epoch, the pass it was in (its start position, per-rank unit, world size,
padding policy) and how many rows each rank had delivered since the pass started. Ranks advance
in lockstep, so ``consumed`` rows on every rank means whole global steps
``consumed // unit`` plus a partial one.

- Same world size, unit and policy: the same pass, each rank skipping ``consumed`` rows. Exact
  at any row.
- Anything else: whole global steps are a prefix of the global order, so a new pass starts at
  position ``start + steps * global_batch`` with the new layout. This needs ``consumed`` to be
  a multiple of the old unit; a state taken mid-batch can only resume with the old layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from kdcache.core.errors import ResumeError

__all__ = ["STATE_VERSION", "DatasetState", "ResumeError", "resume_point"]

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass(frozen=True)
class DatasetState:
    """What :meth:`CacheDataset.state_dict` saves. Plain ints, strings and bools only."""

    cache_id: str
    num_rows: int
    seed: int
    shuffle: bool
    window_shards: int
    epoch: int
    world_size: int
    unit: int
    policy: str
    start: int
    consumed: int
    version: int = STATE_VERSION

    @property
    def global_consumed(self) -> int | None:
        """Positions of the epoch order consumed by all ranks, or None when taken mid-batch."""
        if self.consumed % self.unit:
            return None
        return self.start + (self.consumed // self.unit) * self.unit * self.world_size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["global_consumed"] = self.global_consumed
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetState:
        if data.get("version") != STATE_VERSION:
            raise ResumeError(
                f"dataset state version {data.get('version')!r} is not supported "
                f"(this kdcache writes version {STATE_VERSION})"
            )
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ResumeError(f"dataset state lacks {missing}")
        return cls(**{n: data[n] for n in names})


def resume_point(old: DatasetState, now: DatasetState) -> tuple[int, int]:
    """(pass start, rows to skip per rank) that continue ``old``'s global order in ``now``.

    ``now`` describes this run (its ``start``/``consumed``/``epoch`` are ignored). Raises
    :class:`ResumeError` naming every reason the order cannot be continued.
    """
    problems = [
        f"{name}: saved {getattr(old, name)!r}, this run has {getattr(now, name)!r}"
        for name in ("cache_id", "num_rows", "seed", "shuffle", "window_shards")
        if getattr(old, name) != getattr(now, name)
    ]
    if problems:
        raise ResumeError(
            "the saved state belongs to another order, so resuming would repeat or skip rows:\n  "
            + "\n  ".join(problems)
        )
    if (old.world_size, old.unit, old.policy) == (now.world_size, now.unit, now.policy):
        return old.start, old.consumed
    position = old.global_consumed
    if position is None:
        raise ResumeError(
            f"the state was saved mid-batch ({old.consumed} rows per rank with batch_size "
            f"{old.unit}), so it can only resume with world_size={old.world_size}, "
            f"batch_size={old.unit} and the same drop_last/pad; this run has "
            f"world_size={now.world_size}, batch_size={now.unit}"
        )
    old_g, new_g = old.unit * old.world_size, now.unit * now.world_size
    if old_g != new_g:
        log.warning(
            "global batch changed from %d to %d rows: continuing the same global order from "
            "position %d, but steps group rows differently from the original run",
            old_g,
            new_g,
            position,
        )
    return min(position, old.num_rows), 0
