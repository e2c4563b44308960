"""The cyclic garbage collector, tuned for the commands that move many rows."""

from __future__ import annotations

import gc


def tune_gc_for_bulk_work() -> None:
    """Ingest and export allocate many short-lived containers; with Python's
    default thresholds the cyclic GC costs more than the work itself (export:
    half its time). What exists at start is frozen out of collections and
    young collections run less often."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
