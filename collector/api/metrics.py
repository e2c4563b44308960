"""Prometheus metrics of one collector app, in a registry of its own.

Counters of this collector (events ingested by type, duplicates, batches
rejected by reason, ingest latency, requests refused because the database was
unavailable, whether the retention pruner runs), and the routing KPIs with
each source's health, counted at ingest (`collector.api.routing_metrics`).
Nothing is read from the database at a scrape: a scrape costs time in
proportion to the number of series, and answers while the database is away.

With `--workers N` the collector is several processes, and a scrape reaches
one of them: each keeps its counters in `Settings.metrics_dir` (a private
directory of the command, prometheus-client's multiprocess mode, chosen by
PROMETHEUS_MULTIPROC_DIR when the workers start) and every scrape sums them
all, those of workers that have exited included.
"""

from __future__ import annotations

from typing import Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy import event
from sqlalchemy.engine import Engine

from ..ingest.writer import IngestResult
from .routing_metrics import DEFAULT_REPLICA_LIMIT, DEFAULT_SOURCE_LIMIT, RoutingMetrics


def pruners_gauge(registry: Optional[CollectorRegistry]) -> Gauge:
    """The retention pruners running (`collector.store.retention`): 1 for a collector
    that prunes, whatever its number of workers; 0 with `--retention never`."""
    return Gauge("routelens_retention_pruners", "Retention pruners running in this collector (1, or 0 if none)",
                 registry=registry, multiprocess_mode="livesum")


class Metrics:
    def __init__(self, engine: Engine, metrics_dir: Optional[str] = None, routing: bool = True,
                 replica_limit: int = DEFAULT_REPLICA_LIMIT, source_limit: int = DEFAULT_SOURCE_LIMIT):
        """`routing`: count the routing KPIs (`RoutingMetrics`), seeded now with the
        deployments' current members."""
        # The registry scraped. With several workers, the metrics below count
        # into files (the registry they are made in is never scraped) that a
        # MultiProcessCollector sums.
        self.registry = CollectorRegistry(auto_describe=False)
        own = self.registry
        if metrics_dir is not None:
            own = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(self.registry, metrics_dir)
        self._events = Counter("routelens_events_ingested", "Events stored", ["type"], registry=own)
        self._duplicates = Counter("routelens_events_duplicate", "Events received again and not stored",
                                   registry=own)
        self._rejected = Counter("routelens_batches_rejected", "Batches refused, by reason", ["reason"],
                                 registry=own)
        self._latency = Histogram("routelens_ingest_seconds", "Time to read, validate and store one batch",
                                  registry=own,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self._unavailable = Counter("routelens_database_unavailable",
                                    "Requests answered 503 because the database was unavailable", registry=own)
        # For alerting while the database is away: /metrics itself still answers, from memory.
        self._available = Gauge("routelens_database_available",
                                "1 once this process last got a database connection, 0 once it last answered 503 "
                                "for want of one (the database unreachable, or every pooled connection busy)",
                                registry=own, multiprocess_mode="livemostrecent")
        self._available.set(1)  # the schema was just checked on it
        event.listen(engine, "checkout", lambda *_: self._available.set(1))  # (PostgreSQL: after a ping)
        self.tail_readers = Gauge("routelens_tail_readers", "Streams of GET /v1/tail open", registry=own,
                                  multiprocess_mode="livesum")
        self.pruners = pruners_gauge(own)
        self.routing = RoutingMetrics(own, replica_limit, source_limit) if routing else None
        if self.routing is not None:
            self.routing.seed(engine)

    def count_routing(self, result: IngestResult) -> None:
        """The routing KPIs of a stored batch: in the thread that stored it, not on the event loop."""
        if self.routing is not None and result.detail is not None:
            self.routing.count(result.detail)

    def database_unavailable(self) -> None:
        """A request answered 503 for want of the database."""
        self._unavailable.inc()
        self._available.set(0)

    def ingested(self, result, seconds: float) -> None:
        for kind, count in result.stored_by_type.items():
            self._events.labels(kind).inc(count)
        if result.duplicates:
            self._duplicates.inc(result.duplicates)
        self._latency.observe(seconds)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason).inc()

    def exposition(self) -> Tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
