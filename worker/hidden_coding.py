"""Coding a shard's hidden states for ``outputs.hidden_codec``, and the pca basis it needs.

:func:`encode_hidden` turns the float32 hidden states of a shard into the stored arrays
(:mod:`kdcache.core.hidden_codec`). For ``pca:R``, :func:`ensure_basis` gives the cache's basis:
the published one when there is one, else it runs the teacher on the dataset's first rows, fits
the basis (float64), writes and publishes it (:mod:`kdcache.core.hidden_basis`) before any shard
uses it. Two workers that start a job at the same instant may both fit; the record written last
wins, and :meth:`BasisHolder.current` lets a shard recode with the published basis before it is
written.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from kdcache.core.errors import IntegrityError
from kdcache.core.format import Manifest, hidden_array
from kdcache.core.hidden_basis import Basis, read_basis, read_basis_record, write_basis
from kdcache.core.hidden_codec import (
    encode_pca,
    encode_scaled,
    fit_pca,
    parse_hidden_codec,
    pca_fit_rows,
    scale_array,
    to_storage,
)
from kdcache.core.writer import CacheWriter

if TYPE_CHECKING:
    from kdcache.worker.runner import PreparedJob

__all__ = ["BasisHolder", "encode_hidden", "fit_basis"]

log = logging.getLogger(__name__)


def encode_hidden(data: dict[str, np.ndarray], m: Manifest, basis: Basis | None) -> None:
    """Replace ``data``'s float32 ``hidden/<layer>`` (B, T, d) by the cache's stored arrays
    (and add ``hidden_scale/<layer>`` for int8 / fp8); a no-op for ``exact``."""
    codec = parse_hidden_codec(m.hidden_codec)
    if codec.kind == "exact":
        return
    for layer in m.hidden_layers:
        h = data[hidden_array(layer)]
        if codec.scaled:
            data[hidden_array(layer)], data[scale_array(layer)] = encode_scaled(h, codec.kind)
        else:
            if basis is None:
                raise ValueError("a pca cache's hidden states need its basis")
            vecs, mean = basis[layer]
            data[hidden_array(layer)] = to_storage(encode_pca(h, vecs, mean), m.hidden_dtype)


def fit_basis(job: PreparedJob) -> tuple[Basis, int]:
    """Fit every cached layer's basis on the teacher's hidden states of the first rows; returns
    (basis, rows fitted on)."""
    from kdcache.worker.extract import extract_batches

    m = job.manifest
    codec = parse_hidden_codec(m.hidden_codec)
    n = pca_fit_rows(codec.rank, m.num_rows, m.seq_len)
    ids = job.source.rows(0, n)
    hidden = extract_batches(
        job.teacher,
        ids,
        batch_size=job.plan.spec.batch_size,
        topk=0,
        temperatures=[],
        layers=m.hidden_layers,
        hidden_dtype="float32",
        index_dtype=m.index_dtype,
    )
    basis = {layer: fit_pca(hidden[hidden_array(layer)], codec.rank) for layer in m.hidden_layers}
    log.info("fitted the pca:%d basis of layers %s on %d rows", codec.rank, m.hidden_layers, n)
    return basis, n


class BasisHolder:
    """The pca basis one worker codes with: read or fitted once, re-checked before each write."""

    def __init__(self, job: PreparedJob, writer: CacheWriter) -> None:
        self.job, self.writer = job, writer
        self.basis: Basis | None = None
        self.record: dict[str, Any] | None = None

    def get(self) -> Basis:
        """The published basis; fitted and published first when there is none."""
        if self.basis is None:
            self._load_or_fit()
        assert self.basis is not None  # set by _load_or_fit
        return self.basis

    def current(self) -> bool:
        """True when the basis in use is still the published one; else it is reloaded (another
        worker's fit won) and False is returned, so the caller codes its shard again."""
        record = read_basis_record(self.writer.storage)
        if record is not None and record == self.record:
            return True
        self.basis = self.record = None
        self._load_or_fit()
        return False

    def _load_or_fit(self) -> None:
        m, storage, group = self.job.manifest, self.writer.storage, self.writer.group
        record = read_basis_record(storage)
        if record is not None:
            try:
                self.basis, self.record = read_basis(group, m, record), record
                return
            except IntegrityError:  # overwritten under us by a racing fit: take the final one
                record = read_basis_record(storage)
                self.basis, self.record = read_basis(group, m, record), record
                return
        basis, rows = fit_basis(self.job)
        self.record = write_basis(group, storage, m, basis, rows)
        self.basis = basis
