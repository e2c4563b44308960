"""Stored forms of request ids: one to one, and read back exactly as sent."""

from __future__ import annotations

import random
import uuid

import pytest

from routelens.collector.store.types import request_id_bytes, request_id_text, request_ids_bytes

CANONICAL = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f0"

ODD_IDS = [
    "req-1", "x" * 36, CANONICAL.upper(), "ff" + CANONICAL[2:], CANONICAL[:8] + " " + CANONICAL[9:],
    CANONICAL[:35], CANONICAL + "0", CANONICAL.replace("-", "") + "0000",
    "-" * 36,  # no digit at all
    CANONICAL[:-2] + "--",  # dashes in place, and two more: 30 digits
    "é" * 36,
]


@pytest.mark.parametrize("text", [CANONICAL, str(uuid.UUID(int=0))])
def test_canonical_uuid_is_stored_as_its_16_bytes(text):
    assert request_id_bytes(text) == uuid.UUID(text).bytes
    assert request_id_text(request_id_bytes(text)) == text


@pytest.mark.parametrize("text", ODD_IDS)
def test_any_other_id_is_stored_as_text_and_read_back(text):
    stored = request_id_bytes(text)
    assert stored == b"\xff" + text.encode()
    assert request_id_text(stored) == text


def test_many_ids_at_once_are_stored_as_one_by_one():
    rng = random.Random(1)
    ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2000)]
    assert any(stored[0] == 0xFF for stored in map(request_id_bytes, ids))  # some take the text form
    assert request_ids_bytes(ids) == [request_id_bytes(text) for text in ids]
    for _ in range(2000):
        mix = rng.sample(ids, rng.randrange(0, 5)) + rng.sample(ODD_IDS, rng.randrange(0, 2))
        rng.shuffle(mix)
        assert request_ids_bytes(mix) == [request_id_bytes(text) for text in mix], mix
    # Ids of other lengths whose concatenation reads as canonical UUIDs.
    split_across = [ids[0][:35], ids[0][35] + ids[1]]
    assert request_ids_bytes(split_across) == [request_id_bytes(text) for text in split_across]
