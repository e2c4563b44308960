"""Wire format v1, as the collector validates it (see DESIGN.md).

msgspec checks a whole batch in one pass, fast enough for ingest at tens of
thousands of events per second, and its errors carry the path of the bad
value (`$.events[3].attempt`). On top of types, `validate` checks what types
cannot say: ids are UUIDv7s of their own timestamp, a routed event's rank
is sane, and so on. Fields this version does not know are kept, per event,
in `extra`.
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct

SCHEMA_VERSION = 1

Id = Annotated[str, Meta(min_length=1, max_length=256)]
Name = Annotated[str, Meta(max_length=512)]
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Seconds = Annotated[float, Meta(ge=0)]
Timestamp = Annotated[float, Meta(ge=0, le=2**48 / 1000)]  # what fits a UUIDv7's 48 bits of ms

# How far an id's embedded time may be from the event's ts.
ID_TS_TOLERANCE_S = 60.0


class Invalid(ValueError):
    """A batch that breaks the wire format; the message names where."""


class SourceInfo(Struct, gc=False):
    source_id: Id
    app: Name
    deployment: Name
    router_class: Name
    handle_source: Optional[Name] = None
    node_id: Optional[Name] = None
    actor_id: Optional[Name] = None
    hostname: Optional[Name] = None
    pid: Optional[int] = None
    tracer_version: Optional[Name] = None
    labels: Annotated[Dict[Annotated[str, Meta(max_length=128)], Annotated[str, Meta(max_length=512)]],
                      Meta(max_length=64)] = {}


class Candidate(Struct, gc=False):
    queue_len: Optional[int] = None
    queue_len_age_s: Optional[float] = None
    stats: Optional[Dict[str, Any]] = None
    stats_age_s: Optional[float] = None
    stats_age_source: Optional[Literal["stamped", "observed"]] = None


class DecisionEvent(Struct, tag="decision", tag_field="type", forbid_unknown_fields=True, gc=False):
    id: uuid.UUID
    ts: Timestamp
    attempt: Count
    duration_us: Count
    n_candidates: Count
    ranks: Annotated[List[Annotated[List[Id], Meta(max_length=10000)]], Meta(max_length=10000)]
    replicas: Dict[Id, Candidate]
    request_id: Optional[Id] = None
    internal_request_id: Optional[Id] = None
    model_id: Optional[Id] = None
    attributes: Optional[Dict[str, Any]] = None


class RoutedEvent(Struct, tag="routed", tag_field="type", forbid_unknown_fields=True, gc=False):
    id: uuid.UUID
    ts: Timestamp
    replica_id: Id
    request_id: Optional[Id] = None
    internal_request_id: Optional[Id] = None
    model_id: Optional[Id] = None
    decision_id: Optional[uuid.UUID] = None
    rank: Optional[Annotated[int, Meta(ge=0, le=10000)]] = None
    own_ranking: Optional[bool] = None
    attempts: Optional[Count] = None
    queue_wait_ms: Optional[Annotated[float, Meta(ge=0)]] = None
    attribution: Optional[Name] = None


class CompletedEvent(Struct, tag="completed", tag_field="type", forbid_unknown_fields=True, gc=False):
    id: uuid.UUID
    ts: Timestamp
    replica_id: Id
    rejected: bool
    internal_request_id: Optional[Id] = None
    latency_ms: Optional[Annotated[float, Meta(ge=0)]] = None
    ok: Optional[bool] = None
    routed_id: Optional[uuid.UUID] = None


class Member(Struct, gc=False):
    replica_id: Id
    node_id: Optional[Name] = None
    availability_zone: Optional[Name] = None
    max_ongoing_requests: Optional[int] = None
    model_ids: Annotated[List[Id], Meta(max_length=10000)] = []


class ReplicasEvent(Struct, tag="replicas", tag_field="type", forbid_unknown_fields=True, gc=False):
    id: uuid.UUID
    ts: Timestamp
    replicas: Annotated[List[Member], Meta(max_length=100000)]


class StatsEvent(Struct, tag="stats", tag_field="type", forbid_unknown_fields=True, gc=False):
    id: uuid.UUID
    ts: Timestamp
    replica_id: Id
    stats: Dict[str, Any] = {}
    collected_at: Optional[Timestamp] = None


Event = Union[DecisionEvent, RoutedEvent, CompletedEvent, ReplicasEvent, StatsEvent]


class Batch(Struct, gc=False):
    schema_version: int
    source: SourceInfo
    seq: Count
    events: List[Event]
    dropped: Dict[Annotated[str, Meta(max_length=64)], Count] = {}
    produced: Optional[Annotated[int, Meta(ge=0)]] = None


_EVENT_TYPES = (DecisionEvent, RoutedEvent, CompletedEvent, ReplicasEvent, StatsEvent)
_KNOWN_FIELDS = {cls.__struct_config__.tag: set(cls.__struct_fields__) | {"type"} for cls in _EVENT_TYPES}
_decode_batch = msgspec.json.Decoder(Batch)
_decode_plain = msgspec.json.Decoder()


class ValidBatch:
    """A batch that passed validation, with ids already turned into 16 bytes."""

    __slots__ = ("batch", "ids", "extras")

    def __init__(self, batch: Batch, ids: List[bytes], extras: Optional[List[Optional[Dict[str, Any]]]]):
        self.batch = batch
        self.ids = ids  # events[i].id as 16 bytes
        self.extras = extras  # events[i]'s unknown fields (None when no event has any)


def parse(body: bytes, max_events: int) -> ValidBatch:
    """Decode and validate one batch (JSON bytes). Raises `Invalid`.

    The fast path decodes straight into the structs above; event structs
    forbid unknown fields, so a batch from a newer tracer fails it and takes
    the slower path that sets those fields aside.
    """
    try:
        batch = _decode_batch.decode(body)
        extras = None
    except msgspec.DecodeError as exc:
        if not isinstance(exc, msgspec.ValidationError):
            raise Invalid(f"malformed JSON: {exc}") from None
        if "unknown field" not in str(exc):
            raise _invalid(exc, body) from None
        batch, extras = _parse_with_unknown_fields(body)
    if batch.schema_version != SCHEMA_VERSION:
        raise Invalid(f"$.schema_version: expected {SCHEMA_VERSION}, got {batch.schema_version!r}")
    if len(batch.events) > max_events:
        raise TooMany(f"$.events: {len(batch.events)} events, over the limit of {max_events} per batch")
    ids = [_uuid7_of(event.id, event.ts, f"$.events[{index}].id") for index, event in enumerate(batch.events)]
    for index, event in enumerate(batch.events):
        _check_event(event, index)
    return ValidBatch(batch, ids, extras)


def _invalid(exc: msgspec.ValidationError, body: bytes) -> Invalid:
    # A wrong schema_version is reported as such, not as the first field it breaks.
    try:
        version = _decode_plain.decode(body).get("schema_version")
    except Exception:
        version = SCHEMA_VERSION
    if version != SCHEMA_VERSION:
        return Invalid(f"$.schema_version: expected {SCHEMA_VERSION}, got {version!r}")
    return Invalid(str(exc))


def _parse_with_unknown_fields(body: bytes):
    raw = _decode_plain.decode(body)
    extras: List[Optional[Dict[str, Any]]] = []
    events = raw.get("events") if isinstance(raw, dict) else None
    for event in events if isinstance(events, list) else ():
        known = _KNOWN_FIELDS.get(event.get("type")) if isinstance(event, dict) else None
        if known is None or event.keys() <= known:
            extras.append(None)
            continue
        extras.append({k: event.pop(k) for k in list(event) if k not in known})
    try:
        return msgspec.convert(raw, Batch, strict=True), extras
    except msgspec.ValidationError as exc:
        raise _invalid(exc, body) from None


class TooMany(Invalid):
    """More events in one batch than the collector accepts."""


def _uuid7_of(value: uuid.UUID, ts: float, where: str) -> bytes:
    as_int = value.int
    if (as_int >> 76) & 0xF != 7:
        raise Invalid(f"{where}: must be a UUIDv7 (time-ordered), got version {value.version}")
    if abs((as_int >> 80) / 1000.0 - ts) > ID_TS_TOLERANCE_S:
        raise Invalid(f"{where}: the UUIDv7's time is more than {ID_TS_TOLERANCE_S:g} s from the event's ts")
    return value.bytes


def _finite(value: Optional[float], where: str) -> None:
    if value is not None and not math.isfinite(value):
        raise Invalid(f"{where}: must be a finite number")


def _check_event(event: Event, index: int) -> None:
    where = f"$.events[{index}]"
    if isinstance(event, CompletedEvent):
        _finite(event.latency_ms, f"{where}.latency_ms")
    elif isinstance(event, DecisionEvent):
        for replica_id, candidate in event.replicas.items():
            _finite(candidate.queue_len_age_s, f"{where}.replicas[{replica_id!r}].queue_len_age_s")
            _finite(candidate.stats_age_s, f"{where}.replicas[{replica_id!r}].stats_age_s")

