"""What ``kdcache inspect`` reports: rows, tokens, arrays, bytes on disk, completeness."""

from __future__ import annotations

from typing import Any

from kdcache.core.reader import CacheReader

__all__ = ["inspect_cache"]


def _array_bytes(reader: CacheReader, name: str) -> int | None:
    try:
        return sum(reader.storage.size(k) for k in reader.storage.list(f"{name}/c"))
    except (OSError, NotImplementedError, ValueError):  # e.g. HTTP cannot list objects
        return None


def inspect_cache(url: str, reader: CacheReader | None = None) -> dict[str, Any]:
    """A JSON-ready summary of a cache."""
    reader = reader or CacheReader(url)
    m = reader.manifest
    arrays: list[dict[str, Any]] = []
    for spec in m.arrays():
        arrays.append(
            {
                "name": spec.name,
                "shape": [m.num_rows, *spec.row_shape],
                "dtype": spec.logical_dtype,
                "stored_dtype": spec.dtype,
                "bytes": _array_bytes(reader, spec.name),
                "per_row": True,
            }
        )
    for name, shape in m.basis_arrays():  # a pca:R cache's basis and mean: once, not per row
        arrays.append(
            {
                "name": name,
                "shape": list(shape),
                "dtype": "float32",
                "stored_dtype": "float32",
                "bytes": _array_bytes(reader, name),
                "per_row": False,
            }
        )
    sizes: list[int | None] = [a["bytes"] for a in arrays]
    total = None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)
    done = reader.completed()
    rows_done = sum(r.rows for r in done.values())
    tokens_done = rows_done * m.seq_len
    return {
        "url": reader.url,
        "manifest": m.to_dict(),
        "tokens": m.num_tokens,
        "shards_total": m.num_shards,
        "shards_done": len(done),
        "rows_done": rows_done,
        "complete": len(done) == m.num_shards,
        "arrays": arrays,
        "bytes": total,
        "bytes_per_token": (total / tokens_done) if total is not None and tokens_done else None,
    }
