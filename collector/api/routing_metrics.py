"""The routing KPIs on /metrics, counted at ingest: what routelens' own views
show, in the operator's Prometheus (docs/operations.md lists them).

Every figure is counted from what a batch stored (`collector.ingest.writer.StoredBatch`),
once, after its transaction committed, and most of it from the batch's rollup
rows, which ingest computes anyway: a batch costs a few dozen counter
increments whatever its size, and a scrape reads memory only, so it takes time
in proportion to the number of series, never to the data stored.

Histograms use the rollups' bins (`collector.store.bins`), in base units
(seconds), so that `histogram_quantile` over them lands in the same bin as the
dashboard's percentiles.

Each collector process counts what it stored. With `--workers N` the
counters live in prometheus-client's multiprocess files and every scrape sums
them (`collector.api.metrics`); with several collectors on one database each
exports what it stored and PromQL sums them (`sum without (instance)`), since
every event is stored by exactly one of them. Gauges say how they combine:
the stats period and membership take the value set last (`mostrecent`), a
source's last batch the latest (`max`).

Label cardinality is bounded: at most `replica_limit` (app, deployment,
replica) and `source_limit` sources get series of their own in a process;
later ones share the label value `_other` (and `routelens_metrics_overflow_total`
counts them). Decisions by reason have the bound of the reasons' rollups
(`collector.ingest.rollups.MAX_REASONS_PER_DEPLOYMENT` per deployment): the
reasons beyond it are counted there, and here, under `_other`.
"""

from __future__ import annotations

import threading
from operator import itemgetter
from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy import select
from sqlalchemy.engine import Engine

from ..ingest.rollups import ROLLUP_VALUES
from ..ingest.schema import ReplicasEvent, StatsEvent
from ..ingest.writer import StoredBatch
from ..query.figures import median_interval
from ..store.bins import CHOOSE_US, LATENCY_MS, RANK_COLUMNS, STALENESS
from ..store.models import OTHER_REASONS, REASON_ROLLUP_KEY, ROLLUP_KEY, ROUTER_LEVEL, Deployment, Replica

OTHER = "_other"  # the label value of series beyond the limit
DEFAULT_REPLICA_LIMIT = 2000
DEFAULT_SOURCE_LIMIT = 2000
STATS_PERIOD_SAMPLE = 400  # the newest stats changes the stats period is seen in, per deployment (docs/design.md)

# Ranks as the metrics group them: 0, 1, 2 and deeper, unknown.
RANK_LABELS = {column: ("2+" if column not in ("rank_0", "rank_1", "rank_unknown") else column[len("rank_"):])
               for column in RANK_COLUMNS}

_KEY = len(ROLLUP_KEY)
_AT = {name: _KEY + i for i, name in enumerate(ROLLUP_VALUES)}  # a rollup tuple's column positions
_GRAIN, _REPLICA = ROLLUP_KEY.index("grain"), ROLLUP_KEY.index("replica_pk")
# A reason rollup row: (*REASON_ROLLUP_KEY, decisions).
_REASON_GRAIN, _REASON = REASON_ROLLUP_KEY.index("grain"), REASON_ROLLUP_KEY.index("reason")
_HOUR = 3600


def _span(columns: Sequence[str]) -> slice:
    first = _AT[columns[0]]
    return slice(first, first + len(columns))


_STALE, _CHOOSE, _LATENCY = _span(STALENESS.columns), _span(CHOOSE_US.columns), _span(LATENCY_MS.columns)
_REPLICA_AT = tuple(_AT[name] for name in ("routed", "rejections", "completions", "failures"))


class SeriesLimit:
    """At most `limit` keys get label values of their own; the rest share OTHER."""

    def __init__(self, limit: int, overflow: Counter, kind: str):
        self.limit = limit
        self._known: set = set()
        self._lock = threading.Lock()
        self._overflow = overflow.labels(kind)
        self._folded: set = set()

    def admits(self, key: Hashable) -> bool:
        if key in self._known:
            return True
        with self._lock:
            if len(self._known) < self.limit:
                self._known.add(key)
                return True
            if key not in self._folded and len(self._folded) < 100_000:  # counted once each, in bounded memory
                self._folded.add(key)
                self._overflow.inc()
        return False


class RoutingMetrics:
    """The routing KPIs of one collector process, in `registry`."""

    def __init__(self, registry: CollectorRegistry, replica_limit: int = DEFAULT_REPLICA_LIMIT,
                 source_limit: int = DEFAULT_SOURCE_LIMIT):
        deployment = ["app", "deployment"]
        replica = [*deployment, "replica"]
        source = ["source_id", *deployment]

        def counter(name: str, what: str, labels: List[str]) -> Counter:
            return Counter(name, what, labels, registry=registry)

        def histogram(name: str, what: str, labels: List[str], bounds: Iterable[float], per_second: float) -> Histogram:
            return Histogram(name, what, labels, registry=registry, buckets=[bound / per_second for bound in bounds])

        self.decisions = counter("routelens_decisions", "choose_replicas rankings recorded", deployment)
        self.by_reason = counter("routelens_decisions_by_reason",
                                 "Decisions the router gave a reason for (routelens_explain), by reason",
                                 [*deployment, "reason"])
        self.routed = counter("routelens_routed_requests", "Requests routed to the replica (accepted)", replica)
        self.by_rank = counter("routelens_routed_requests_by_rank",
                               "Routed requests by the rank of their decision their replica came from "
                               "(0, 1, 2+, unknown)", [*deployment, "rank"])
        self.handoffs = counter("routelens_fifo_handoffs",
                                "Routed requests whose replica was found by another request's ranking (FIFO)",
                                deployment)
        self.refusals = counter("routelens_refusals", "Send attempts the replica refused (rejection protocol)",
                                replica)
        self.completions = counter("routelens_completed_requests",
                                   "Accepted requests completed, failed ones included", replica)
        self.failures = counter("routelens_failed_requests", "Completed requests whose attempt failed (ok false)",
                                replica)
        self.staleness = histogram("routelens_stats_staleness_seconds",
                                   "Age of the routing stats each ranked replica was ranked on, at decision time",
                                   [*deployment, "age_source"], STALENESS.bounds, 1)
        self.choose = histogram("routelens_choose_replicas_duration_seconds",
                                "Time spent in the wrapped choose_replicas", deployment, CHOOSE_US.bounds, 1e6)
        self.latency = histogram("routelens_request_latency_seconds",
                                 "Request latency as the router saw it (routed to completed)", deployment,
                                 LATENCY_MS.bounds, 1e3)
        self.stats_period = Gauge("routelens_stats_period_seconds",
                                  "The deployment's routing-stats period seen: median interval between two "
                                  "collections of one replica's stats, in the newest 400 stats changes this process "
                                  "stored",
                                  deployment, registry=registry, multiprocess_mode="mostrecent")
        self.member = Gauge("routelens_replica_member", "1 while the replica is a member of its deployment, else 0",
                            replica, registry=registry, multiprocess_mode="mostrecent")
        self.last_batch = Gauge("routelens_source_last_batch_timestamp_seconds",
                                "When the source's last batch was received (epoch seconds)", source,
                                registry=registry, multiprocess_mode="max")
        self.produced = counter("routelens_source_events_produced", "Events the source reports it generated",
                                source)
        self.dropped = counter("routelens_source_events_dropped", "Events the source reports it dropped, by reason",
                               [*source, "reason"])
        self.skipped = counter("routelens_source_batches_skipped",
                               "Batch numbers skipped over when a later batch arrived (lost, unless late)", source)
        self.late = counter("routelens_source_batches_late",
                            "Batches that arrived after a later one (found, after being counted skipped)", source)
        overflow = counter("routelens_metrics_overflow",
                           "Replicas or sources beyond the series limit, counted under the label value _other",
                           ["kind"])
        self.replicas = SeriesLimit(replica_limit, overflow, "replica")
        self.sources = SeriesLimit(source_limit, overflow, "source")
        self._lock = threading.Lock()  # the in-memory state below
        self._deployments: set = set()
        self._sources_seen: set = set()
        self._replicas_seen: set = set()
        self._members: Dict[Tuple[str, str], Tuple[float, set]] = {}  # deployment -> (event ts, member labels)
        # Per deployment, its newest stats changes: (event id, (source, replica), collection time).
        self._stats_changes: Dict[Tuple[str, str], List[Tuple[bytes, Tuple[str, str], float]]] = {}

    # --- labels ---

    def _replica(self, app: str, deployment: str, replica_id: str) -> Tuple[str, str, str]:
        return app, deployment, replica_id if self.replicas.admits((app, deployment, replica_id)) else OTHER

    def _deployment_seen(self, app: str, deployment: str) -> None:
        """Series of a deployment exist from its first batch on, at 0: rates and ratios over them then
        start from a known value, and a scrape shows the deployment before it routes anything."""
        if (app, deployment) in self._deployments:
            return
        self._deployments.add((app, deployment))
        for metric in (self.decisions, self.handoffs, self.choose, self.latency):
            metric.labels(app, deployment)
        for rank in sorted(set(RANK_LABELS.values())):
            self.by_rank.labels(app, deployment, rank)
        for age_source in ("stamped", "observed"):
            self.staleness.labels(app, deployment, age_source)

    def _replica_seen(self, labels: Tuple[str, str, str]) -> None:
        if labels in self._replicas_seen:
            return
        self._replicas_seen.add(labels)
        for metric in (self.routed, self.refusals, self.completions, self.failures):
            metric.labels(*labels)

    # --- counting ---

    def count(self, stored: StoredBatch) -> None:
        """Count what one batch stored (after its transaction committed)."""
        app, deployment = stored.identity[:2]
        self._deployment_seen(app, deployment)
        self._count_source(stored, app, deployment)
        if not stored.events:
            return
        if stored.stored_by_type.get("replicas"):
            self._membership(app, deployment, [e for e in stored.events if isinstance(e, ReplicasEvent)])
        if stored.stored_by_type.get("stats"):
            self._stats_period(app, deployment, stored.batch.source.source_id,
                               [e for e in stored.events if isinstance(e, StatsEvent)])
        router_row: Optional[list] = None
        replica_counts: Dict[int, List[int]] = {}
        for row in stored.rollup_rows:
            if row[_GRAIN] != _HOUR:  # the hourly rows hold it all (a batch that spans an hour: two of them)
                continue
            if row[_REPLICA] == ROUTER_LEVEL:
                router_row = list(row) if router_row is None else _added(router_row, row)
                continue
            counts = [row[i] for i in _REPLICA_AT]
            if not any(counts):
                continue  # ranked only
            known = replica_counts.get(row[_REPLICA])
            replica_counts[row[_REPLICA]] = counts if known is None else [a + b for a, b in zip(known, counts)]
        if router_row is not None:
            self._count_deployment(app, deployment, router_row, stored)
        for row in stored.reason_rows:
            if row[_REASON_GRAIN] == _HOUR:  # as the rollups: the hourly rows hold it all
                reason = row[_REASON]
                self.by_reason.labels(app, deployment, OTHER if reason == OTHER_REASONS else reason).inc(row[-1])
        if replica_counts:
            names = {pk: replica_id for replica_id, pk in stored.replica_pks.items()}
            for replica_pk, (routed, rejections, completions, failures) in replica_counts.items():
                labels = self._replica(app, deployment, names[replica_pk])
                self._replica_seen(labels)
                for metric, value in ((self.routed, routed), (self.refusals, rejections),
                                      (self.completions, completions), (self.failures, failures)):
                    if value:
                        metric.labels(*labels).inc(value)

    def _count_deployment(self, app: str, deployment: str, row: list, stored: StoredBatch) -> None:
        if row[_AT["decisions"]]:
            self.decisions.labels(app, deployment).inc(row[_AT["decisions"]])
        if row[_AT["handoffs"]]:
            self.handoffs.labels(app, deployment).inc(row[_AT["handoffs"]])
        ranks: Dict[str, int] = {}
        for column, label in RANK_LABELS.items():
            ranks[label] = ranks.get(label, 0) + row[_AT[column]]
        for label, value in ranks.items():
            if value:
                self.by_rank.labels(app, deployment, label).inc(value)
        stale = row[_STALE]
        if any(stale):
            observed = stored.delta.observed_stale_bins if row[_AT["stale_observed"]] else [0] * len(stale)
            stamped = [total - part for total, part in zip(stale, observed)]
            stamped_sum, observed_sum = stored.delta.stale_sums
            _observe(self.staleness.labels(app, deployment, "stamped"), stamped, stamped_sum)
            _observe(self.staleness.labels(app, deployment, "observed"), observed, observed_sum)
        _observe(self.choose.labels(app, deployment), row[_CHOOSE], row[_AT["choose_us_sum"]] / 1e6)
        _observe(self.latency.labels(app, deployment), row[_LATENCY], row[_AT["latency_ms_sum"]] / 1e3)

    def _count_source(self, stored: StoredBatch, app: str, deployment: str) -> None:
        batch, before = stored.batch, stored.before
        source_id = batch.source.source_id
        labels = (source_id if self.sources.admits(source_id) else OTHER, app, deployment)
        if labels not in self._sources_seen:  # from 0, as the deployment's series
            self._sources_seen.add(labels)
            for metric in (self.produced, self.skipped, self.late):
                metric.labels(*labels)
        self.last_batch.labels(*labels).set(stored.received_at)
        if not before.new_seq:  # a batch received before: nothing new about its source
            return
        if batch.seq < before.last_seq:
            self.late.labels(*labels).inc()
            return  # older news: the counters it carries were counted already
        if batch.seq > before.last_seq + 1:
            self.skipped.labels(*labels).inc(batch.seq - before.last_seq - 1)
        # The counters are cumulative at the source: the newest batch adds what changed since the last one.
        if batch.produced is not None and batch.produced > (before.produced or 0):
            self.produced.labels(*labels).inc(batch.produced - (before.produced or 0))
        for reason, count in batch.dropped.items():
            if count > before.dropped.get(reason, 0):
                self.dropped.labels(*labels, reason).inc(count - before.dropped.get(reason, 0))

    def _membership(self, app: str, deployment: str, events: List[ReplicasEvent]) -> None:
        """The newest `replicas` event seen decides who is a member (late, older ones change nothing)."""
        key = (app, deployment)
        with self._lock:
            newest = max(events, key=lambda event: event.ts)
            seen_at, before = self._members.get(key, (float("-inf"), set()))
            if newest.ts < seen_at:
                return
            now = {self._replica(app, deployment, member.replica_id) for member in newest.replicas}
            self._members[key] = (newest.ts, now)
        self._set_members(now, before - now)

    def _set_members(self, members: Iterable[Tuple[str, str, str]], gone: Iterable[Tuple[str, str, str]]) -> None:
        for labels in members:
            self._replica_seen(labels)
            self.member.labels(*labels).set(1)
        for labels in gone:
            if labels[2] != OTHER:
                self.member.labels(*labels).set(0)

    def _stats_period(self, app: str, deployment: str, source_id: str, events: List[StatsEvent]) -> None:
        """As `collector.query.figures.stats_period` defines it, over the newest stats changes this process
        stored (newest by event id, as the database orders them)."""
        key = (app, deployment)
        with self._lock:
            changes = self._stats_changes.setdefault(key, [])
            changes.extend((event.id.bytes, (source_id, event.replica_id),
                            event.collected_at if event.collected_at is not None else event.ts) for event in events)
            changes.sort(key=itemgetter(0))
            del changes[:-STATS_PERIOD_SAMPLE]
            period = median_interval((replica, at) for _id, replica, at in changes)
        if period is not None:
            self.stats_period.labels(app, deployment).set(period)

    def seed(self, engine: Engine) -> None:
        """At start: the deployments' current members from the database, their series at 0 and
        their membership 1, so that a replica that gets nothing shows as such before the next
        `replicas` event (read once, in proportion to the replicas, never at a scrape)."""
        with engine.connect() as connection:
            rows = connection.execute(
                select(Deployment.app, Deployment.deployment, Deployment.membership_at, Replica.replica_id)
                .join(Replica, Replica.deployment_pk == Deployment.pk)
                .where(Replica.added_at.is_not(None), Replica.removed_at.is_(None))
                .order_by(Deployment.pk, Replica.replica_id)).all()
        by_deployment: Dict[Tuple[str, str], Tuple[float, set]] = {}
        for app, deployment, membership_at, replica_id in rows:
            _, members = by_deployment.setdefault((app, deployment), (membership_at or 0.0, set()))
            members.add(self._replica(app, deployment, replica_id))
        with self._lock:
            for key, (at, members) in by_deployment.items():
                if key not in self._members:
                    self._members[key] = (at, members)
        for (app, deployment), (_, members) in by_deployment.items():
            self._deployment_seen(app, deployment)
            self._set_members(members, ())


def _added(into: list, row: Sequence) -> list:
    """Two rollup rows of one key's counters added (the maxima are not used here)."""
    for i in range(_KEY, len(into)):
        if row[i] is not None and into[i] is not None:
            into[i] += row[i]
    return into


def _observe(child: Histogram, counts: Sequence[int], total: float) -> None:
    """Add a histogram of observations (in the child's bins) and their sum in a few increments, not one
    `observe` each: prometheus-client keeps a histogram as one value per bin plus the sum, and
    `observe(value)` increments the bin it falls in and the sum, which is what this does in bulk."""
    if not any(counts):
        return
    for bucket, count in zip(child._buckets, counts):
        if count:
            bucket.inc(count)
    child._sum.inc(total)
