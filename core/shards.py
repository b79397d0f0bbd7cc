"""Shard completion records: the only thing that makes a written shard visible to readers.

A worker writes every array's shard first, then the record. Records live apart from the arrays
(``_kdcache/shards/<shard>.json`` in the cache; the service also keeps them in its database)
because concurrent writers must never rewrite the group's attributes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
from pydantic import ConfigDict, Field, with_config

from kdcache.core.errors import CacheFormatError
from kdcache.core.layout import RECORDS_PREFIX, parse_record_key, record_key
from kdcache.core.storage import Storage

__all__ = ["ShardRecord", "checksum", "list_records", "read_record", "write_record"]


def checksum(data: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and C-order bytes (independent of codecs)."""
    a = np.ascontiguousarray(data)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


_NonNegative = Annotated[int, Field(ge=0)]
_Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class ShardRecord:
    """A completed shard: its rows, each array's checksum, and who wrote it.

    Also the wire model of ``POST /v1/leases/{id}/complete`` (pydantic validates it there).
    """

    shard: _NonNegative
    start: _NonNegative
    end: _NonNegative
    checksums: dict[str, _Sha256] = field(
        metadata={"description": "array name -> SHA-256 of its shard rows"}
    )
    tokens: _NonNegative = 0
    seconds: Annotated[float, Field(ge=0)] = 0.0
    writer: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return self.end - self.start

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardRecord:
        try:
            return cls(
                shard=int(data["shard"]),
                start=int(data["start"]),
                end=int(data["end"]),
                checksums=dict(data["checksums"]),
                tokens=int(data.get("tokens", 0)),
                seconds=float(data.get("seconds", 0.0)),
                writer=dict(data.get("writer") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CacheFormatError(f"malformed shard record: {err!r}") from None


def write_record(storage: Storage, record: ShardRecord) -> None:
    storage.write_bytes(record_key(record.shard), record.to_json())


def read_record(storage: Storage, shard: int) -> ShardRecord | None:
    try:
        raw = storage.read_bytes(record_key(shard))
    except FileNotFoundError:
        return None
    return ShardRecord.from_dict(json.loads(raw))


def list_records(storage: Storage) -> dict[int, ShardRecord]:
    """Every completion record in a cache, by shard index; unreadable ones are skipped."""
    out: dict[int, ShardRecord] = {}
    for key in storage.list(RECORDS_PREFIX):
        if parse_record_key(key.lstrip("/")) is None:
            continue
        try:
            rec = ShardRecord.from_dict(json.loads(storage.read_bytes(key)))
        except (CacheFormatError, ValueError, FileNotFoundError):
            continue
        out[rec.shard] = rec
    return out
