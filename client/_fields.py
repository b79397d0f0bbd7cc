"""Field names a student run asks for, the arrays behind them, and numpy -> torch conversion.

Sample/batch keys: ``row``, ``input_ids`` (T) int64, ``topk_logprobs`` (T, k) float32,
``topk_indices`` (T, k) int64, ``topk_logsumexp`` (T, n_temps) float32, ``temperatures``
(n_temps,) float32 (with any topk key, so a loss can pick a cached normaliser), ``loss_mask`` (T)
bool (with ``topk``, so losses train only the positions the cache marks), and ``hidden_<layer>``
(T, d) in the stored dtype (bfloat16 is an exact view of the stored bits).

``loss_mask[j]`` is true when position j's prediction of token j+1 is trained. A cache written
before the ``loss_mask`` array existed reads as true everywhere but the last position of a row
(:func:`default_loss_mask`).

``sample_indices`` (T, m) int64, ``sample_counts`` (T, m) int64 and ``sample_logprobs`` (T, m)
float32 (the teacher's draws at t=1; ``temperatures`` and ``loss_mask`` come with them too);
a cache written with ``outputs.sample_logprobs: false`` has ``sample_logprob_sums`` (T, 2) float32
in place of ``sample_logprobs`` (t=1 estimates only).

Coded hidden states (``outputs.hidden_codec``): int8 and fp8 decode to (T, d) float32 (the
per-token scale array is read alongside, under the internal key ``hidden_<layer>.scale``);
``pca:R`` gives its codes (T, R) in the stored dtype, or with ``bases`` the decoded (T, d)
float32 ``mean + codes @ basis``.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

import numpy as np
import torch

from kdcache.core.format import (
    ARRAY_INDICES,
    ARRAY_INPUT_IDS,
    ARRAY_LOGPROBS,
    ARRAY_LOGSUMEXP,
    ARRAY_LOSS_MASK,
    ARRAY_SAMPLE_COUNTS,
    ARRAY_SAMPLE_INDICES,
    ARRAY_SAMPLE_LOGPROB_SUMS,
    ARRAY_SAMPLE_LOGPROBS,
    Manifest,
    hidden_array,
)
from kdcache.core.hidden_basis import Basis
from kdcache.core.hidden_codec import (
    decode_pca,
    decode_scaled,
    from_storage,
    parse_hidden_codec,
    scale_array,
)
from kdcache.core.topk_codec import IdOrder, decode_logprobs

__all__ = [
    "LOSS_MASK",
    "arrays_for",
    "default_loss_mask",
    "expand_fields",
    "sample_keys",
    "stored_arrays",
    "to_tensors",
]

TOPK_KEYS = {
    "topk_logprobs": ARRAY_LOGPROBS,
    "topk_indices": ARRAY_INDICES,
    "topk_logsumexp": ARRAY_LOGSUMEXP,
}
SAMPLE_KEYS = {
    "sample_indices": ARRAY_SAMPLE_INDICES,
    "sample_counts": ARRAY_SAMPLE_COUNTS,
    "sample_logprobs": ARRAY_SAMPLE_LOGPROBS,
    "sample_logprob_sums": ARRAY_SAMPLE_LOGPROB_SUMS,
}
LOSS_MASK = "loss_mask"
SCALE_SUFFIX = ".scale"
"""Internal key suffix of a hidden field's per-token scales (never in a batch)."""


def sample_keys(manifest: Manifest) -> list[str]:
    """The batch keys of a cache's draws: indices, counts, and the draws' log-probs or, for a
    cache written with ``outputs.sample_logprobs: false``, their per-position sums."""
    last = "sample_logprobs" if manifest.sample_logprobs else "sample_logprob_sums"
    return ["sample_indices", "sample_counts", last]


def expand_fields(manifest: Manifest, fields: Iterable[str] | None) -> list[str]:
    """Normalise field names: ``"topk"`` / ``"sample"`` -> their three keys and ``loss_mask``,
    ``"hidden"`` -> every layer.

    ``None`` means everything the cache holds (``loss_mask`` included, stored or default).
    Unknown names raise ValueError naming the fields the cache has.
    """
    available = ["input_ids"]
    if manifest.topk:
        available += list(TOPK_KEYS)
    available.append(LOSS_MASK)
    available += [f"hidden_{layer}" for layer in manifest.hidden_layers]
    if manifest.sample_draws:
        available += sample_keys(manifest)
    if fields is None:
        return available
    out: list[str] = []
    for f in [fields] if isinstance(fields, str) else fields:
        if f == "topk" and manifest.topk:
            names = [*TOPK_KEYS, LOSS_MASK]
        elif f == "sample" and manifest.sample_draws:
            names = [*sample_keys(manifest), LOSS_MASK]
        elif f == "hidden":
            names = [f"hidden_{layer}" for layer in manifest.hidden_layers]
        elif f in available:
            names = [f]
        else:
            raise ValueError(
                f"field {f!r} is not in this cache; it has {available} "
                "(and the groups 'topk', 'sample', 'hidden')"
            )
        out += [n for n in names if n not in out]
    return out


def arrays_for(fields: Iterable[str]) -> dict[str, str]:
    """Field key -> cache array name (``loss_mask`` maps to its array even where a cache lacks
    it; see :func:`stored_arrays`)."""
    out = {}
    for f in fields:
        if f == "input_ids":
            out[f] = ARRAY_INPUT_IDS
        elif f == LOSS_MASK:
            out[f] = ARRAY_LOSS_MASK
        elif f in TOPK_KEYS:
            out[f] = TOPK_KEYS[f]
        elif f in SAMPLE_KEYS:
            out[f] = SAMPLE_KEYS[f]
        elif f.startswith("hidden_"):
            layer = int(f.removeprefix("hidden_"))
            out[f] = hidden_array(layer)
            out[f + SCALE_SUFFIX] = scale_array(layer)  # stored by int8 / fp8 caches only
    return out


def stored_arrays(fields: Iterable[str], present: Container[str]) -> dict[str, str]:
    """Field key -> array name for the fields whose array the cache holds (``present``); the
    others (a ``loss_mask`` of an older cache) are made by :func:`to_tensors`."""
    return {f: name for f, name in arrays_for(fields).items() if name in present}


def default_loss_mask(n: int, stored_len: int, seq_len: int | None = None) -> np.ndarray:
    """(n, T) bool, the mask of a cache without ``loss_mask``: true but at the stored row's last
    position; T = ``seq_len`` when rows are cropped (the crop then keeps only true positions)."""
    mask = np.ones((n, stored_len), dtype=bool)
    mask[:, -1] = False
    return mask if seq_len is None else mask[:, :seq_len]


_ID_ORDERS: dict[tuple[str, int, int], IdOrder] = {}


def _id_order(manifest: Manifest) -> IdOrder:
    """The manifest's IdOrder, built once per cache (a vocabulary-sized table)."""
    key = (manifest.cache_id, manifest.vocab_size, len(manifest.topk_id_order))
    found = _ID_ORDERS.get(key)
    if found is None:
        found = _ID_ORDERS[key] = IdOrder(manifest.topk_id_order, manifest.vocab_size)
    return found


def _tensor(field: str, data: np.ndarray, manifest: Manifest) -> torch.Tensor:
    if field in ("topk_indices", "sample_indices") and manifest.topk_id_order:  # -xz: codes
        return torch.from_numpy(_id_order(manifest).decode(data))
    if field in ("input_ids", "topk_indices", "sample_indices", "sample_counts"):
        return torch.from_numpy(data.astype(np.int64, copy=False))
    if field == "topk_logprobs" and manifest.topk_codec != "fp16":
        data = decode_logprobs(data, manifest.topk_codec)
    if field in ("topk_logprobs", "topk_logsumexp", "sample_logprobs", "sample_logprob_sums"):
        return torch.from_numpy(data.astype(np.float32, copy=False))
    if field == LOSS_MASK:
        return torch.from_numpy(data.astype(np.bool_, copy=False))
    t = torch.from_numpy(np.ascontiguousarray(data))
    if manifest.hidden_dtype == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16)
    return t


def _hidden(
    field: str,
    arr: np.ndarray,
    data: Mapping[str, np.ndarray],
    manifest: Manifest,
    bases: Basis | None,
) -> torch.Tensor:
    """A coded hidden field as a tensor: 8-bit codes decoded, pca codes as stored or decoded."""
    codec = parse_hidden_codec(manifest.hidden_codec)
    if codec.scaled:
        scale = data[field + SCALE_SUFFIX]
        return torch.from_numpy(decode_scaled(arr, scale, codec.kind))
    if bases is not None:
        vecs, mean = bases[int(field.removeprefix("hidden_"))]
        return torch.from_numpy(decode_pca(from_storage(arr, manifest.hidden_dtype), vecs, mean))
    return _tensor(field, arr, manifest)


def to_tensors(
    manifest: Manifest,
    rows: np.ndarray,
    data: Mapping[str, np.ndarray],
    fields: Iterable[str] = (),
    seq_len: int | None = None,
    bases: Basis | None = None,
) -> dict[str, torch.Tensor]:
    """Field key -> tensor for a block of rows (leading dimension = len(rows)).

    ``bases`` (layer -> (basis, mean)) decodes a ``pca:R`` cache's codes to full width.

    ``fields`` asked but absent from ``data`` (only ``loss_mask`` can be) get their default,
    cropped to ``seq_len``.
    """
    out = {"row": torch.from_numpy(np.asarray(rows, dtype=np.int64))}
    codec = parse_hidden_codec(manifest.hidden_codec)
    for field, arr in data.items():
        if field.endswith(SCALE_SUFFIX):
            continue
        if field.startswith("hidden_") and codec.kind != "exact":
            out[field] = _hidden(field, arr, data, manifest, bases)
        else:
            out[field] = _tensor(field, arr, manifest)
    if LOSS_MASK in fields and LOSS_MASK not in data:
        mask = default_loss_mask(len(rows), manifest.seq_len, seq_len)
        out[LOSS_MASK] = torch.from_numpy(mask)
    if any(f in data for f in (*TOPK_KEYS, *SAMPLE_KEYS)):
        temps = torch.tensor(manifest.temperatures, dtype=torch.float32)
        out["temperatures"] = temps.expand(len(rows), -1) if len(rows) else temps[None][:0]
    return out
