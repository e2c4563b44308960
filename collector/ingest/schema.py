"""Wire format v3, and v1 and v2 before it, as the collector validates them (see docs/design.md).

msgspec checks a whole batch in one pass, fast enough for ingest at tens of
thousands of events per second, and its errors carry the path of the bad
value (`$.events[3].attempt`). On top of types, `validate` checks what types
cannot say: ids are UUIDv7s of their own timestamp, a routed event's rank
is sane, and so on. Fields this version does not know are kept, per event,
in `extra`.

A version adds optional fields only: a batch of an earlier version is read
as one of this version without them (v1's answers have no queue lengths:
their decision-quality figures are unknown; decisions before v3 have no reason).
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

import msgspec
from msgspec import Meta, Struct

from ..store import times
from ..store.ids import ID_TS_TOLERANCE_S
from ..store.models import Deployment, Replica, Router, Source
from .nesting import too_deep, too_deep_to_decode

WIRE_SCHEMA_VERSION = 3
SCHEMA_VERSIONS = (1, 2, 3)  # accepted: this one and every earlier one

Id = Annotated[str, Meta(min_length=1, max_length=256)]
Name = Annotated[str, Meta(max_length=512)]
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Timestamp = Annotated[float, Meta(ge=0, lt=times.END)]  # see store.times

# Cumulative counters of a source (events dropped): a busy process passes 2**31
# in days, and they are stored as JSON, so they may be as large as SQL's BIGINT.
Total = Annotated[int, Meta(ge=0, le=2**63 - 1)]


def _fits(column, min_length: int = 0):
    """A string that fits `column` (a `collector.store.models` column of its own).
    PostgreSQL refuses a longer one, failing the batch's transaction with a
    503 the tracer would retry forever, while SQLite stores it; refused here,
    it is a 422 that names the field, alike on both backends."""
    return Annotated[str, Meta(min_length=min_length, max_length=column.type.length)]


SourceId = _fits(Source.__table__.c.source_id, min_length=1)
AppName = _fits(Deployment.__table__.c.app)
DeploymentName = _fits(Deployment.__table__.c.deployment)
RouterClass = _fits(Router.__table__.c.router_class)
HandleSource = _fits(Source.__table__.c.handle_source)
SourceNode = _fits(Source.__table__.c.node_id)
ActorId = _fits(Source.__table__.c.actor_id)
Hostname = _fits(Source.__table__.c.hostname)
TracerVersion = _fits(Source.__table__.c.tracer_version)
ReplicaId = _fits(Replica.__table__.c.replica_id, min_length=1)
ReplicaNode = _fits(Replica.__table__.c.node_id)
Zone = _fits(Replica.__table__.c.availability_zone)
LABELS_KEY_LENGTH = Router.__table__.c.labels_key.type.length


class Invalid(ValueError):
    """A batch that breaks the wire format; the message names where."""


class SourceInfo(Struct, gc=False):
    source_id: SourceId
    app: AppName
    deployment: DeploymentName
    router_class: RouterClass
    handle_source: Optional[HandleSource] = None
    node_id: Optional[SourceNode] = None
    actor_id: Optional[ActorId] = None
    hostname: Optional[Hostname] = None
    pid: Optional[Count] = None
    tracer_version: Optional[TracerVersion] = None
    labels: Annotated[Dict[Annotated[str, Meta(max_length=128)], Annotated[str, Meta(max_length=512)]],
                      Meta(max_length=64)] = {}


# A candidate's ages are stored in whole microseconds as 64-bit integers
# (`collector.store.types.Ranking`), which the export turns into doubles: exact
# only up to 2**53 us (285 years). Beyond 10**9 s (31 years) an age is no
# age, and converting it would fail (a 500 at ingest, or an export cut
# short): it is a 422 naming the field. Negative ages stay allowed: clocks
# of different processes disagree.
Age = Annotated[float, Meta(ge=-1e9, le=1e9)]


# The export holds a queue length as a 64-bit integer.
QueueLength = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]


class Candidate(Struct, gc=False):
    queue_len: Optional[QueueLength] = None
    queue_len_age_s: Optional[Age] = None
    stats: Optional[Dict[str, Any]] = None
    stats_age_s: Optional[Age] = None
    stats_age_source: Optional[Literal["stamped", "observed"]] = None


# A decision's explanation (v3): the bounds routers.explanations keeps (tests/test_tracer_offline.py checks
# they agree). The scores' values are finite: the JSON decoder refuses NaN and infinities.
MAX_REASON_CHARS = 64
MAX_SCORES = 8
MAX_SCORE_NAME_CHARS = 32
Reason = Annotated[str, Meta(min_length=1, max_length=MAX_REASON_CHARS)]
Scores = Annotated[Dict[Annotated[str, Meta(min_length=1, max_length=MAX_SCORE_NAME_CHARS)], float],
                   Meta(max_length=MAX_SCORES)]


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
    reason: Optional[Reason] = None  # v3, with scores: what the router said of its decision (routelens_explain)
    scores: Optional[Scores] = None


# The queue lengths behind a replica's answer (v2): counts of requests, stored in 32-bit columns.
QueueCount = Optional[Count]


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
    believed_queue_len: QueueCount = None
    shortest_queue_len: QueueCount = None
    reported_queue_len: QueueCount = None


class CompletedEvent(Struct, tag="completed", tag_field="type", forbid_unknown_fields=True, gc=False):
    id: uuid.UUID
    ts: Timestamp
    replica_id: Id
    rejected: bool
    internal_request_id: Optional[Id] = None
    latency_ms: Optional[Annotated[float, Meta(ge=0)]] = None
    ok: Optional[bool] = None
    routed_id: Optional[uuid.UUID] = None
    # A refusal's (v2), as a routed event's: the decision that supplied the replica, and the queue lengths.
    decision_id: Optional[uuid.UUID] = None
    believed_queue_len: QueueCount = None
    shortest_queue_len: QueueCount = None
    reported_queue_len: QueueCount = None


class Member(Struct, gc=False):
    replica_id: ReplicaId
    node_id: Optional[ReplicaNode] = None
    availability_zone: Optional[Zone] = None
    max_ongoing_requests: Optional[Count] = None
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
    dropped: Dict[Annotated[str, Meta(max_length=64)], Total] = {}
    produced: Optional[Total] = None


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
        batch, extras = _decode(body)
    except RecursionError:  # nested a thousand levels or so: msgspec recurses once per level
        raise Invalid(too_deep_to_decode(body)) from None
    if batch.schema_version not in SCHEMA_VERSIONS:
        raise _wrong_version(batch.schema_version)
    if len(batch.events) > max_events:
        raise TooMany(f"$.events: {len(batch.events)} events, over the limit of {max_events} per batch")
    _check_labels(batch.source.labels)
    _check_answers(batch.events)
    _refuse_deep(batch.events, extras)
    if b"\\u0000" in body:  # JSON can only carry a NUL character escaped
        _refuse_nul(batch, "$")
    # Every float is finite already: msgspec's JSON decoder refuses NaN,
    # Infinity and numbers out of a double's range, naming where they are.
    return ValidBatch(batch, _uuid7_bytes(batch.events), extras)


def _decode(body: bytes):
    """The batch, and its events' unknown fields (None when no event has any)."""
    try:
        return _decode_batch.decode(body), None
    except msgspec.DecodeError as exc:
        if not isinstance(exc, msgspec.ValidationError):
            raise _malformed(exc) from None
        if "unknown field" not in str(exc):
            raise _invalid(exc, body) from None
    return _parse_with_unknown_fields(body)


def _malformed(exc: msgspec.DecodeError) -> Invalid:
    return Invalid(f"malformed JSON: {exc}")


def _invalid(exc: msgspec.ValidationError, body: bytes) -> Invalid:
    # A wrong schema_version is reported as such, not as the first field it breaks.
    try:
        version = _decode_plain.decode(body).get("schema_version")
    except Exception:
        version = WIRE_SCHEMA_VERSION
    if version not in SCHEMA_VERSIONS or type(version) is not int:
        return _wrong_version(version)
    return Invalid(str(exc))


def _wrong_version(version: Any) -> Invalid:
    newer = isinstance(version, int) and not isinstance(version, bool) and version > WIRE_SCHEMA_VERSION
    return Invalid(f"$.schema_version: expected {' or '.join(map(str, SCHEMA_VERSIONS))}, got {version!r}"
                   + (" (a newer tracer: upgrade the collector first)" if newer else ""))


def _check_answers(events: List[Event]) -> None:
    """What types cannot say of the answers' fields (v2). Only an answer (a
    routed event, a refusal) has them: a completion of an accepted request
    names its routed event, which has them. An answer's shortest queue
    length is the shortest among candidates that include the chosen replica:
    above the chosen one's, it is no shortest (and the regret would be negative)."""
    for index, event in enumerate(events):
        if isinstance(event, CompletedEvent) and not event.rejected:
            for name in _REFUSAL_FIELDS:
                if getattr(event, name) is not None:
                    raise Invalid(f"$.events[{index}].{name}: only a refusal (rejected: true) has it; a completion "
                                  "of an accepted request names its routed event (routed_id), which has it")
        shortest = getattr(event, "shortest_queue_len", None)
        if shortest is not None and event.believed_queue_len is not None and shortest > event.believed_queue_len:
            raise Invalid(f"$.events[{index}].shortest_queue_len: {shortest} is above believed_queue_len "
                          f"{event.believed_queue_len}, the chosen replica's, one of the candidates")


_REFUSAL_FIELDS = ("decision_id", "believed_queue_len", "shortest_queue_len", "reported_queue_len")


def _parse_with_unknown_fields(body: bytes):
    # The fast path stopped at the first unknown field: what follows it may still be malformed.
    try:
        raw = _decode_plain.decode(body)
    except msgspec.DecodeError as exc:
        raise _malformed(exc) from None
    extras: List[Optional[Dict[str, Any]]] = []
    events = raw.get("events") if isinstance(raw, dict) else None
    for event in events if isinstance(events, list) else ():
        kind = event.get("type") if isinstance(event, dict) else None
        # Any JSON value may stand where the type should: only a string can name one.
        known = _KNOWN_FIELDS.get(kind) if isinstance(kind, str) else None
        if known is None or event.keys() <= known:
            extras.append(None)
            continue
        extras.append({k: event.pop(k) for k in list(event) if k not in known})
    try:
        return msgspec.convert(raw, Batch, strict=True), extras
    except msgspec.ValidationError as exc:
        raise _invalid(exc, body) from None


def _refuse_deep(events: List[Event], extras) -> None:
    """Free-form values nested deeper than `nesting.MAX_NESTING` are refused, naming where."""
    for index, event in enumerate(events):
        where = f"$.events[{index}]"
        free_form = []
        if isinstance(event, DecisionEvent):
            # A mapping's key is `[...]`, as msgspec names it in its own errors.
            free_form += [(f"{where}.replicas[...].stats", c.stats) for c in event.replicas.values() if c.stats]
            free_form.append((f"{where}.attributes", event.attributes))
        elif isinstance(event, StatsEvent):
            free_form.append((f"{where}.stats", event.stats))
        if extras is not None and extras[index]:
            free_form += [(f"{where}.{name}", value) for name, value in extras[index].items()]
        for place, value in free_form:
            problem = too_deep(value, place)
            if problem:
                raise Invalid(problem)


def labels_key(labels: Dict[str, str]) -> str:
    """A router's labels in canonical form: what tells two routers apart (with app, deployment and class)."""
    return json.dumps(labels, sort_keys=True, separators=(",", ":"))


def _check_labels(labels: Dict[str, str]) -> None:
    """The labels, as the router's key column holds them, must fit it (see `_fits`)."""
    if not labels:
        return

    if len(labels_key(labels)) > LABELS_KEY_LENGTH:
        raise Invalid(f"$.source.labels: {len(labels)} labels take more than {LABELS_KEY_LENGTH} characters "
                      "as JSON; use fewer or shorter ones")


# Free-form dicts: stored as JSON text, where a NUL character is escaped.
_FREE_FORM = frozenset({"stats", "attributes"})


def _refuse_nul(value: Any, where: str) -> None:
    """PostgreSQL text cannot hold a NUL character (SQLite can): refused
    alike on both backends, naming where (see `_fits`)."""
    if isinstance(value, str):
        if "\x00" in value:
            raise Invalid(f"{where}: NUL characters are not accepted")
    elif isinstance(value, Struct):
        for name in value.__struct_fields__:
            if name not in _FREE_FORM:
                _refuse_nul(getattr(value, name), f"{where}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_nul(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(key, f"{where}[{key!r}]")
            _refuse_nul(item, f"{where}[{key!r}]")


class TooMany(Invalid):
    """More events in one batch than the collector accepts."""


def _uuid7_bytes(events: List[Event]) -> List[bytes]:
    """The events' ids as 16 bytes, each checked to be a UUIDv7 of its event's
    time. A loop of its own, with the error message built only on error: it
    runs for every event ingested."""
    out = []
    for index, event in enumerate(events):
        value = event.id
        as_int = value.int
        if (as_int >> 76) & 0xF != 7:
            raise Invalid(f"$.events[{index}].id: must be a UUIDv7 (time-ordered), got version {value.version}")
        if abs((as_int >> 80) / 1000.0 - event.ts) > ID_TS_TOLERANCE_S:
            raise Invalid(f"$.events[{index}].id: the UUIDv7's time is more than {ID_TS_TOLERANCE_S:g} s "
                          "from the event's ts")
        out.append(value.bytes)
    return out

