"""Ensembles of teachers: several caches over the same dataset, read together.

``CacheDataset([cache_a, cache_b, ...], weights=...)`` streams them and ``MultiCache`` gives random
access. The caches must hold the same rows (``input_ids`` compared shard by shard through the
completion records' SHA-256, and row by row where those differ) under the same vocabulary size
(different tokenizer files of the same size are logged, not refused); the first cache decides
the order of rows.

An ensemble batch keeps the shared keys ``row``, ``input_ids`` and ``loss_mask`` (true where every
teacher's mask is), adds ``teacher_weights`` (B, n) float32 (normalised to sum 1), and prefixes
every other key with its teacher: ``teacher{j}_topk_logprobs``, ``teacher{j}_topk_indices``,
``teacher{j}_topk_logsumexp``, ``teacher{j}_temperatures``, ``teacher{j}_hidden_<l>``, ...
:func:`kdcache.client.losses.kd_loss` recognises such a batch and distils from the teachers'
mixture (:mod:`kdcache.client._mixture`); :func:`teacher_view` gives one teacher's part with
the usual single-teacher keys (for ``hidden_losses``, say).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdcache.client._blocks import RowBlock
from kdcache.client._mixture import (
    SHARED_KEYS,
    TEACHER_WEIGHTS,
    teacher_key,
    teacher_view,
    teacher_weights,
)
from kdcache.client.cache import TeacherCache
from kdcache.core.errors import ManifestMismatchError, ShardIncompleteError
from kdcache.core.format import ARRAY_INPUT_IDS, Manifest
from kdcache.core.reader import CacheReader

__all__ = [
    "TEACHER_WEIGHTS",
    "MultiCache",
    "check_ensemble",
    "check_weights",
    "merge_teachers",
    "teacher_key",
    "teacher_view",
    "teacher_weights",
]

log = logging.getLogger(__name__)

Source = str | os.PathLike[str]


def as_sources(source: Source | Sequence[Source]) -> list[str]:
    """One source or a sequence of them, as a list of strings (at least one)."""
    if isinstance(source, (str, os.PathLike)):
        return [str(source)]
    out = [str(s) for s in source]
    if not out:
        raise ValueError("an ensemble needs at least one cache; got an empty list")
    return out


def check_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """The teachers' weights normalised to sum 1 (uniform when None)."""
    if weights is None:
        return (1.0 / n,) * n
    bad = [x for x in weights if isinstance(x, (bool, np.bool_, str, bytes))]
    if bad:  # float(True) is 1.0, float("2") is 2.0: a mask or a string is not a weight
        raise ValueError(f"weights must be numbers, one per cache; got {list(weights)!r}")
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights has {len(w)} entries for {n} caches; give one per cache")
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0; got {w}")
    top = max(w)  # scaled first: the sum of large finite weights can overflow to inf
    total = sum(x / top for x in w)
    return tuple(x / top / total for x in w)


def _vocabulary_problems(manifests: Sequence[Manifest], sources: Sequence[str]) -> list[str]:
    """Different vocabulary sizes or shapes, as problems; different tokenizer files of the same
    vocabulary size are only logged (a tokenizer saved again by another library version hashes
    differently, and would otherwise refuse caches that agree token for token)."""
    first, where = manifests[0], sources[0]
    problems = []
    for m, src in zip(manifests[1:], sources[1:], strict=True):
        if m.vocab_size != first.vocab_size:
            problems.append(
                f"vocabularies differ: {where} has vocab_size {first.vocab_size}, {src} has "
                f"{m.vocab_size}; an ensemble mixes distributions over one vocabulary"
            )
        elif (
            first.tokenizer_fingerprint
            and m.tokenizer_fingerprint
            and m.tokenizer_fingerprint != first.tokenizer_fingerprint
        ):
            log.warning(
                "%s and %s were made with different tokenizer files (%s vs %s) of the same "
                "vocabulary size %d; the ensemble assumes their ids mean the same tokens",
                where,
                src,
                first.tokenizer_fingerprint,
                m.tokenizer_fingerprint,
                m.vocab_size,
            )
        for name in ("num_rows", "seq_len"):
            a, b = getattr(first, name), getattr(m, name)
            if a != b:
                problems.append(f"{name} differs: {where} has {a}, {src} has {b}")
    return problems


def _shard_checksums(reader: CacheReader) -> dict[tuple[int, int], str | None]:
    return {(r.start, r.end): r.checksums.get(ARRAY_INPUT_IDS) for r in reader.completed().values()}


def first_differing_row(a: CacheReader, b: CacheReader) -> int | None:
    """The first row whose ``input_ids`` differ between two caches of equal shape, or None.

    Shards whose completion records carry the same SHA-256 of ``input_ids`` over the same rows
    are equal without reading them; the others are read and compared.
    """
    sums_b = _shard_checksums(b)
    for (start, end), digest in sorted(_shard_checksums(a).items()):
        if digest is not None and sums_b.get((start, end)) == digest:
            continue
        x = a.read(ARRAY_INPUT_IDS, slice(start, end))
        y = b.read(ARRAY_INPUT_IDS, slice(start, end))
        diff = np.flatnonzero((x != y).any(axis=1))
        if diff.size:
            return start + int(diff[0])
    return None


def check_ensemble(readers: Sequence[CacheReader], sources: Sequence[str]) -> None:
    """Refuse caches that cannot be read as one ensemble, with every problem named at once.

    Raises ShardIncompleteError for an incomplete cache and ManifestMismatchError for different
    vocabularies, shapes or ``input_ids`` (naming the caches and the first differing row).
    """
    for reader, src in zip(readers, sources, strict=True):
        if not reader.is_complete:
            m = reader.manifest
            raise ShardIncompleteError(
                f"cache {src} has {len(reader.completed())} of {m.num_shards} shards complete; "
                "an ensemble needs complete caches"
            )
    problems = _vocabulary_problems([r.manifest for r in readers], sources)
    if not problems:
        for reader, src in zip(readers[1:], sources[1:], strict=True):
            row = first_differing_row(readers[0], reader)
            if row is not None:
                problems.append(
                    f"input_ids differ: {sources[0]} and {src} first differ at row {row}; "
                    "an ensemble needs caches over the same rows"
                )
    if problems:
        raise ManifestMismatchError(
            "these caches cannot form an ensemble:\n  " + "\n  ".join(problems)
        )


def merge_teachers(
    parts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """One ensemble batch from each teacher's batch (same rows, leading dimension U).

    ``row`` and ``input_ids`` come from the first; ``loss_mask`` is the AND of those present;
    every other key of teacher j becomes ``teacher{j}_<key>``; ``teacher_weights`` is (U, n).
    """
    out: dict[str, torch.Tensor] = {k: parts[0][k] for k in ("row", "input_ids") if k in parts[0]}
    masks = [p["loss_mask"] for p in parts if "loss_mask" in p]
    if masks:
        mask = masks[0]
        for other in masks[1:]:
            mask = mask & other
        out["loss_mask"] = mask
    for j, part in enumerate(parts):
        out.update({teacher_key(j, k): v for k, v in part.items() if k not in SHARED_KEYS})
    rows = len(out["row"])
    out[TEACHER_WEIGHTS] = torch.tensor(weights, dtype=torch.float32).expand(rows, -1)
    return out


def merge_blocks(blocks: Sequence[RowBlock], weights: Sequence[float]) -> RowBlock:
    """Blocks of the same rows read from each teacher, as one block of ensemble samples."""
    tensors = merge_teachers([b.tensors for b in blocks], weights)
    return RowBlock(tensors, blocks[0].index, sum(b.nbytes for b in blocks))


def member_fields(manifest: Manifest, fields: Sequence[str] | None, source: str) -> list[str]:
    """The fields teacher caches after the first read: all asked but ``input_ids`` (None: all
    that cache holds)."""
    from kdcache.client._fields import expand_fields

    try:
        expanded = expand_fields(manifest, fields)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return [f for f in expanded if f != "input_ids"]


class MultiCache:
    """Random access to an ensemble of caches: :meth:`batch` gives ensemble batches.

    sources: caches over the same rows (local directories, ``s3://`` or service URLs); the
    first gives ``row`` and ``input_ids``. weights: one per cache (normalised; uniform if None).
    token, storage_options, decode_hidden: as for :class:`TeacherCache`, for every cache.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        weights: Sequence[float] | None = None,
        *,
        token: str | None = None,
        storage_options: dict[str, Any] | None = None,
        decode_hidden: bool = False,
    ) -> None:
        self.sources = as_sources(sources)
        self.weights = check_weights(weights, len(self.sources))
        self.caches = [
            TeacherCache(
                s, token=token, storage_options=storage_options, decode_hidden=decode_hidden
            )
            for s in self.sources
        ]
        check_ensemble([c.reader for c in self.caches], self.sources)

    @property
    def manifests(self) -> list[Manifest]:
        return [c.manifest for c in self.caches]

    @property
    def manifest(self) -> Manifest:
        """The first cache's manifest (rows, sequence length and vocabulary are shared)."""
        return self.caches[0].manifest

    def __len__(self) -> int:
        return len(self.caches[0])

    def batch(
        self, rows: Sequence[int] | np.ndarray, fields: Iterable[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """An ensemble batch for ``rows`` (keys in the module docstring)."""
        asked = None if fields is None else list(fields)
        parts = [self.caches[0].batch(rows, asked)]
        for cache, src in zip(self.caches[1:], self.sources[1:], strict=True):
            names = member_fields(cache.manifest, cache.fields if asked is None else asked, src)
            parts.append(cache.batch(rows, names))
        return merge_teachers(parts, self.weights)

    def __repr__(self) -> str:
        return f"MultiCache({self.sources!r}, weights={list(self.weights)})"
