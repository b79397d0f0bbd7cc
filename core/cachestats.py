"""The numbers ``kdcache report`` shows, computed from a cache alone (numpy, float64).

Exact from the cache (see the format's "exact probabilities"): with z_v = logprob_v + lse_1,
p_t(v) = exp(z_v / t - lse_t) for each cached v, so the top-k mass and the tail mass
1 - sum_topk p_t at every k' <= k are exact up to the float16 rounding of the log-probabilities.
The entropy is not: the cache does not say how the tail mass r spreads over the other V - k ids,
so it is reported as bounds. Each tail probability is at most min(p_k, r), hence
-log p >= -log min(p_k, r) (the lower bound); spreading r uniformly maximises entropy (the upper
bound, r log((V - k) / r)).

Big caches are sampled: a seeded random subset of completed rows, capped by positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.core.format import (
    ARRAY_LOGPROBS,
    ARRAY_LOGSUMEXP,
    ARRAY_LOSS_MASK,
)
from kdcache.core.hidden_basis import read_hidden
from kdcache.core.reader import CacheReader

__all__ = [
    "CacheStats",
    "ShardTiming",
    "bf16_bits_to_float32",
    "cache_stats",
    "entropy_bounds",
    "sample_rows",
    "tail_mass",
]

QUANTILES = (0.5, 0.95)
Progress = Callable[[int], None]
"""Called with the number of rows just read (a progress bar's ``update``)."""


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as their uint16 bits, widened exactly to float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def tail_mass(logprobs: np.ndarray, lse: np.ndarray, temperature: float) -> np.ndarray:
    """Mass left outside the top-k' for every k' = 1..k.

    logprobs: (P, k) top-k log-probabilities at t=1, sorted descending; lse: (P, 2) — columns
    lse_1 and lse_t. Returns (P, k) float64: column j is 1 - sum of the top j+1 probabilities at t.
    """
    z = logprobs.astype(np.float64) + lse[:, :1].astype(np.float64)
    p = np.exp(z / temperature - lse[:, 1:2].astype(np.float64))
    return np.clip(1.0 - np.cumsum(p, axis=1), 0.0, 1.0)


def entropy_bounds(
    logprobs: np.ndarray, lse: np.ndarray, temperature: float, vocab_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, top1) per position: entropy bounds in nats and the exact top-1 probability.

    Same inputs as :func:`tail_mass`. With k = V both bounds equal the exact entropy.
    """
    z = logprobs.astype(np.float64) + lse[:, :1].astype(np.float64)
    p = np.exp(z / temperature - lse[:, 1:2].astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        h_top = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
        r = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        rest = vocab_size - p.shape[1]
        if rest <= 0:
            return h_top, h_top, p[:, 0]
        cap = np.minimum(p[:, -1], r)
        lower = h_top + np.where(r > 0, -r * np.log(np.maximum(cap, 1e-300)), 0.0)
        upper = h_top + np.where(r > 0, r * np.log(rest / np.maximum(r, 1e-300)), 0.0)
    return lower, np.maximum(upper, lower), p[:, 0]


def sample_rows(done_rows: np.ndarray, max_rows: int, seed: int = 0) -> np.ndarray:
    """At most ``max_rows`` of ``done_rows``, drawn without replacement, sorted."""
    if done_rows.size <= max_rows:
        return np.sort(done_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(done_rows, size=max_rows, replace=False))


@dataclass(frozen=True)
class ShardTiming:
    """One completed shard: rows, tokens, seconds and who wrote it."""

    shard: int
    rows: int
    tokens: int
    seconds: float
    writer: str

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclass
class CacheStats:
    """Everything a report shows; JSON-ready through :meth:`to_dict`."""

    cache_id: str
    name: str
    vocab_size: int
    topk: int
    temperatures: list[float]
    num_rows: int
    seq_len: int
    rows_done: int
    rows_sampled: int
    positions: int
    sampled: bool
    masked: bool
    tail: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """temperature -> {"k": [1..k], "mean", "p50", "p95"}: tail mass at each k."""
    entropy: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """temperature -> {"lower", "upper", "top1"}: (P,) per sampled position (the histograms)."""
    hidden: dict[str, dict[str, float]] = field(default_factory=dict)
    """layer -> {"mean", "p5", "p25", "p50", "p75", "p95", "positions"}: L2 norm per position."""
    hidden_positions: int = 0
    shards: list[ShardTiming] = field(default_factory=list)
    shards_total: int = 0
    arrays: list[dict[str, Any]] = field(default_factory=list)
    bytes_total: int | None = None
    bytes_per_token: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the per-position entropy values become their summaries."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("entropy", "shards")}
        out["shards"] = [s.__dict__ | {"tokens_per_s": s.tokens_per_s} for s in self.shards]
        out["entropy"] = {
            t: {name: _summary(vals) for name, vals in v.items()} for t, v in self.entropy.items()
        }
        return out

    def tail_at(self, temperature: float, k: int, stat: str = "mean") -> float:
        """One number of the tail table: ``stat`` of the tail mass at top-``k``."""
        return self.tail[_tkey(temperature)][stat][k - 1]


def _summary(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {
        "mean": float(values.mean()),
        "p5": float(np.quantile(values, 0.05)),
        "p50": float(np.quantile(values, 0.5)),
        "p95": float(np.quantile(values, 0.95)),
    }


def _tkey(t: float) -> str:
    return f"{float(t):g}"


def _done_rows(reader: CacheReader) -> np.ndarray:
    parts = [np.arange(r.start, r.end) for r in reader.completed().values()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _blocks(rows: np.ndarray, size: int) -> list[np.ndarray]:
    return [rows[i : i + size] for i in range(0, rows.size, size)]


def _topk_stats(
    reader: CacheReader, rows: np.ndarray, stats: CacheStats, progress: Progress | None
) -> None:
    m = reader.manifest
    masked = ARRAY_LOSS_MASK in reader.arrays
    stats.masked = masked
    tails: dict[str, list[np.ndarray]] = {_tkey(t): [] for t in m.temperatures}
    ent: dict[str, dict[str, list[np.ndarray]]] = {
        _tkey(t): {"lower": [], "upper": [], "top1": []} for t in m.temperatures
    }
    positions = 0
    for block in _blocks(rows, max(1, 8192 // max(1, m.seq_len))):
        lp = reader.read(ARRAY_LOGPROBS, block).reshape(-1, m.topk)
        lse = reader.read(ARRAY_LOGSUMEXP, block).reshape(-1, len(m.temperatures))
        keep = np.isfinite(lse).all(axis=1) & np.isfinite(lp[:, 0])
        if masked:
            keep &= reader.read(ARRAY_LOSS_MASK, block).reshape(-1).astype(bool)
        lp, lse = lp[keep], lse[keep]
        positions += lp.shape[0]
        for i, t in enumerate(m.temperatures):
            cols = lse[:, [0, i]]
            tails[_tkey(t)].append(tail_mass(lp, cols, t).astype(np.float32))
            lo, hi, top1 = entropy_bounds(lp, cols, t, m.vocab_size)
            for name, vals in (("lower", lo), ("upper", hi), ("top1", top1)):
                ent[_tkey(t)][name].append(vals.astype(np.float32))
        if progress is not None:
            progress(block.size)
    stats.positions = positions
    for tk, parts in tails.items():
        all_tails = np.concatenate(parts) if parts else np.zeros((0, m.topk), np.float32)
        all64 = all_tails.astype(np.float64)
        stats.tail[tk] = {
            "k": list(range(1, m.topk + 1)),
            "mean": all64.mean(axis=0).tolist() if positions else [],
            **{
                f"p{int(q * 100)}": np.quantile(all64, q, axis=0).tolist() if positions else []
                for q in QUANTILES
            },
        }
        stats.entropy[tk] = {
            name: np.concatenate(v) if v else np.zeros(0, np.float32) for name, v in ent[tk].items()
        }


def _hidden_stats(reader: CacheReader, rows: np.ndarray, stats: CacheStats) -> None:
    m = reader.manifest
    for layer in m.hidden_layers:
        vals = read_hidden(reader, layer, rows)  # decoded whatever the hidden codec
        norms = np.linalg.norm(vals.astype(np.float32).reshape(-1, vals.shape[-1]), axis=1)
        norms = norms[np.isfinite(norms)].astype(np.float64)
        summary = _summary(norms)
        if norms.size:
            summary["p25"] = float(np.quantile(norms, 0.25))
            summary["p75"] = float(np.quantile(norms, 0.75))
        stats.hidden[str(layer)] = summary
    stats.hidden_positions = int(rows.size * m.seq_len) if m.hidden_layers else 0


def _shard_timings(reader: CacheReader) -> list[ShardTiming]:
    out = []
    for rec in sorted(reader.completed().values(), key=lambda r: r.shard):
        w = rec.writer
        who = w.get("worker_id") or (
            f"{w.get('host', '?')}:{w.get('pid', '?')}" if w else "unknown"
        )
        out.append(ShardTiming(rec.shard, rec.rows, rec.tokens, rec.seconds, str(who)))
    return out


def cache_stats(
    reader: CacheReader,
    *,
    max_positions: int = 262_144,
    max_hidden_positions: int = 16_384,
    seed: int = 0,
    progress: Progress | None = None,
) -> CacheStats:
    """Compute a report's numbers over at most ``max_positions`` sampled positions.

    Rows are drawn (seeded) from completed shards only; hidden-state norms use the first
    ``max_hidden_positions`` positions' worth of those rows (hidden arrays are the big ones).
    """
    from kdcache.core.inspect import inspect_cache

    m = reader.manifest
    done = _done_rows(reader)
    rows = sample_rows(done, max(1, max_positions // max(1, m.seq_len)), seed)
    info = inspect_cache(reader.url, reader)
    stats = CacheStats(
        cache_id=m.cache_id,
        name=m.name,
        vocab_size=m.vocab_size,
        topk=m.topk,
        temperatures=[float(t) for t in m.temperatures],
        num_rows=m.num_rows,
        seq_len=m.seq_len,
        rows_done=int(done.size),
        rows_sampled=int(rows.size),
        positions=0,
        sampled=rows.size < done.size,
        masked=False,
        shards=_shard_timings(reader),
        shards_total=m.num_shards,
        arrays=[
            {
                "name": a["name"],
                "bytes": a["bytes"],
                "bytes_per_token": (
                    a["bytes"] / (done.size * m.seq_len)
                    if a["bytes"] is not None and done.size
                    else None
                ),
            }
            for a in info["arrays"]
        ],
        bytes_total=info["bytes"],
        bytes_per_token=info["bytes_per_token"],
    )
    if m.topk > 0 and rows.size:
        _topk_stats(reader, rows, stats, progress)
    if m.hidden_layers and rows.size:
        hidden_rows = rows[: max(1, max_hidden_positions // max(1, m.seq_len))]
        _hidden_stats(reader, hidden_rows, stats)
    return stats
