"""Event ids as the collector stores them: UUIDv7, 16 bytes, time-ordered.

A UUIDv7 begins with its 48-bit Unix time in milliseconds, so the ids of a
time window form one key range, and raw tables need no index on time.
Ingest checks that an id's time is within `ID_TS_TOLERANCE_S` of its
event's `ts`; widening a window's key range by that much finds every event
of the window (the exact `ts` filter then trims the edges).
"""

from __future__ import annotations

import uuid
from typing import Tuple

# How far an id's embedded time may be from the event's ts.
ID_TS_TOLERANCE_S = 60.0


def lowest_id(ts: float) -> bytes:
    """The smallest UUIDv7 (as bytes) of time `ts`."""
    ms = min(max(int(ts * 1000), 0), (1 << 48) - 1)
    return (ms << 80).to_bytes(16, "big")


def window_bounds(since: float, until: float) -> Tuple[bytes, bytes]:
    """Key range [low, high) holding every event with since <= ts < until."""
    return lowest_id(since - ID_TS_TOLERANCE_S), lowest_id(until + ID_TS_TOLERANCE_S + 0.001)


def to_bytes(text: str) -> bytes:
    """Raises ValueError for a string that is not a UUID."""
    return uuid.UUID(text).bytes
