"""Membership: the replica set and each replica's routing stats, as this router sees them.

Ray calls `update_replicas` with the full replica list on every change,
routing-stats changes included (each rebroadcasts every replica). A
`replicas` record is queued when the membership itself changed, and a
`stats` record for each replica whose routing_stats changed. The stats
seen, with the time each value was first seen, are what decisions
(routers.decisions) rank replicas on and date stale stats by when the
replica does not stamp them (routers.stats).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .exporter import Exporter, Source
from .faults import faults
from .records import replicas_record, stats_record
from .stats import collected_at


class MembershipRecording:
    # Provided by the composed RouterTracer.
    source: Optional[Source]
    exporter: Optional[Exporter]
    _submit: Callable[[Any], None]
    _configure_from_env: Callable[[], None]
    _note_cross_language: Callable[[List[Any]], None]  # routers.unrouted_sends

    def __init__(self, router: Any, init_kwargs: Any, **options: Any):
        super().__init__(router, init_kwargs, **options)
        # The replica's unique_id -> (routing_stats, first seen). Replaced, never
        # mutated, on each update_replicas, so a decision can keep a reference
        # to it. Keyed by the str: ReplicaID hashes through a Python __hash__.
        self._stats_seen: Dict[str, Tuple[Any, float]] = {}
        self._membership: Optional[List[Dict[str, Any]]] = None

    def on_replicas(self, replicas: List[Any]) -> None:
        if self.source is None:
            self._configure_from_env()
        now = time.time()
        previous_seen = self._stats_seen
        seen = {}
        members = []
        readable = []
        for replica in replicas:
            # One replica whose attributes cannot be read (a fault, counted)
            # leaves it out of this update; the others are recorded.
            try:
                member = {
                    "replica_id": replica.replica_id.unique_id,
                    "node_id": replica.node_id,
                    "availability_zone": replica.availability_zone,
                    "max_ongoing_requests": replica.max_ongoing_requests,
                    "model_ids": sorted(replica.multiplexed_model_ids),
                }
                stats = replica.routing_stats
                previous = previous_seen.get(member["replica_id"])
                changed = previous is None or previous[0] != stats
                stamp = collected_at(stats) if changed else None
            except Exception as exc:
                faults.record("reading a replica's attributes", exc)
                continue
            if changed:
                self._submit(stats_record(self.source, now, replica.replica_id, stats, stamp))
                previous = (stats, now)
            seen[member["replica_id"]] = previous
            members.append(member)
            readable.append(replica)
        self._stats_seen = seen
        self._note_cross_language(readable)
        members.sort(key=lambda member: member["replica_id"])
        if members != self._membership:
            self._membership = members
            self._submit(replicas_record(self.source, now, members))
        if not replicas:
            # The deployment is going away: export now rather than at the next
            # interval, in case the process is about to be killed.
            self.exporter.wake()
