"""Prometheus metrics through ``prometheus_client``: request latency per process, and job,
shard, token and lease-expiry numbers read from the database at scrape time (so every service
process reports the same values).

Every label is bounded: ``route`` is the route template (or ``unmatched``), ``method`` one of the
standard HTTP methods (anything else is ``other``), ``status`` a status code the app sends. A
flood of requests with made-up methods or paths cannot grow the exposition.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kdcache.service.store import MetricsSnapshot

__all__ = ["BUCKETS", "CONTENT_TYPE", "METHODS", "RequestHistogram", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class RequestHistogram:
    """``kdcache_request_seconds`` by route template, method and status, in its own registry
    (one per app: tests build many apps in one process)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._hist = Histogram(
            "kdcache_request_seconds",
            "Request latency by route template, method and status.",
            ("route", "method", "status"),
            buckets=buckets,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        label = method if method in METHODS else "other"
        self._hist.labels(route, label, str(status)).observe(seconds)


class _Snapshot(Collector):
    def __init__(self, snap: MetricsSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("kdcache_jobs", "Jobs by state.", labels=["state"])
        for state, n in sorted(self.snap.jobs.items()):
            jobs.add_metric([state], n)
        yield jobs
        yield CounterMetricFamily(
            "kdcache_shards_done",
            "Shards completed by workers (not counting shards carried over from earlier jobs).",
            value=self.snap.shards_done,
        )
        yield CounterMetricFamily(
            "kdcache_tokens_written",
            "Tokens in shards completed by workers.",
            value=self.snap.tokens_written,
        )
        yield CounterMetricFamily(
            "kdcache_lease_expiries",
            "Leases whose deadline passed and whose shard went back to the queue.",
            value=self.snap.lease_expiries,
        )


def render_metrics(snap: MetricsSnapshot, histogram: RequestHistogram) -> str:
    """The whole exposition: job states, shards, tokens, lease expiries, request latency."""
    db = CollectorRegistry(auto_describe=False)
    db.register(_Snapshot(snap))
    return (generate_latest(db) + generate_latest(histogram.registry)).decode()
