"""Pruning old rows in the background, in small transactions.

Raw events older than the retention go first, oldest first, a chunk at a
time, with a pause between chunks so that ingest (which needs SQLite's one
write lock) is never held up for long. Per-minute rollups are kept longer;
hourly rollups are never pruned. Rollups are untouched by raw pruning, so
panels still show pruned periods.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional

from sqlalchemy import delete, func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from . import ids
from .db import first_line, writer
from .models import RAW_TABLES, Source, SourceBatch, prefix_rollups, reason_rollups, rollups
from .types import stored_bytes

logger = logging.getLogger(__name__)

CHUNK_ROWS = 5000
PAUSE_S = 0.05  # between chunks: room for ingest to take the write lock


class Retention:
    def __init__(self, engine: Engine, raw_s: Optional[float], minute_rollups_s: Optional[float],
                 interval_s: float = 300.0, clock: Callable[[], float] = time.time, running=None):
        """`running`: a gauge (`metrics.pruners_gauge`) set to 1 while the pruner runs."""
        self.engine = engine
        self._running = running
        self.raw_s = raw_s
        self.minute_rollups_s = minute_rollups_s
        self.interval_s = interval_s
        self._clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failing: Optional[str] = None  # the kind of failure last logged, while pruning fails

    def start(self) -> None:
        if self.raw_s is None and self.minute_rollups_s is None:
            return
        self._thread = threading.Thread(target=self._run, name="routelens-retention", daemon=True)
        self._thread.start()
        if self._running is not None:
            self._running.set(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._running is not None:
                self._running.set(0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.prune_round()
            self._stop.wait(self.interval_s)

    def prune_round(self) -> None:
        """`prune_once`, logging a failure: a database that refuses (busy,
        unreachable, read-only) in one line, a bug with its traceback; each
        kind of failure once, until pruning works again (it is tried again
        every round, and would otherwise log the same thing every round)."""
        try:
            self.prune_once()
        except SQLAlchemyError as exc:
            self._failed(f"{type(getattr(exc, 'orig', None) or exc).__name__}: {first_line(exc)}", traceback=False)
        except Exception as exc:
            self._failed(f"{type(exc).__name__}: {exc}", traceback=True)
        else:
            if self._failing is not None:
                logger.warning("retention: pruning works again")
                self._failing = None

    def _failed(self, kind: str, traceback: bool) -> None:
        if kind != self._failing:
            logger.warning("retention: pruning failed (%s); retrying every %.0f s, logging again only if this "
                           "changes", kind, self.interval_s, exc_info=traceback)
            self._failing = kind

    def prune_once(self) -> int:
        """Delete everything past retention now; returns rows deleted."""
        now = self._clock()
        deleted = 0
        if self.raw_s is not None:
            cutoff = ids.lowest_id(now - self.raw_s)
            for table in RAW_TABLES:
                key = stored_bytes(table.c.id)
                deleted += self._in_chunks(
                    lambda: delete(table).where(key.in_(
                        select(key).where(key < cutoff).order_by(key).limit(CHUNK_ROWS))))
            # Batch numbers of sources silent for the whole retention: their gap
            # count is final and no longer shown.
            silent = select(Source.pk).where(Source.last_seen < now - self.raw_s)
            deleted += self._in_chunks(lambda: delete(SourceBatch).where(SourceBatch.source_pk.in_(silent)))
        if self.minute_rollups_s is not None:
            for table in (rollups, reason_rollups, prefix_rollups):
                deleted += self._prune_minute_rollups(table, int(now - self.minute_rollups_s))
        return deleted

    def _prune_minute_rollups(self, table, oldest: int) -> int:
        """An hour of minute rows per transaction."""
        total = 0
        while not self._stop.is_set():
            with self.engine.connect() as connection:
                with writer(connection).begin():
                    first = connection.scalar(select(func.min(table.c.start)).where(table.c.grain == 60))
                    if first is None or first >= oldest:
                        return total
                    total += connection.execute(delete(table).where(
                        table.c.grain == 60, table.c.start < min(first + 3600, oldest))).rowcount
            time.sleep(PAUSE_S)
        return total

    def _in_chunks(self, statement: Callable) -> int:
        total = 0
        while not self._stop.is_set():
            with self.engine.connect() as connection:
                with writer(connection).begin():
                    count = connection.execute(statement()).rowcount
            total += count
            if count < CHUNK_ROWS:
                return total
            time.sleep(PAUSE_S)
        return total
