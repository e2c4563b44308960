"""Prometheus metrics of one collector app, in a registry of its own.

Counters of this collector (events ingested by type, duplicates, batches
rejected by reason, ingest latency, whether the retention pruner runs), and,
read from the database at scrape time, what every source reported: events
produced, dropped by reason, and lost batches. The latter are shared by all
collectors on one database.

With `--workers N` the collector is several processes, and a scrape reaches
one of them: each keeps its counters in `Settings.metrics_dir` (a private
directory of the command, prometheus-client's multiprocess mode, chosen by
PROMETHEUS_MULTIPROC_DIR when the workers start) and every scrape sums them
all, those of workers that have exited included.
"""

from __future__ import annotations

from typing import Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.engine import Engine

from ..query import figures


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
            sources = figures.sources_in(connection)
        for source in sources:
            if source["produced"] is not None:
                produced.add_metric([source["source_id"]], source["produced"])
            for reason, count in source["dropped"].items():
                dropped.add_metric([source["source_id"], reason], count)
            gaps.add_metric([source["source_id"]], source["batch_gaps"])
        return [produced, dropped, gaps]


def pruners_gauge(registry: Optional[CollectorRegistry]) -> Gauge:
    """The retention pruners running (`collector.store.retention`): 1 for a collector
    that prunes, whatever its number of workers; 0 with `--retention never`."""
    return Gauge("routelens_retention_pruners", "Retention pruners running in this collector (1, or 0 if none)",
                 registry=registry, multiprocess_mode="livesum")


class Metrics:
    def __init__(self, engine: Engine, metrics_dir: Optional[str] = None):
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
        self.pruners = pruners_gauge(own)
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
