"""Prometheus metrics of one collector app, in a registry of its own.

Counters of this process (events ingested by type, duplicates, batches
rejected by reason, ingest latency), and, read from the database at scrape
time, what every source reported: events produced, dropped by reason, and
lost batches. The latter are shared by all collectors on one database.
"""

from __future__ import annotations

from typing import Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy.engine import Engine

from collector import queries


class _SourceCounters:
    """A custom collector: per-source counters, as the sources last reported them."""

    def __init__(self, engine: Engine):
        self._engine = engine

    def collect(self):
        produced = GaugeMetricFamily("routelens_source_events_produced",
                                     "Events a traced router generated (as it last reported)", labels=["source_id"])
        dropped = GaugeMetricFamily("routelens_source_events_dropped",
                                    "Events a traced router dropped, by reason (as it last reported)",
                                    labels=["source_id", "reason"])
        gaps = GaugeMetricFamily("routelens_source_batch_gaps",
                                 "Batches missing from a source's sequence (lost)", labels=["source_id"])
        with self._engine.connect() as connection:
            sources = queries.sources_in(connection)
        for source in sources:
            if source["produced"] is not None:
                produced.add_metric([source["source_id"]], source["produced"])
            for reason, count in source["dropped"].items():
                dropped.add_metric([source["source_id"], reason], count)
            gaps.add_metric([source["source_id"]], source["batch_gaps"])
        return [produced, dropped, gaps]


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=False)
        self._events = Counter("routelens_events_ingested", "Events stored", ["type"], registry=self.registry)
        self._duplicates = Counter("routelens_events_duplicate", "Events received again and not stored",
                                   registry=self.registry)
        self._rejected = Counter("routelens_batches_rejected", "Batches refused, by reason", ["reason"],
                                 registry=self.registry)
        self._latency = Histogram("routelens_ingest_seconds", "Time to read, validate and store one batch",
                                  registry=self.registry,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.registry.register(_SourceCounters(engine))

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
