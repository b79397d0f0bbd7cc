"""Field names a student run asks for, the arrays behind them, and numpy -> torch conversion.

Sample/batch keys: ``row``, ``input_ids`` (T) int64, ``topk_logprobs`` (T, k) float32,
``topk_indices`` (T, k) int64, ``topk_logsumexp`` (T, n_temps) float32, ``temperatures``
(n_temps,) float32 (with any topk key, so a loss can pick a cached normaliser), and
``hidden_<layer>`` (T, d) in the stored dtype (bfloat16 is an exact view of the stored bits).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from kdcache.core.format import (
    ARRAY_INDICES,
    ARRAY_INPUT_IDS,
    ARRAY_LOGPROBS,
    ARRAY_LOGSUMEXP,
    Manifest,
    hidden_array,
)

__all__ = ["arrays_for", "expand_fields", "to_tensors"]

TOPK_KEYS = {
    "topk_logprobs": ARRAY_LOGPROBS,
    "topk_indices": ARRAY_INDICES,
    "topk_logsumexp": ARRAY_LOGSUMEXP,
}


def expand_fields(manifest: Manifest, fields: Iterable[str] | None) -> list[str]:
    """Normalise field names: ``"topk"`` -> its three keys, ``"hidden"`` -> every layer.

    ``None`` means everything the cache holds. Unknown names raise ValueError naming the
    fields the cache has.
    """
    available = ["input_ids"]
    if manifest.topk:
        available += list(TOPK_KEYS)
    available += [f"hidden_{layer}" for layer in manifest.hidden_layers]
    if fields is None:
        return available
    out: list[str] = []
    for f in [fields] if isinstance(fields, str) else fields:
        if f == "topk" and manifest.topk:
            names = list(TOPK_KEYS)
        elif f == "hidden":
            names = [f"hidden_{layer}" for layer in manifest.hidden_layers]
        elif f in available:
            names = [f]
        else:
            raise ValueError(
                f"field {f!r} is not in this cache; it has {available} "
                "(and the groups 'topk', 'hidden')"
            )
        out += [n for n in names if n not in out]
    return out


def arrays_for(fields: Iterable[str]) -> dict[str, str]:
    """Field key -> cache array name."""
    out = {}
    for f in fields:
        if f == "input_ids":
            out[f] = ARRAY_INPUT_IDS
        elif f in TOPK_KEYS:
            out[f] = TOPK_KEYS[f]
        elif f.startswith("hidden_"):
            out[f] = hidden_array(int(f.removeprefix("hidden_")))
    return out


def _tensor(field: str, data: np.ndarray, manifest: Manifest) -> torch.Tensor:
    if field in ("input_ids", "topk_indices"):
        return torch.from_numpy(data.astype(np.int64, copy=False))
    if field in ("topk_logprobs", "topk_logsumexp"):
        return torch.from_numpy(data.astype(np.float32, copy=False))
    t = torch.from_numpy(np.ascontiguousarray(data))
    if manifest.hidden_dtype == "bfloat16":
        return t.view(torch.int16).view(torch.bfloat16)
    return t


def to_tensors(
    manifest: Manifest, rows: np.ndarray, data: Mapping[str, np.ndarray]
) -> dict[str, torch.Tensor]:
    """Field key -> tensor for a block of rows (leading dimension = len(rows))."""
    out = {"row": torch.from_numpy(np.asarray(rows, dtype=np.int64))}
    for field, arr in data.items():
        out[field] = _tensor(field, arr, manifest)
    if any(f in data for f in TOPK_KEYS):
        temps = torch.tensor(manifest.temperatures, dtype=torch.float32)
        out["temperatures"] = temps.expand(len(rows), -1) if len(rows) else temps[None][:0]
    return out
