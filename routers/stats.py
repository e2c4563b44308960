"""Stamping routing stats with the time they were collected.

Ray delivers `record_routing_stats` results without any timestamp, so a router
cannot tell how old the stats it ranks on are. Decorating the deployment's
method adds one; the tracer then reports exact staleness ("stamped").

    @serve.deployment(...)
    class App:
        @stamp_routing_stats
        def record_routing_stats(self) -> dict:
            return {"throughput": ...}

The stamp changes on every collection, so Ray re-broadcasts the stats every
`request_routing_stats_period_s` even when the values are unchanged; that is
what keeps them fresh at the routers, and it costs one replica-list push per
period to every router of the deployment.
"""

from __future__ import annotations

import functools
import inspect
import time
from typing import Any, Callable, Dict, Optional

STATS_TIMESTAMP_KEY = "routelens_collected_at"


def _stamped(stats: Any) -> Any:
    if not isinstance(stats, dict):
        return stats  # Ray will reject it; leave the error to Ray's message
    return {**stats, STATS_TIMESTAMP_KEY: time.time()}


def stamp_routing_stats(method: Callable) -> Callable:
    """Decorate `record_routing_stats` (sync or async) to add a collection timestamp."""
    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_wrapper(*args, **kwargs):
            return _stamped(await method(*args, **kwargs))

        return async_wrapper

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        return _stamped(method(*args, **kwargs))

    return wrapper


def collected_at(stats: Optional[Dict[str, Any]]) -> Optional[float]:
    """The stamp of a stats dict, or None when the replica does not stamp."""
    if not stats:
        return None
    value = stats.get(STATS_TIMESTAMP_KEY)
    return float(value) if isinstance(value, (int, float)) else None
