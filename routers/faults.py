"""Rate-limited reporting of the tracer's own failures.

A hook that fails on every request must not flood the proxy's log, and must
not stay silent either: each kind of failure is logged with its traceback the
first time, then as a count at most once a minute.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Dict, Tuple

logger = logging.getLogger("routelens")


class FaultLog:
    def __init__(self, interval_s: float = 60.0):
        self._interval_s = interval_s
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._unlock_after_fork)
        # kind -> (failures not yet logged, monotonic time of the last log line)
        self._pending: Dict[str, Tuple[int, float]] = {}
        self.total = 0

    def _unlock_after_fork(self) -> None:
        self._lock = threading.Lock()

    def record(self, kind: str, exc: BaseException) -> None:
        """Count a failure of `kind`; log it if its kind has been quiet long enough."""
        now = time.monotonic()
        with self._lock:
            self.total += 1
            count, last = self._pending.get(kind, (0, -self._interval_s))
            count += 1
            if now - last < self._interval_s:
                self._pending[kind] = (count, last)
                return
            self._pending[kind] = (0, now)
        if count == 1 and isinstance(exc, OSError):
            # The network or the disk: an operating condition, not a bug; its message says it all.
            logger.warning("routelens: %s failed: %s; routing is unaffected", kind, exc)
        elif count == 1:
            logger.warning("routelens: %s failed; routing is unaffected", kind, exc_info=exc)
        else:
            logger.warning(
                "routelens: %s failed %d times in the last %.0fs, latest: %r; routing is unaffected",
                kind, count, self._interval_s, exc,
            )


# One per process: the tracer's hooks, the exporter thread and the
# destinations all report here, so the log has one voice per kind of failure.
faults = FaultLog()
