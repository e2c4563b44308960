"""RouterTracer: what one traced router records, one concern per module.

`TracingMixin` (routers.mixin) gives each traced router one RouterTracer and
calls it from Ray's hooks. RouterTracer is composed, as Ray's own request
routers are, of small mixins with one concern each, every one declaring
what it needs from the class it is mixed into:

- DecisionRecording (routers.decisions): each `choose_replicas` ranking and
  its inputs; the request's sampling; sampled-out decisions accounted; each
  routing task's latest decision.
- FifoAttribution (routers.attribution): with FIFOMixin a replica found by
  one request's routing task is often handed to another; which decision
  supplied each routed request's replica, and the `routed` record.
- CompletionPairing (routers.completions): when each request was sent;
  refusals as the replica answers; Ray's completions, one per send attempt
  and keyed only by (replica, internal request id), paired with the
  attempt they finish.
- UnroutedSends (routers.unrouted_sends): the sends that skip the rejection
  protocol, so never reach `on_request_routed` (choose_replica/dispatch,
  broadcast, Ray Client, Java replicas).
- MembershipRecording (routers.membership): the replica set and each
  replica's routing stats, as this router sees them.

TracerCore, below, is what they share: the router's identity, its
configuration, the loop it runs on and the exporter's queue.

Every method runs on Ray's router event loop (one thread per process,
shared by all routers), except CompletionPairing's
`_result_done_threadsafe`, which runs on a Ray core-worker thread and only
appends to a thread-safe deque. Nothing here blocks: recording is an O(1)
append to the process-wide exporter's queue of a record of plain references
(routers.records); formatting happens on the exporter thread.
"""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from importlib.metadata import version
from typing import Any, Callable, Dict, Mapping, Optional

from .attribution import FifoAttribution
from .completions import CompletionPairing
from .config import TracerConfig, load_config
from .decisions import DecisionRecording
from .exporter import Exporter, Source, get_exporter
from .faults import faults
from .membership import MembershipRecording
from .unrouted_sends import UnroutedSends

TRACER_VERSION = version("routelens")


class TracerCore:
    """The traced router's identity and configuration, its loop and its queue."""

    def __init__(self, router: Any, init_kwargs: Mapping[str, Any]):
        self._router = router
        deployment_id = init_kwargs.get("deployment_id")
        handle_source = init_kwargs.get("handle_source")
        cls = type(router)
        self.identity: Dict[str, Any] = {
            "source_id": uuid.uuid4().hex,
            "app": getattr(deployment_id, "app_name", None),
            "deployment": getattr(deployment_id, "name", None),
            "router_class": f"{cls.__module__}.{cls.__qualname__}",
            "handle_source": getattr(handle_source, "name", str(handle_source)),
            "node_id": init_kwargs.get("self_node_id"),
            "actor_id": init_kwargs.get("self_actor_id"),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "tracer_version": TRACER_VERSION,
            "labels": {},
        }
        self.config: Optional[TracerConfig] = None
        self.source: Optional[Source] = None
        self.exporter: Optional[Exporter] = None
        # The exporter's submit, once configured: queues one record (O(1), never blocks).
        self._submit: Optional[Callable[[Any], None]] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def configure(self, router_kwargs: Mapping[str, Any], exporter: Optional[Exporter] = None) -> Dict[str, Any]:
        """Apply `request_router_kwargs`; return the ones for the wrapped router.

        The first call wins. `exporter` defaults to the process-wide one.
        """
        config, passthrough = load_config(router_kwargs)
        for problem in config.problems:
            faults.record("reading the tracer configuration", ValueError(problem))
        if self.source is None:
            self.config = config
            self.identity["labels"] = dict(config.labels)
            self.exporter = exporter or get_exporter(config)
            self.source = self.exporter.add_source(self.identity, config)
            self._submit = self.exporter.submit
        return passthrough

    def _configure_from_env(self) -> None:
        # Ray always calls initialize_state first; a subclass that overrides it
        # without calling super() still gets a tracer configured from the env.
        # (Hooks call this when self.source is None: a test cheaper than a call.)
        self.configure({})

    def _loop_or_bind(self) -> asyncio.AbstractEventLoop:
        # Every hook of a router runs on one loop: Ray's router loop, or the
        # caller's in same-loop mode. The exporter's shutdown lets it run what
        # Ray already handed it (Exporter.close).
        if self._loop is None:
            self._loop = self.source.loop = asyncio.get_running_loop()
        return self._loop


class RouterTracer(FifoAttribution, DecisionRecording, CompletionPairing, UnroutedSends, MembershipRecording,
                   TracerCore):
    def __init__(self, router: Any, init_kwargs: Mapping[str, Any], records_attributes: bool = False,
                 results_from_ray: bool = False, records_refusals: bool = False,
                 records_unrouted_sends: bool = False):
        """`init_kwargs`: what Ray passed the router's constructor.
        `records_attributes`: call the router's `routelens_request_attributes`
        for each request (only worth it when a subclass overrides it).
        `results_from_ray`: on_completed is given each result by Ray's own
        done-callback, so no callback of the tracer's is needed.
        `records_refusals`: the mixin reads each answer of a replica Ray's
        usual sender asked: refusals as they come (on_refused), and when an
        accepted request was sent (send_times), where its latency starts.
        `records_unrouted_sends`: the mixin reports sends that skip the
        rejection protocol (on_reserved, on_broadcast_send, ...)."""
        super().__init__(router, init_kwargs, records_attributes=records_attributes,
                         results_from_ray=results_from_ray, records_refusals=records_refusals,
                         records_unrouted_sends=records_unrouted_sends)
