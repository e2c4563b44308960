"""Unit tests for routers.ids: UUIDv7 event ids and per-request sampling."""

from __future__ import annotations

import random
import re
import uuid

import pytest

from routelens.routers.ids import event_id, is_sampled, next_seq

TS = 1_700_000_000.123  # a fixed wall-clock time, in seconds
UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _request_ids(n: int, seed: int = 7):
    """n distinct ids shaped like Ray's internal_request_id (uuid4 text)."""
    rng = random.Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]


@pytest.mark.parametrize("ts,seq", [(TS, 0), (TS, 1), (0.0, 0), (TS, 2**34 - 1), (TS, 2**40 + 5)])
def test_event_id_is_canonical_uuid_v7(ts, seq):
    """event_id returns canonical lowercase UUID text with version 7 and the RFC 4122 variant."""
    text = event_id(ts, seq)
    parsed = uuid.UUID(text)
    assert UUID_TEXT.match(text)
    assert str(parsed) == text
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122


def test_event_id_carries_the_millisecond_timestamp():
    """The top 48 bits are the Unix time in milliseconds."""
    assert uuid.UUID(event_id(TS, 3)).int >> 80 == int(TS * 1000)


def test_event_ids_of_interleaved_times_each_carry_their_own_millisecond():
    """Ids are formatted a millisecond at a time: going back and forth between
    milliseconds must never give an id another millisecond's prefix."""
    stamps = [TS, TS + 0.001, TS, TS + 5.0, TS + 5.0, TS + 0.001, TS]
    for ts in stamps:
        assert uuid.UUID(event_id(ts, 9)).int >> 80 == int(ts * 1000)


def test_event_id_is_deterministic():
    """The same (ts, seq) gives the same id within a process."""
    assert event_id(TS, 42) == event_id(TS, 42)


def test_event_ids_order_by_time_as_strings():
    """For increasing ts (any seq), ids compare in increasing order as strings."""
    base_ms = 1_700_000_000_000
    # Mid-millisecond stamps, one per ms, then sparser ones: each in a later ms than the last.
    stamps = [(base_ms + i + 0.5) / 1000 for i in range(200)] + [TS + 1 + i * 3.7 for i in range(50)]
    seqs = [random.Random(i).getrandbits(34) for i in range(len(stamps))]  # seq must not matter
    ids = [event_id(ts, seq) for ts, seq in zip(stamps, seqs)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_event_ids_order_by_seq_within_a_millisecond():
    """Within one millisecond, increasing seq gives increasing ids as strings."""
    ids = [event_id(TS, seq) for seq in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_event_ids_of_the_same_millisecond_share_the_time_prefix():
    """Different ts within the same millisecond give the same time bits, ordered by seq."""
    a = event_id(TS + 0.0001, 10)
    b = event_id(TS + 0.0004, 11)
    assert a[:13] == b[:13]
    assert a < b


def test_next_seq_increases():
    """next_seq hands out strictly increasing numbers."""
    seqs = [next_seq() for _ in range(100)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 100


def test_is_sampled_is_deterministic():
    """The same id and rate always give the same answer."""
    for request_id in _request_ids(500):
        assert is_sampled(request_id, 0.5) == is_sampled(request_id, 0.5)


def test_is_sampled_extremes():
    """Rate 1 (or more) samples everything, rate 0 (or less) nothing."""
    ids = _request_ids(1000) + ["", "x"]
    assert all(is_sampled(i, 1.0) for i in ids)
    assert all(is_sampled(i, 1.5) for i in ids)
    assert not any(is_sampled(i, 0.0) for i in ids)
    assert not any(is_sampled(i, -0.5) for i in ids)


def test_is_sampled_rate_is_respected():
    """A rate of 0.3 samples about 30% (27-33%) of 20,000 distinct ids."""
    ids = _request_ids(20_000)
    assert len(set(ids)) == 20_000
    share = sum(is_sampled(i, 0.3) for i in ids) / len(ids)
    assert 0.27 <= share <= 0.33


def test_is_sampled_is_monotonic_in_rate():
    """An id sampled at a rate is also sampled at any higher rate."""
    ids = _request_ids(2000)
    low = {i for i in ids if is_sampled(i, 0.2)}
    high = {i for i in ids if is_sampled(i, 0.6)}
    assert low <= high
    assert len(low) < len(high)
