"""Retention: pruning raw events (and old per-minute rollups) with an injected
clock, on SQLite and PostgreSQL. Panels read rollups, so they must not change."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from routelens.collector.store import retention as retention_module
from routelens.collector.store.models import RAW_TABLES, prefix_rollups, rollups
from routelens.collector.store.retention import Retention

DAY, HOUR = 86400, 3600
NOW = (int(time.time()) // HOUR) * HOUR  # the injected clock; events are older
OLD = NOW - 3 * DAY + 600  # past a one-day retention
NEW = NOW - 2 * HOUR  # within it
PANELS = ("/v1/summary", "/v1/distribution", "/v1/rank-hits", "/v1/staleness", "/v1/prefix-affinity")


def _traffic(src, ts, n):
    events = [src.replicas(ts, ["r1", "r2", "r3"])]
    for i in range(n):
        t = ts + i * 7.3  # spread over several minutes
        replica = ("r1", "r2", "r3")[i % 3]
        d = src.decision(t, [[replica, "r3"]], request_id=f"q{ts}-{i}", internal_request_id=f"i{ts}-{i}",
                         candidates={replica: {"stats_age_s": 0.1 * (i % 7), "stats_age_source": "stamped"}})
        d["attributes"] = {"prefix_group": f"g{i % 4}", "prompt_chars": 100 + i}  # for Prefix affinity
        r = src.routed(t + 0.001, replica, d, rank=0 if i % 4 else 1)
        events += [d, r, src.completed(t + 0.002, replica, r)]
    return events


def _raw_ids(collector):
    with collector.engine.connect() as connection:
        return {table.name: {row.id for row in connection.execute(select(table.c.id))} for table in RAW_TABLES}


@pytest.fixture
def stored(collector, make_source, monkeypatch):
    """Old and new traffic of one source; small chunks, so that pruning takes several."""
    monkeypatch.setattr(retention_module, "CHUNK_ROWS", 7)
    monkeypatch.setattr(retention_module, "PAUSE_S", 0.0)
    src = make_source("s1")
    old, new = _traffic(src, OLD, 20), _traffic(src, NEW, 10)
    collector.store(src.batch(old))
    collector.store(src.batch(new))
    return collector, old, new


def test_prune_deletes_old_raw_rows_and_keeps_rollups(stored):
    collector, old, new = stored
    whole = {"since": OLD - HOUR, "until": NOW}
    panels = {path: collector.get(path, **whole) for path in PANELS}
    rollup_rows = collector.rollup_rows()
    assert panels["/v1/summary"]["routed"] == 30
    deleted = Retention(collector.engine, raw_s=DAY, minute_rollups_s=None, clock=lambda: NOW).prune_once()
    assert deleted == len(old)
    remaining = _raw_ids(collector)
    assert set().union(*remaining.values()) == {e["id"] for e in new}
    # Rollups untouched: every panel shows the pruned period as before.
    assert collector.rollup_rows() == rollup_rows
    assert {path: collector.get(path, **whole) for path in PANELS} == panels
    # Drill-down has nothing left of the old period, everything of the new one.
    assert collector.get("/v1/decisions", since=OLD - HOUR, until=OLD + HOUR)["decisions"] == []
    kept = collector.get("/v1/decisions", since=NEW - HOUR, until=NOW, limit=500)["decisions"]
    assert {d["id"] for d in kept} == {e["id"] for e in new if e["type"] == "decision"}
    # Nothing more to prune.
    assert Retention(collector.engine, raw_s=DAY, minute_rollups_s=None, clock=lambda: NOW).prune_once() == 0


def test_prune_minute_rollups_keeps_hourly_ones(stored):
    collector, old, new = stored
    hours = {"since": (OLD // HOUR) * HOUR, "until": NOW}  # whole hours: read from hourly rollups
    panels = {path: collector.get(path, **hours) for path in PANELS}
    before = collector.rollup_rows()
    Retention(collector.engine, raw_s=None, minute_rollups_s=DAY, clock=lambda: NOW).prune_once()
    with collector.engine.connect() as connection:
        minutes = connection.execute(select(rollups.c.start).where(rollups.c.grain == 60)).scalars().all()
        hourly = connection.execute(select(rollups.c.start).where(rollups.c.grain == 3600)).scalars().all()
        prefix_starts = {grain: set(connection.execute(select(prefix_rollups.c.start).where(
            prefix_rollups.c.grain == grain)).scalars()) for grain in (60, 3600)}
    assert minutes and min(minutes) >= NOW - DAY
    assert sorted(set(hourly)) == sorted({row[1] for row in before if row[0] == 3600})
    assert prefix_starts[60] and min(prefix_starts[60]) >= NOW - DAY
    assert prefix_starts[3600] == set(hourly)
    assert {path: collector.get(path, **hours) for path in PANELS} == panels
    assert len(_raw_ids(collector)["decisions"]) == 30  # raw rows are another retention's


def test_sources_silent_for_the_retention_lose_their_batch_numbers(stored):
    collector, _, _ = stored
    (source,) = collector.get("/v1/sources", since=OLD, until=time.time() + 60)["sources"]
    assert source["batches"] == 2
    later = time.time() + 2 * DAY  # the source has been silent for longer than the retention
    Retention(collector.engine, raw_s=DAY, minute_rollups_s=None, clock=lambda: later).prune_once()
    (source,) = collector.get("/v1/sources", since=OLD, until=time.time() + 60)["sources"]
    assert (source["batches"], source["batch_gaps"]) == (0, 0)
    assert set().union(*_raw_ids(collector).values()) == set()
    assert collector.get("/v1/summary", since=OLD - HOUR, until=NOW)["routed"] == 30
