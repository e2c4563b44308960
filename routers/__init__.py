"""routelens producer side: trace any Ray Serve RequestRouter.

    from routelens.routers import TracingMixin, stamp_routing_stats

    class TracedRouter(TracingMixin, MyRouter):
        pass

This package runs inside Ray processes (proxies, the driver, upstream
replicas) and imports only the standard library and `ray`.
"""

from .mixin import TracingMixin
from .stats import STATS_TIMESTAMP_KEY, stamp_routing_stats
from .tracer import TRACER_VERSION as __version__

__all__ = ["TracingMixin", "stamp_routing_stats", "STATS_TIMESTAMP_KEY", "__version__"]
