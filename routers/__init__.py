"""routelens producer side: trace any Ray Serve RequestRouter.

    from routers import TracingMixin, stamp_routing_stats

    class TracedRouter(TracingMixin, MyRouter):
        pass

This package runs inside Ray processes (proxies, the driver, upstream
replicas) and imports only the standard library and `ray`.
"""

__version__ = "0.1.0"

from routers.mixin import TracingMixin  # noqa: E402
from routers.stats import STATS_TIMESTAMP_KEY, stamp_routing_stats  # noqa: E402

__all__ = ["TracingMixin", "stamp_routing_stats", "STATS_TIMESTAMP_KEY", "__version__"]
