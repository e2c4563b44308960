"""Rollup deltas: what one batch adds to the per-minute and per-hour counters.

Ingest feeds each newly stored event to a `RollupDelta`; `rows()` then gives
one row per (grain, start, router, replica) touched, with every counter,
ready for the upsert in `collector.ingest`. Only new events are fed, so a
re-sent batch adds nothing.

Rows with replica_pk = 0 (`ROUTER_LEVEL`) hold a router's totals: what it
counts of its own (decisions, choose_replicas time, attempts) and the sum of
every per-replica counter, so that totals never have to add up replicas.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from collector.bins import ATTEMPTS, CHOOSE_US, LATENCY_MS, STALENESS, rank_column
from collector.models import ROLLUP_COUNTS, ROLLUP_MAXIMA, ROLLUP_SUMS

GRAINS = (60, 3600)
ROUTER_LEVEL = 0  # replica_pk of the rows that hold a router's own counters

Key = Tuple[int, int, int]  # minute start, router_pk, replica_pk


class RollupDelta:
    def __init__(self) -> None:
        self._minutes: Dict[Key, Dict[str, float]] = {}

    def _row(self, ts: float, router_pk: int, replica_pk: int) -> Dict[str, float]:
        key = (int(ts // 60) * 60, router_pk, replica_pk)
        row = self._minutes.get(key)
        if row is None:
            row = self._minutes[key] = {}
        return row

    def decision(self, ts: float, router_pk: int, duration_us: int,
                 candidates: List[Tuple[int, Optional[float], Optional[str]]]) -> None:
        """`candidates`: (replica_pk, stats_age_s, stats_age_source) per ranked replica."""
        row = self._row(ts, router_pk, ROUTER_LEVEL)
        _add(row, "decisions")
        _add(row, CHOOSE_US.column(duration_us))
        _add(row, "choose_us_sum", duration_us)
        _max(row, "choose_us_max", duration_us)
        total = row
        for replica_pk, stats_age, age_source in candidates:
            for row in (self._row(ts, router_pk, replica_pk), total):
                _add(row, "candidates")
                if stats_age is None:
                    continue
                stats_age = max(stats_age, 0.0)  # clocks of replica and router may disagree slightly
                _add(row, STALENESS.column(stats_age))
                _add(row, "stale_stamped" if age_source == "stamped" else "stale_observed")
                _max(row, "stale_max", stats_age)

    def routed(self, ts: float, router_pk: int, replica_pk: int, rank: Optional[int],
               own_ranking: Optional[bool], attempts: Optional[int]) -> None:
        total = self._row(ts, router_pk, ROUTER_LEVEL)
        for row in (self._row(ts, router_pk, replica_pk), total):
            _add(row, "routed")
            _add(row, rank_column(rank))
            if own_ranking is False:
                _add(row, "handoffs")
        if attempts is not None:
            _add(total, ATTEMPTS.column(attempts))

    def completed(self, ts: float, router_pk: int, replica_pk: int, rejected: bool,
                  ok: Optional[bool], latency_ms: Optional[float]) -> None:
        for row in (self._row(ts, router_pk, replica_pk), self._row(ts, router_pk, ROUTER_LEVEL)):
            if rejected:
                _add(row, "rejections")
                continue
            _add(row, "completions")
            if ok is False:
                _add(row, "failures")
            if latency_ms is not None:
                _add(row, LATENCY_MS.column(latency_ms))
                _add(row, "latency_ms_sum", latency_ms)
                _max(row, "latency_ms_max", latency_ms)

    def rows(self) -> List[Dict[str, float]]:
        """Full rows for both grains, sorted by key (a fixed lock order on Postgres)."""
        merged: Dict[Tuple[int, int, int, int], Dict[str, float]] = {}
        for (minute, router_pk, replica_pk), values in self._minutes.items():
            for grain in GRAINS:
                key = (grain, minute // grain * grain, router_pk, replica_pk)
                row = merged.get(key)
                if row is None:
                    merged[key] = dict(values)
                    continue
                for name, value in values.items():
                    if name in ROLLUP_MAXIMA:
                        _max(row, name, value)
                    else:
                        _add(row, name, value)
        out = []
        for key in sorted(merged):
            values = merged[key]
            row = dict(zip(("grain", "start", "router_pk", "replica_pk"), key))
            for name in ROLLUP_COUNTS:
                row[name] = values.get(name, 0)
            for name in ROLLUP_SUMS:
                row[name] = values.get(name, 0.0)
            for name in ROLLUP_MAXIMA:
                row[name] = values.get(name)
            out.append(row)
        return out


def _add(row: Dict[str, float], name: str, value: float = 1) -> None:
    row[name] = row.get(name, 0) + value


def _max(row: Dict[str, float], name: str, value: float) -> None:
    current = row.get(name)
    if current is None or value > current:
        row[name] = value
