"""The stored pca basis of a ``pca:R`` cache: written once, published by a record, then read.

A ``pca:R`` cache holds, per cached layer, ``hidden_pca/<layer>/basis`` (R, d) float32 and
``hidden_pca/<layer>/mean`` (d,) float32 (plain Zarr arrays, one chunk each). Like a shard, the
basis becomes visible only through a record written after its arrays::

    _kdcache/hidden_pca.json    {"fit_rows": n, "checksums": {array name: SHA-256}}

So a worker that finds the record reads a complete basis, and one that died while writing it
left no record (the next worker fits again). The basis belongs to shard 0 (it is fitted on the
first rows): ``kdcache verify`` checks it with shard 0, and the service serves its chunks once
shard 0 is complete.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from kdcache.core.errors import CacheFormatError, IntegrityError
from kdcache.core.format import Manifest, hidden_array
from kdcache.core.hidden_codec import (
    decode_pca,
    decode_scaled,
    from_storage,
    parse_hidden_codec,
    scale_array,
)
from kdcache.core.shards import checksum
from kdcache.core.storage import Storage

if TYPE_CHECKING:
    from kdcache.core.reader import CacheReader, Rows

__all__ = [
    "BASIS_RECORD_KEY",
    "Basis",
    "basis_problems",
    "read_basis",
    "read_basis_record",
    "read_hidden",
    "write_basis",
]

BASIS_RECORD_KEY = "_kdcache/hidden_pca.json"

Basis = dict[int, tuple[np.ndarray, np.ndarray]]
"""layer -> (basis (R, d) float32, mean (d,) float32)."""


def read_basis_record(storage: Storage) -> dict[str, Any] | None:
    """The published record, or None when no basis is published yet."""
    try:
        raw = storage.read_bytes(BASIS_RECORD_KEY)
    except FileNotFoundError:
        return None
    try:
        record: dict[str, Any] = json.loads(raw)
        dict(record["checksums"])
    except (ValueError, KeyError, TypeError) as err:
        raise CacheFormatError(f"malformed pca basis record {BASIS_RECORD_KEY}: {err!r}") from None
    return record


def _arrays(basis: Basis, m: Manifest) -> dict[str, np.ndarray]:
    names = [name for name, _ in m.basis_arrays()]
    values = [a for layer in m.hidden_layers for a in basis[layer]]
    return dict(zip(names, values, strict=True))


def write_basis(
    group: zarr.Group, storage: Storage, m: Manifest, basis: Basis, fit_rows: int
) -> dict[str, Any]:
    """Write every layer's basis and mean, then publish them; returns the record.

    Overwrites arrays an unpublished (interrupted) fit left behind.
    """
    from kdcache.core.writer import compressors  # the cache's own codecs

    arrays = _arrays(basis, m)
    for name, shape in m.basis_arrays():
        value = np.ascontiguousarray(arrays[name], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{name} is {value.shape}, the cache needs {shape}")
        arr = group.create_array(
            name,
            shape=shape,
            dtype="float32",
            chunks=shape,
            compressors=compressors(),
            fill_value=0,
            attributes={"coding": "pca"},
            overwrite=True,
        )
        arr[...] = value
    record = {"fit_rows": int(fit_rows), "checksums": {k: checksum(v) for k, v in arrays.items()}}
    storage.write_bytes(BASIS_RECORD_KEY, json.dumps(record, sort_keys=True, indent=1).encode())
    return record


def read_basis(group: zarr.Group, m: Manifest, record: dict[str, Any] | None = None) -> Basis:
    """Every layer's (basis, mean) as stored; with ``record``, checked against its checksums
    (:class:`IntegrityError` on a mismatch)."""
    out: Basis = {}
    for layer in m.hidden_layers:
        pair = []
        for name, _ in m.basis_arrays():
            if not name.startswith(f"hidden_pca/{layer}/"):
                continue
            try:
                value = np.asarray(group[name][...], dtype=np.float32)  # type: ignore[index]
            except KeyError:
                raise CacheFormatError(f"the cache lacks its pca array {name!r}") from None
            want = None if record is None else record["checksums"].get(name)
            if want is not None and checksum(value) != want:
                raise IntegrityError(f"{name}: checksum mismatch with {BASIS_RECORD_KEY}")
            pair.append(value)
        out[layer] = (pair[0], pair[1])
    return out


def basis_problems(group: zarr.Group, storage: Storage, m: Manifest) -> list[str]:
    """What is wrong with a cache's stored basis (empty when it matches its record, or when the
    cache has no pca basis)."""
    if not m.basis_arrays():
        return []
    try:
        record = read_basis_record(storage)
    except CacheFormatError as err:
        return [str(err)]
    if record is None:
        return [f"pca basis: no {BASIS_RECORD_KEY} (the basis was never published)"]
    problems = []
    for name, _ in m.basis_arrays():
        try:
            got = checksum(np.asarray(group[name][...]))  # type: ignore[index]
        except KeyError:
            problems.append(f"{name}: missing")
            continue
        except Exception as err:  # a corrupt chunk fails to decode in many ways
            problems.append(f"{name}: unreadable ({type(err).__name__}: {err})")
            continue
        if got != record["checksums"].get(name):
            problems.append(f"{name}: checksum mismatch")
    return problems


def read_hidden(reader: CacheReader, layer: int, rows: Rows) -> np.ndarray:
    """Rows of a cached layer decoded to (len(rows), T, d) float32, whatever its codec."""
    m = reader.manifest
    codec = parse_hidden_codec(m.hidden_codec)
    raw = reader.read(hidden_array(layer), rows)
    if codec.scaled:
        return decode_scaled(raw, reader.read(scale_array(layer), rows), codec.kind)
    values = from_storage(raw, m.hidden_dtype)
    if codec.kind == "pca":
        vecs, mean = read_basis(reader.group, m)[layer]
        return decode_pca(values, vecs, mean)
    return values
