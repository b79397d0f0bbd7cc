"""Prometheus text exposition (format 0.0.4), written by hand: a few series, no registry.

Job, shard, token and lease-expiry numbers come from the database at scrape time, so every
service process reports the same values; the request-latency histogram is per process.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from kdcache.service.store import MetricsSnapshot

__all__ = ["BUCKETS", "CONTENT_TYPE", "RequestHistogram", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs) + "}"


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class _Series:
    __slots__ = ("counts", "sum", "total")

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.sum = 0.0
        self.total = 0


class RequestHistogram:
    """``kdcache_request_seconds`` by route template, method and status; thread-safe."""

    name = "kdcache_request_seconds"

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.buckets = buckets
        self._series: dict[tuple[str, str, str], _Series] = {}
        self._lock = threading.Lock()

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, str(status))
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _Series(len(self.buckets))
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    series.counts[i] += 1
            series.sum += seconds
            series.total += 1

    def lines(self) -> list[str]:
        out = [
            f"# HELP {self.name} Request latency by route template, method and status.",
            f"# TYPE {self.name} histogram",
        ]
        with self._lock:
            items = sorted(self._series.items())
            snapshot = [(k, list(s.counts), s.sum, s.total) for k, s in items]
        for (route, method, status), counts, total_s, n in snapshot:
            base = [("route", route), ("method", method), ("status", status)]
            for bound, c in zip((*self.buckets, math.inf), (*counts, n), strict=True):
                out.append(f"{self.name}_bucket{_labels([*base, ('le', _num(bound))])} {c}")
            out.append(f"{self.name}_sum{_labels(base)} {_num(total_s)}")
            out.append(f"{self.name}_count{_labels(base)} {n}")
        return out


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"] + [
        f"{name}{labels} {_num(v)}" for labels, v in samples
    ]


def render_metrics(snap: MetricsSnapshot, histogram: RequestHistogram) -> str:
    """The whole exposition: job states, shards, tokens, lease expiries, request latency."""
    lines = _metric(
        "kdcache_jobs",
        "gauge",
        "Jobs by state.",
        [(_labels([("state", s)]), n) for s, n in sorted(snap.jobs.items())],
    )
    lines += _metric(
        "kdcache_shards_done_total",
        "counter",
        "Shards completed by workers (not counting shards carried over from earlier jobs).",
        [("", snap.shards_done)],
    )
    lines += _metric(
        "kdcache_tokens_written_total",
        "counter",
        "Tokens in shards completed by workers.",
        [("", snap.tokens_written)],
    )
    lines += _metric(
        "kdcache_lease_expiries_total",
        "counter",
        "Leases whose deadline passed and whose shard went back to the queue.",
        [("", snap.lease_expiries)],
    )
    lines += histogram.lines()
    return "\n".join(lines) + "\n"
