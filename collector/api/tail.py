"""Decisions as they are stored, to live readers: `GET /v1/tail` (Server-Sent
Events), which `routelens tail` and the dashboard's Decisions view follow.

Ingest hands each stored batch to `Tail.publish` (`Ingestor.on_stored`), in
the order batches were stored. With no reader that is all it costs. With
readers, the batch's decisions, routed and completed events become records
(a decision carries its chosen replica, rank and outcome when they were in
its batch; later ones follow as records of their own, naming the decision),
and each reader's matching records go to its buffer: a bounded queue,
appended to and never waited on. A reader that falls behind loses what does
not fit and, when it catches up, is told how many records it missed, at the
point where they are missing. So a slow reader never slows ingest.

A reader sees what the process it reached stores: with `--workers N`, or
several collectors, each serves the batches it stored.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict, deque
from typing import Any, AsyncIterator, Deque, Dict, List, Optional, Set

from ..ingest.schema import CompletedEvent, DecisionEvent, RoutedEvent
from ..ingest.writer import StoredBatch
from ..query.filters import Filters

DEFAULT_BUFFER = 10_000  # records a reader may fall behind by before it misses some
KEEP_ALIVE_S = 15.0  # a comment line this often on an idle stream: proxies and clients keep it open
_DECISIONS_REMEMBERED = 100_000  # routed event -> its decision, for completions in later batches


class Reader:
    """One live reader: its filters and its bounded buffer of records."""

    def __init__(self, f: Filters, buffer: int, loop: asyncio.AbstractEventLoop):
        self.filters = f
        self.buffer = buffer
        self._records: Deque[Dict[str, Any]] = deque()
        self._missed = 0
        self._lock = threading.Lock()
        self._loop = loop
        self._ready = asyncio.Event()
        self._wake_pending = False

    def offer(self, records: List[Dict[str, Any]]) -> None:
        """From ingest's thread: never blocks on the reader."""
        with self._lock:
            for record in records:
                if len(self._records) >= self.buffer:
                    self._missed += 1
                    continue
                if self._missed:  # room again: say what is missing here, then go on
                    self._records.append({"type": "missed", "count": self._missed})
                    self._missed = 0
                self._records.append(record)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._loop.call_soon_threadsafe(self._ready.set)

    def take(self) -> List[Dict[str, Any]]:
        """On the event loop: every record waiting, and the count missed, if any, at the end."""
        with self._lock:
            records = list(self._records)
            self._records.clear()
            self._wake_pending = False
            self._ready.clear()
        return records

    def missed_now(self) -> int:
        """Records missed at the end of the buffer, once it has been emptied (told once)."""
        with self._lock:
            missed, self._missed = self._missed, 0
        return missed

    async def wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass


class Tail:
    def __init__(self, buffer: int = DEFAULT_BUFFER):
        self.buffer = buffer
        self._readers: Set[Reader] = set()
        self._lock = threading.Lock()
        self._decision_of: "OrderedDict[str, str]" = OrderedDict()  # routed id -> decision id

    def subscribe(self, f: Filters) -> Reader:
        reader = Reader(f, self.buffer, asyncio.get_running_loop())
        with self._lock:
            self._readers.add(reader)
        return reader

    def unsubscribe(self, reader: Reader) -> None:
        with self._lock:
            self._readers.discard(reader)
            if not self._readers:
                self._decision_of.clear()

    def publish(self, stored: StoredBatch) -> None:
        """A stored batch, from ingest's thread, in the order batches were stored."""
        if not self._readers or not stored.events:
            return
        with self._lock:
            readers = list(self._readers)
            records = self._records(stored)
        if not records:
            return
        app, deployment, router_class, labels_key = stored.identity
        labels = json.loads(labels_key)
        for reader in readers:
            f = reader.filters
            if (f.apps and app not in f.apps) or (f.deployments and deployment not in f.deployments) or \
                    (f.router_classes and router_class not in f.router_classes) or \
                    any(labels.get(k) != v for k, v in f.labels):
                continue
            wanted = records if not f.replicas else [r for r in records if r.get("replica") in f.replicas]
            if wanted:
                reader.offer(wanted)

    def _records(self, stored: StoredBatch) -> List[Dict[str, Any]]:
        """The batch's decisions (with their outcome when it came along), and the outcomes of earlier
        decisions, in the batch's order."""
        app, deployment = stored.identity[:2]
        common = {"app": app, "deployment": deployment}
        out: List[Dict[str, Any]] = []
        decisions: Dict[str, Dict[str, Any]] = {}
        routed_records: Dict[str, Dict[str, Any]] = {}
        for event in stored.events:
            if isinstance(event, DecisionEvent):
                record = {"type": "decision", "id": str(event.id), "ts": event.ts, **common,
                          "request_id": event.request_id, "internal_request_id": event.internal_request_id,
                          "model_id": event.model_id, "attempt": event.attempt, "ranks": event.ranks,
                          "replica": None, "rank": None, "own_ranking": None, "outcome": None}
                decisions[record["id"]] = record
                out.append(record)
            elif isinstance(event, RoutedEvent):
                decision_id = str(event.decision_id) if event.decision_id is not None else None
                routed_id = str(event.id)
                if decision_id is not None:
                    self._remember(routed_id, decision_id)
                decision = decisions.get(decision_id)
                if decision is not None and decision["replica"] is None:
                    decision.update(replica=event.replica_id, rank=event.rank, own_ranking=event.own_ranking)
                    routed_records[routed_id] = decision
                    continue
                record = {"type": "routed", "id": routed_id, "ts": event.ts, **common, "decision_id": decision_id,
                          "request_id": event.request_id, "replica": event.replica_id, "rank": event.rank,
                          "own_ranking": event.own_ranking}
                routed_records[routed_id] = record
                out.append(record)
            elif isinstance(event, CompletedEvent):
                routed_id = str(event.routed_id) if event.routed_id is not None else None
                outcome = {"ok": event.ok, "latency_ms": event.latency_ms, "rejected": event.rejected}
                decision = routed_records.get(routed_id)
                if decision is not None and decision["type"] == "decision" and decision["outcome"] is None:
                    decision["outcome"] = outcome
                    continue
                out.append({"type": "completed", "id": str(event.id), "ts": event.ts, **common,
                            "decision_id": self._decision_of.get(routed_id) if routed_id else None,
                            "routed_id": routed_id, "internal_request_id": event.internal_request_id,
                            "replica": event.replica_id, **outcome})
        return out

    def _remember(self, routed_id: str, decision_id: str) -> None:
        self._decision_of[routed_id] = decision_id
        if len(self._decision_of) > _DECISIONS_REMEMBERED:
            self._decision_of.popitem(last=False)


def sse(record: Dict[str, Any], event: Optional[str] = None) -> str:
    """One Server-Sent Event: its type as the event name, the record as JSON data."""
    return f"event: {event or record['type']}\ndata: {json.dumps(record, separators=(',', ':'))}\n\n"


async def stream(tail: Tail, reader: Reader, hello: Dict[str, Any]) -> AsyncIterator[str]:
    """A reader's stream: a `hello` event, then records as they come, keep-alive comments while idle."""
    try:
        yield sse({"type": "hello", **hello})
        while True:
            await reader.wait(KEEP_ALIVE_S)
            records = reader.take()
            missed = reader.missed_now()
            if missed:
                records.append({"type": "missed", "count": missed})
            yield "".join(sse(record) for record in records) if records else ": keep-alive\n\n"
    finally:
        tail.unsubscribe(reader)
