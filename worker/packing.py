"""Tokenised documents to fixed-length rows, carrying each token's "trained target" flag.

``pack``: documents are concatenated, each followed by the separator (EOS) when there is one,
and the stream is cut into rows of ``seq_len``; the last partial row is dropped. A document may
continue from one row into the next; its flags travel with its tokens. ``pad``: one row per
document, truncated to ``seq_len`` and right-padded; padding is never a target.

Flags say which tokens are trained *as targets*: all of a plain text's tokens (and the separator
after it), only the assistant's tokens of a conversation (the separator after a conversation is
not the assistant's). The loss mask of a row is its flags shifted by one position
(:func:`kdcache.worker.datasets.shifted_mask`).
"""

from __future__ import annotations

import numpy as np

__all__ = ["pack_rows", "pad_rows"]

Rows = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(rows (n, T) int64, lengths (n,) int64 real tokens per row, targets (n, T) bool)."""


def pack_rows(
    docs: list[list[int]],
    flags: list[np.ndarray],
    seq_len: int,
    sep: int | None,
    sep_flag: bool,
) -> Rows:
    """Concatenate ``docs`` (each followed by ``sep`` flagged ``sep_flag``) into full rows."""
    extra = 1 if sep is not None else 0
    total = sum(len(d) + extra for d in docs)
    stream = np.empty(total, dtype=np.int64)
    targets = np.empty(total, dtype=bool)
    at = 0
    for d, f in zip(docs, flags, strict=True):
        stream[at : at + len(d)] = d
        targets[at : at + len(d)] = f
        at += len(d)
        if sep is not None:
            stream[at], targets[at] = sep, sep_flag
            at += 1
    n = total // seq_len
    rows = stream[: n * seq_len].reshape(n, seq_len)
    return rows, np.full(n, seq_len, dtype=np.int64), targets[: n * seq_len].reshape(n, seq_len)


def pad_rows(docs: list[list[int]], flags: list[np.ndarray], seq_len: int, pad_id: int) -> Rows:
    """One row per document: truncated to ``seq_len``, right-padded with ``pad_id``."""
    rows = np.full((len(docs), seq_len), pad_id, dtype=np.int64)
    targets = np.zeros((len(docs), seq_len), dtype=bool)
    lengths = np.empty(len(docs), dtype=np.int64)
    for r, (d, f) in enumerate(zip(docs, flags, strict=True)):
        n = min(len(d), seq_len)
        rows[r, :n] = d[:n]
        targets[r, :n] = f[:n]
        lengths[r] = n
    return rows, lengths, targets
