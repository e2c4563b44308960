"""SQLAlchemy column types that store the raw events' biggest fields compactly,
and the stored forms they read and write.

Raw events are most of the database (10 million decisions a week is a
modest cluster): event ids, request ids and a decision's ranking are stored
in binary forms a fraction of their text's size. Readers that go through
these column types see exactly what was sent.
"""

from __future__ import annotations

import binascii
import json
import struct
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

import msgspec
from sqlalchemy import LargeBinary, type_coerce
from sqlalchemy.sql import ColumnElement
from sqlalchemy.types import TypeDecorator

if TYPE_CHECKING:  # collector.ingest.schema reads column sizes from the models, which use these types
    from ..ingest.schema import DecisionEvent


def stored_bytes(column: ColumnElement) -> ColumnElement:
    """A column of these types as the bytes it is stored as, without the
    type's conversion: comparisons, order and bound values are the bytes'
    (a window's key range, a key bound for a chunk, a request id as stored)."""
    return type_coerce(column, LargeBinary)


class EventId(TypeDecorator):
    """A UUID stored as its 16 bytes (half the size of its text form)."""

    impl = LargeBinary(16)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None or isinstance(value, bytes):
            return value
        if isinstance(value, uuid.UUID):
            return value.bytes
        return uuid.UUID(value).bytes

    def process_result_value(self, value, dialect):
        return None if value is None else uuid_text(bytes(value))


_TEXT_MARK = b"\xff"  # never the first byte of UTF-8 text


def request_id_bytes(text: str) -> bytes:
    """A request id as stored. Ray's request ids are UUID strings (36 bytes):
    those in canonical form (lowercase, dashed) are stored as their 16 bytes;
    any other id as 0xFF + its UTF-8. The few UUIDs whose first byte is 0xFF
    take the text form too, so that the two forms never collide: the mapping
    is one to one, and `column == some_id` compares stored forms exactly."""
    if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":
        digits = text.replace("-", "")
        try:
            raw = bytes.fromhex(digits)
        except ValueError:
            raw = b""
        # 16 bytes, and hex() (lowercase) gives the digits back: the text was canonical, with no dash
        # elsewhere (a regex costs twice as much).
        if len(raw) == 16 and raw[0] != 0xFF and raw.hex() == digits:
            return raw
    return _TEXT_MARK + text.encode()


def request_ids_bytes(texts: Sequence[str]) -> List[bytes]:
    """`request_id_bytes` of each id, in a quarter of the time when all are
    canonical UUIDs (the ids Ray makes): they are checked and converted
    together, as one string, rather than one by one."""
    count = len(texts)
    if count and set(map(len, texts)) == {36}:
        joined = "".join(texts)
        # Each id has its 4 dashes in place ...
        if joined[8::36] == joined[13::36] == joined[18::36] == joined[23::36] == "-" * count:
            digits = joined.encode().translate(None, b"-")
            try:
                raw = binascii.unhexlify(digits)
            except ValueError:  # binascii.Error: not hex digits, or an odd number of them
                raw = b""
            # ... and 32 lowercase hex digits besides (hexlify gives lowercase).
            if len(raw) == 16 * count and binascii.hexlify(raw) == digits:
                stored = list(struct.unpack("16s" * count, raw))
                first_bytes = raw[::16]
                at = first_bytes.find(_TEXT_MARK)
                while at != -1:  # 1 UUID in 256 starts with 0xFF: those take the text form
                    stored[at] = _TEXT_MARK + texts[at].encode()
                    at = first_bytes.find(_TEXT_MARK, at + 1)
                return stored
    return [request_id_bytes(text) for text in texts]


def request_id_text(stored: bytes) -> str:
    if stored[:1] == _TEXT_MARK:
        return stored[1:].decode()
    return uuid_text(stored)


def uuid_text(raw: bytes) -> str:
    """A UUID's 16 bytes in canonical text form, as str(uuid.UUID(bytes=raw)) but three times as fast."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class RequestId(TypeDecorator):
    """A request id (text), stored by `request_id_bytes`: 16 bytes instead of 36
    for the UUIDs Ray makes."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else request_id_bytes(value)

    def process_result_value(self, value, dialect):
        return None if value is None else request_id_text(bytes(value))


# The `ranking` of a decision, as readers see it: JSON text of
#   [[[replica_pk, queue_len, queue_len_age_ms, stats_age_ms, "s"|"o"|null, stats|null], ...], ...]
# one list per rank, rank 0 first; a ranked replica the event gave no inputs
# for is just [replica_pk]. As stored: the same nesting in MessagePack, with
# the ages in whole microseconds (the precision the JSON's ms with 3
# decimals had) and the age source as 1 (stamped) or 2 (observed): about 55
# bytes for a pow-2 decision instead of 95, the largest saving per decision.
# Written by `ranking_bytes`. A ranking MessagePack cannot
# hold (an integer beyond 64 bits in a stats dict) is stored as the JSON
# text itself, recognisable by its first byte "[" (a MessagePack ranking
# starts with an array marker, never with "[").
AGE_SOURCE_STORED = {"stamped": 1, "observed": 2, None: None}
AGE_SOURCE_NAMES = {stored: name for name, stored in AGE_SOURCE_STORED.items()}
_AGE_SOURCE_SHOWN = {1: "s", 2: "o", None: None}
_AGE_SOURCE_STORED_AS = {shown: stored for stored, shown in _AGE_SOURCE_SHOWN.items()}
_msgpack_decode = msgspec.msgpack.Decoder().decode
_json_encode = msgspec.json.Encoder().encode
_msgpack_encode = msgspec.msgpack.Encoder().encode


def _us_to_ms(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 1000.0


def _ms_to_us(value: Optional[float]) -> Optional[int]:
    return None if value is None else round(value * 1000)


def ranking_layout(stored: bytes) -> List[List[Any]]:
    """The ranking in its stored layout (ages in us, age source 1|2), from either stored form."""
    if stored[:1] != b"[":
        return _msgpack_decode(stored)
    return [[entry if len(entry) == 1 else
             [entry[0], entry[1], _ms_to_us(entry[2]), _ms_to_us(entry[3]), _AGE_SOURCE_STORED_AS[entry[4]], entry[5]]
             for entry in rank] for rank in json.loads(stored)]


def ranking_layouts(stored: Sequence[bytes]) -> List[List[Any]]:
    """`ranking_layout` of many rankings at once: MessagePack ones are decoded
    in one call, as the elements of one array (about half the cost)."""
    if any(ranking[:1] == b"[" for ranking in stored):
        return [ranking_layout(ranking) for ranking in stored]
    return _msgpack_decode(b"\xdd" + len(stored).to_bytes(4, "big") + b"".join(stored))


def ranking_json(stored: bytes) -> str:
    """The ranking as readers see it, from its stored form."""
    if stored[:1] == b"[":
        return stored.decode()
    return ranking_as_json(_msgpack_decode(stored))


def ranking_as_json(ranking: List[List[Any]]) -> str:
    """A ranking in its stored layout (lists, ages in us, age source 1|2) as the JSON readers see."""
    shown: List[List[List[Any]]] = []
    for rank in ranking:
        entries = []
        for entry in rank:
            if len(entry) == 1:
                entries.append(entry)
                continue
            pk, queue_len, queue_len_age_us, stats_age_us, age_source, stats = entry
            entries.append([pk, queue_len, _us_to_ms(queue_len_age_us), _us_to_ms(stats_age_us),
                            _AGE_SOURCE_SHOWN[age_source], stats])
        shown.append(entries)
    return _json_encode(shown).decode()


class Ranking(TypeDecorator):
    """A decision's ranking: JSON text to readers, compact bytes on disk (see above)."""

    impl = LargeBinary
    cache_ok = True

    def process_bind_param(self, value, dialect):
        # Written through SQLAlchemy (rare: ingest writes raw rows): JSON text is a valid stored form.
        return None if value is None else (value.encode() if isinstance(value, str) else value)

    def process_result_value(self, value, dialect):
        return None if value is None else ranking_json(bytes(value))


def ranking_bytes(event: DecisionEvent, pks: Dict[str, int]) -> bytes:
    """The `ranking` column as stored (see `Ranking`): per rank,
    per replica, the inputs it was ranked on."""
    ranking = []
    replicas = event.replicas
    for rank in event.ranks:
        entries = []
        for replica_id in rank:
            candidate = replicas.get(replica_id)
            if candidate is None:
                entries.append((pks[replica_id],))
                continue
            queue_len_age, stats_age = candidate.queue_len_age_s, candidate.stats_age_s
            entries.append((
                pks[replica_id], candidate.queue_len,
                None if queue_len_age is None else round(queue_len_age * 1e6),  # microseconds
                None if stats_age is None else round(stats_age * 1e6),
                AGE_SOURCE_STORED[candidate.stats_age_source], candidate.stats or None,
            ))
        ranking.append(entries)
    try:
        return _msgpack_encode(ranking)
    except OverflowError:  # an integer MessagePack cannot hold: the JSON form is stored instead
        return ranking_as_json(ranking).encode()
