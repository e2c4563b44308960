"""Event ids and per-request sampling.

The hot path only takes a sequence number; the exporter thread turns
`(ts, seq)` into a UUIDv7 string, so ids cost nothing where routing happens.
Ids are time-ordered (inserts append to the collector's index) and unique
across processes through a random per-process nonce.
"""

from __future__ import annotations

import itertools
import os
import zlib

_NONCE_BITS = 40
_SEQ_BITS = 34  # 12 + 62 random bits of UUIDv7 = 40 nonce bits + 34 sequence bits

# Process-wide: every tracer of the process draws from one counter, so two
# events never share (ts, seq) within a process.
_sequence = itertools.count()
_nonce = int.from_bytes(os.urandom(5), "big")


def next_seq() -> int:
    return next(_sequence)


def event_id(ts: float, seq: int) -> str:
    """The UUIDv7 of the event taken at `ts` with sequence number `seq`."""
    unix_ms = int(ts * 1000) & ((1 << 48) - 1)
    rand = (_nonce << _SEQ_BITS) | (seq & ((1 << _SEQ_BITS) - 1))
    rand_a = rand >> 62  # the top 12 bits
    rand_b = rand & ((1 << 62) - 1)
    h = "%032x" % ((unix_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def is_sampled(internal_request_id: str, rate: float) -> bool:
    """Whether a request is traced. Deterministic in its id, so every process
    that sees the request (proxy, upstream replicas) makes the same choice."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return zlib.crc32(internal_request_id.encode()) < rate * 4294967296.0


def _reset_after_fork() -> None:
    global _sequence, _nonce
    _sequence = itertools.count()
    _nonce = int.from_bytes(os.urandom(5), "big")


os.register_at_fork(after_in_child=_reset_after_fork)
