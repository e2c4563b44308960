"""Rollup deltas: what one batch adds to the per-minute and per-hour counters.

Ingest adds a batch's newly stored events to a `RollupDelta`; `tuples()` (or
`rows()`, as dicts) then gives one row per (grain, start, router, replica)
touched, with every counter, ready for the upsert in `collector.ingest.writer`.
Only new events are added, so a re-sent batch adds nothing.

Rows with replica_pk = 0 (`ROUTER_LEVEL`) hold a router's totals: what it
counts of its own (decisions, choose_replicas time, attempts) and the sum of
every per-replica counter, so that totals never have to add up replicas.

This runs for every event ingested (tens of thousands a second), so it is
written for speed: a row is a list of values in `ROLLUP_VALUES` order, addressed
by precomputed positions, and an event only touches its replica's row; the
router totals are added up once per batch, in `tuples()`.
"""

from __future__ import annotations

from bisect import bisect_left
from operator import add
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple

from ..store.bins import ATTEMPTS, BELIEF_ERROR, CHOOSE_US, LATENCY_MS, REGRET, STALENESS, rank_column
from ..store.models import OTHER_REASONS, ROLLUP_COUNTS, ROLLUP_KEY, ROLLUP_MAXIMA, ROLLUP_SUMS, ROUTER_LEVEL
from .schema import CompletedEvent, DecisionEvent, Event, RoutedEvent

GRAINS = (60, 3600)

# A row's values, in this order: counters and sums (added), then maxima (max-ed, None when unknown).
ROLLUP_VALUES = (*ROLLUP_COUNTS, *ROLLUP_SUMS, *ROLLUP_MAXIMA)
_ADDED = len(ROLLUP_COUNTS) + len(ROLLUP_SUMS)  # ROLLUP_VALUES[:_ADDED] are added, the rest max-ed
_EMPTY = [0] * len(ROLLUP_COUNTS) + [0.0] * len(ROLLUP_SUMS) + [None] * len(ROLLUP_MAXIMA)
_AT = {name: i for i, name in enumerate(ROLLUP_VALUES)}

DECISIONS, CANDIDATES, ROUTED, HANDOFFS = _AT["decisions"], _AT["candidates"], _AT["routed"], _AT["handoffs"]
REJECTIONS, COMPLETIONS, FAILURES = _AT["rejections"], _AT["completions"], _AT["failures"]
STAMPED, OBSERVED, STALE_MAX = _AT["stale_stamped"], _AT["stale_observed"], _AT["stale_max"]
CHOOSE_SUM, CHOOSE_MAX = _AT["choose_us_sum"], _AT["choose_us_max"]
LATENCY_SUM, LATENCY_MAX = _AT["latency_ms_sum"], _AT["latency_ms_max"]
# Histogram bin i of a value is column FIRST + bisect_left(bounds, value) (see `collector.store.bins.Bins.column`).
STALE_FIRST, STALE_BOUNDS = _AT[STALENESS.columns[0]], tuple(STALENESS.bounds)
CHOOSE_FIRST, CHOOSE_BOUNDS = _AT[CHOOSE_US.columns[0]], tuple(CHOOSE_US.bounds)
LATENCY_FIRST, LATENCY_BOUNDS = _AT[LATENCY_MS.columns[0]], tuple(LATENCY_MS.bounds)
ATTEMPTS_FIRST, ATTEMPTS_BOUNDS = _AT[ATTEMPTS.columns[0]], tuple(ATTEMPTS.bounds)
REGRET_FIRST, REGRET_BOUNDS = _AT[REGRET.columns[0]], tuple(REGRET.bounds)
REGRET_SUM, REGRET_MAX = _AT["regret_sum"], _AT["regret_max"]
BELIEF_FIRST, BELIEF_BOUNDS = _AT[BELIEF_ERROR.columns[0]], tuple(BELIEF_ERROR.bounds)
BELIEF_SUM, BELIEF_ABS_SUM, BELIEF_ABS_MAX = _AT["belief_error_sum"], _AT["belief_error_abs_sum"], \
    _AT["belief_error_abs_max"]

Key = Tuple[int, int, int]  # minute start, router_pk, replica_pk


class RollupDelta:
    def __init__(self) -> None:
        self._minutes: Dict[Key, list] = {}
        # Kept in memory only, for the routing metrics (`collector.api.routing_metrics`): the rows mix
        # stamped and observed ages in one histogram and keep no sum of them.
        self.observed_stale_bins = [0] * len(STALENESS.columns)  # the histogram of the observed ages alone
        self.stale_sums = [0.0, 0.0]  # the ages added up: stamped, observed

    def _row(self, ts: float, router_pk: int, replica_pk: int) -> list:
        return self._row_at(int(ts // 60) * 60, router_pk, replica_pk)

    def _row_at(self, minute: int, router_pk: int, replica_pk: int) -> list:
        key = (minute, router_pk, replica_pk)
        row = self._minutes.get(key)
        if row is None:
            row = self._minutes[key] = _EMPTY[:]
        return row

    def add(self, events: Iterable[Event], router_pk: int, replica_pks: Mapping[str, int]) -> None:
        """Count newly stored events of a router, in order (stats and replicas
        events count nothing here). A decision's candidates without a key in
        `replica_pks` are not counted."""
        # Most events of a batch fall in the same minute: its rows are kept at hand, by replica_pk,
        # rather than looked up by (minute, router, replica) three times per decision.
        minute, rows = None, {}
        observed_bins, stamped_sum, observed_sum = self.observed_stale_bins, 0.0, 0.0
        for event in events:
            if not isinstance(event, DecisionEvent):
                if isinstance(event, RoutedEvent):
                    self.routed(event.ts, router_pk, replica_pks[event.replica_id], event.rank, event.own_ranking,
                                event.attempts)
                    refused = False
                elif isinstance(event, CompletedEvent):
                    self.completed(event.ts, router_pk, replica_pks[event.replica_id], event.rejected, event.ok,
                                   event.latency_ms)
                    refused = event.rejected  # a refusal is an answer; other completions are not
                    if not refused:
                        continue
                else:
                    continue
                if event.believed_queue_len is not None:  # else (v1, no cache) neither figure is known
                    self.answer(event.ts, router_pk, replica_pks[event.replica_id], event.believed_queue_len,
                                event.shortest_queue_len, event.reported_queue_len, refused)
                continue
            event_minute = int(event.ts // 60) * 60
            if event_minute != minute:
                minute, rows = event_minute, {}
            row = rows.get(ROUTER_LEVEL)
            if row is None:
                row = rows[ROUTER_LEVEL] = self._row_at(minute, router_pk, ROUTER_LEVEL)
            duration_us = event.duration_us
            row[DECISIONS] += 1
            row[CHOOSE_FIRST + bisect_left(CHOOSE_BOUNDS, duration_us)] += 1
            row[CHOOSE_SUM] += duration_us
            if row[CHOOSE_MAX] is None or duration_us > row[CHOOSE_MAX]:
                row[CHOOSE_MAX] = duration_us
            for replica_id, candidate in event.replicas.items():
                replica_pk = replica_pks.get(replica_id)
                if replica_pk is None:
                    continue
                row = rows.get(replica_pk)
                if row is None:
                    row = rows[replica_pk] = self._row_at(minute, router_pk, replica_pk)
                row[CANDIDATES] += 1
                stats_age = candidate.stats_age_s
                if stats_age is None:
                    continue
                if stats_age < 0.0:
                    stats_age = 0.0  # clocks of replica and router may disagree slightly
                else:
                    # In whole microseconds, as the raw ranking stores it: the rollups then agree
                    # with the raw rows, and with a copy of them imported elsewhere.
                    stats_age = round(stats_age * 1e6) / 1e6
                stale_bin = bisect_left(STALE_BOUNDS, stats_age)
                row[STALE_FIRST + stale_bin] += 1
                if candidate.stats_age_source == "stamped":
                    row[STAMPED] += 1
                    stamped_sum += stats_age
                else:
                    row[OBSERVED] += 1
                    observed_sum += stats_age
                    observed_bins[stale_bin] += 1
                if row[STALE_MAX] is None or stats_age > row[STALE_MAX]:
                    row[STALE_MAX] = stats_age
        self.stale_sums[0] += stamped_sum
        self.stale_sums[1] += observed_sum

    def routed(self, ts: float, router_pk: int, replica_pk: int, rank: Optional[int],
               own_ranking: Optional[bool], attempts: Optional[int]) -> None:
        row = self._row(ts, router_pk, replica_pk)
        row[ROUTED] += 1
        row[_AT[rank_column(rank)]] += 1
        if own_ranking is False:
            row[HANDOFFS] += 1
        if attempts is not None:
            self._row(ts, router_pk, ROUTER_LEVEL)[ATTEMPTS_FIRST + bisect_left(ATTEMPTS_BOUNDS, attempts)] += 1

    def completed(self, ts: float, router_pk: int, replica_pk: int, rejected: bool,
                  ok: Optional[bool], latency_ms: Optional[float]) -> None:
        row = self._row(ts, router_pk, replica_pk)
        if rejected:
            row[REJECTIONS] += 1
            return
        row[COMPLETIONS] += 1
        if ok is False:
            row[FAILURES] += 1
        if latency_ms is not None:
            row[LATENCY_FIRST + bisect_left(LATENCY_BOUNDS, latency_ms)] += 1
            row[LATENCY_SUM] += latency_ms
            if row[LATENCY_MAX] is None or latency_ms > row[LATENCY_MAX]:
                row[LATENCY_MAX] = latency_ms

    def answer(self, ts: float, router_pk: int, replica_pk: int, believed: int, shortest: Optional[int],
               reported: Optional[int], refused: bool) -> None:
        """A replica's answer (routed, or a refusal): the regret of the
        decision that chose it and the router's belief error, counted on the
        replica (docs/design.md, Definitions)."""
        row = self._row(ts, router_pk, replica_pk)
        if shortest is not None:
            regret = believed - shortest
            row[REGRET_FIRST + bisect_left(REGRET_BOUNDS, regret)] += 1
            row[REGRET_SUM] += regret
            if row[REGRET_MAX] is None or regret > row[REGRET_MAX]:
                row[REGRET_MAX] = regret
        error = belief_error(believed, reported, refused)
        if error is not None:
            size = abs(error)
            row[BELIEF_FIRST + bisect_left(BELIEF_BOUNDS, size)] += 1
            row[BELIEF_SUM] += error
            row[BELIEF_ABS_SUM] += size
            if row[BELIEF_ABS_MAX] is None or size > row[BELIEF_ABS_MAX]:
                row[BELIEF_ABS_MAX] = size

    def tuples(self) -> List[tuple]:
        """Full rows for both grains, (*ROLLUP_KEY, *ROLLUP_VALUES), sorted by key (a
        fixed lock order on Postgres). Router totals are the router's own
        counters plus the sum of its replicas' rows (a replica row holds none
        of the router's own counters, so adding whole rows is exact)."""
        minutes: Dict[Key, list] = {}
        for key, values in self._minutes.items():
            _merge(minutes, key, values)
            if key[2] != ROUTER_LEVEL:
                _merge(minutes, (key[0], key[1], ROUTER_LEVEL), values)
        merged: Dict[Tuple[int, int, int, int], list] = {}
        for (minute, router_pk, replica_pk), values in minutes.items():
            for grain in GRAINS:
                _merge(merged, (grain, minute // grain * grain, router_pk, replica_pk), values)
        return [(*key, *merged[key]) for key in sorted(merged)]

    def rows(self) -> List[Dict[str, float]]:
        """`tuples()` as dicts, column name -> value."""
        names = (*ROLLUP_KEY, *ROLLUP_VALUES)
        return [dict(zip(names, row)) for row in self.tuples()]


# Reasons of one deployment counted by name in `reason_rollups`: a bound, as the routing metrics bound their
# replica labels, so that a router that puts an id or a number in its reason cannot grow the table (and the
# Rank hits panel) without limit. The decisions of later reasons are counted under OTHER_REASONS.
MAX_REASONS_PER_DEPLOYMENT = 32


def reason_tuples(events: Iterable[Event], router_pk: int, named: Set[str]) -> List[tuple]:
    """The rows newly stored decisions add to `reason_rollups`, (*REASON_ROLLUP_KEY, decisions), for both
    grains, sorted by key: each reason in `named` under its own name, any other under OTHER_REASONS."""
    counts: Dict[tuple, int] = {}
    for event in events:
        reason = getattr(event, "reason", None)  # decisions have one (v3); other events none
        if reason is None:
            continue
        if reason not in named:
            reason = OTHER_REASONS
        minute = int(event.ts // 60) * 60
        for grain in GRAINS:
            key = (grain, minute // grain * grain, router_pk, reason)
            counts[key] = counts.get(key, 0) + 1
    return [(*key, counts[key]) for key in sorted(counts)]


def belief_error(believed: Optional[int], reported: Optional[int], refused: bool) -> Optional[int]:
    """The queue length the router believed minus the replica's count before
    this request: a replica that accepts counts the request it accepted in
    what it reports, one that refuses does not (docs/design.md, Definitions)."""
    if believed is None or reported is None:
        return None
    return believed - (reported if refused else max(reported - 1, 0))


def _merge(rows: Dict[tuple, list], key: tuple, values: list) -> None:
    """Add `values` into rows[key] (a copy of `values` when new)."""
    row = rows.get(key)
    if row is None:
        rows[key] = values[:]
        return
    row[:_ADDED] = map(add, row[:_ADDED], values[:_ADDED])
    for i in range(_ADDED, len(row)):
        value = values[i]
        if value is not None and (row[i] is None or value > row[i]):
            row[i] = value
