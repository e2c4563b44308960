"""`GET /v1/tail`: decisions as they are stored, live, as Server-Sent Events;
`routelens tail` and the dashboard's Decisions view read it.

Each stream follows the batches stored in the database, whichever process
stored them (`collector.query.tail.Follower`): it polls every POLL_S, at once
again while a poll brings a full page, each poll a few indexed queries on a
pooled connection given back at once. Ingest never waits on a stream: a
reader is only ever behind, and told what it missed when it falls too far.

The events: `hello` (where the stream starts), `decision`, `routed` and
`completed` (outcomes of decisions sent before), `missed` (how many events
this reader fell behind by and skipped), `unavailable` (the database cannot
be read now; the stream goes on once it can). Each poll that read batches
ends with an `id:` field, the number up to which every batch has been read
(`Follower.position`), so that a client that reconnects (a browser's
EventSource does by itself) sends it as `Last-Event-ID` and resumes after it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Dict, Mapping, Optional

from fastapi import HTTPException
from prometheus_client import Gauge
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool

from ..query.tail import Follower

POLL_S = 0.25  # between polls while nothing new is stored
KEEP_ALIVE_S = 15.0  # a comment line this often on an idle stream: proxies and clients keep it open


def no_window(query: Mapping[str, str]) -> None:
    """A stream has no window: it follows what is stored from now (or `Last-Event-ID`). Refused
    rather than ignored, so that a reader asking for a window is not shown something else."""
    given = [name for name in ("window", "since", "until") if name in query]
    if given:
        raise HTTPException(422, f"{', '.join(given)}: the tail has no window: it follows what is stored from now "
                                 "(or after Last-Event-ID); the other read endpoints take one")


def last_event_id(value: Optional[str]) -> Optional[int]:
    """The `Last-Event-ID` header: the number of a batch this stream sent, or None."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise HTTPException(422, f"Last-Event-ID: not an event id of this stream: {value[:80]!r}")
    return int(value)


def sse(record: Dict[str, Any], event_id: Optional[int] = None) -> str:
    """One Server-Sent Event: its type as the event name, the record as JSON data."""
    data = f"event: {record['type']}\ndata: {json.dumps(record, separators=(',', ':'))}\n"
    return data + (f"id: {event_id}\n\n" if event_id is not None else "\n")


async def stream(engine: Engine, follower: Follower, hello: Dict[str, Any], readers: Gauge) -> AsyncIterator[str]:
    """A reader's stream: `hello`, then records as batches are stored, keep-alive comments while idle.
    `readers`: the streams open (`Metrics.tail_readers`)."""
    readers.inc()
    try:
        yield sse({"type": "hello", **hello})
        idle_s, unavailable = 0.0, False
        while True:
            before = follower.position
            try:
                records = await run_in_threadpool(_poll, engine, follower)
            except (DBAPIError, PoolTimeout) as exc:
                if not unavailable:  # once, until the database answers again
                    cause = getattr(exc, "orig", None) or exc
                    yield sse({"type": "unavailable", "detail": f"database unavailable ({type(cause).__name__}); "
                                                                "retrying"})
                unavailable = True
                await asyncio.sleep(POLL_S)
                continue
            unavailable = False
            if records:
                yield "".join(sse(record) for record in records[:-1]) + sse(records[-1], follower.position)
                idle_s = 0.0
            elif follower.position != before:
                yield f"id: {follower.position}\n\n"  # batches read, none of them this reader's: where it is
                idle_s = 0.0
            if follower.more:
                continue  # a backlog: read on at once
            await asyncio.sleep(POLL_S)
            idle_s += POLL_S
            if idle_s >= KEEP_ALIVE_S:
                yield ": keep-alive\n\n"
                idle_s = 0.0
    finally:
        readers.dec()


def _poll(engine: Engine, follower: Follower):
    with engine.connect() as connection:
        return follower.poll(connection)
