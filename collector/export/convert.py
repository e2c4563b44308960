"""Stored values as the export's Arrow arrays, a chunk at a time: keys as
names, timestamps, ids as UUID text, rankings as nested lists and structs.
Vectorized wherever Arrow or numpy can do the work."""

from __future__ import annotations

import json
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import select
from sqlalchemy.engine import Connection

from ..query.figures import Scope
from ..store.models import Source
from ..store.types import AGE_SOURCE_NAMES, request_id_text
from .pandas_hidden import convert_first_without_pandas
from .rankings import ranking_columns
from .schema import CANDIDATE, LABELS, SCORES, TIME

convert_first_without_pandas()  # before the constants below, the process's first conversion of Python values


class Names:
    """Keys to names for one export, as Arrow arrays indexed by key, so that
    a chunk's names are one vectorized `take` of its keys."""

    def __init__(self, conn: Connection, sc: Scope):
        def by_key(values: Dict[int, object], type_: pa.DataType) -> pa.Array:
            dense = [None] * (max(values, default=0) + 1)
            for pk, value in values.items():
                dense[pk] = value
            return pa.array(dense, type_)

        routers = sc.routers
        self._router = {name: by_key({pk: r[name] for pk, r in routers.items()}, pa.string())
                        for name in ("app", "deployment", "router_class")}
        self._router["labels"] = by_key({pk: list(r["labels"].items()) for pk, r in routers.items()}, LABELS)
        self._replica_ids = by_key({pk: r["replica_id"] for pk, r in sc.replicas.items()}, pa.string())
        self._replica_info = {name: by_key({pk: r[name] for pk, r in sc.replicas.items()}, pa.string())
                              for name in ("node_id", "availability_zone")}
        self._sources = by_key(dict(conn.execute(select(Source.pk, Source.source_id)).all()), pa.string())

    def router_columns(self, router_pks: pa.Array, source_pks: pa.Array) -> Dict[str, pa.Array]:
        out = {name: _lookup(self._router[name], router_pks) for name in ("app", "deployment", "router_class")}
        out["source_id"] = _lookup(self._sources, source_pks)
        out["labels"] = _lookup(self._router["labels"], router_pks)
        return out

    def replica_ids(self, replica_pks: pa.Array) -> pa.Array:
        return _lookup(self._replica_ids, replica_pks)

    def replica_info(self, name: str, replica_pks: pa.Array) -> pa.Array:
        return _lookup(self._replica_info[name], replica_pks)


def _lookup(by_key: pa.Array, keys: pa.Array) -> pa.Array:
    # A key newer than the export's start (a replica that just joined) has no name here: null, not an error.
    keys = keys.cast(pa.int64())
    return by_key.take(pc.if_else(pc.less(keys, len(by_key)), keys, pa.scalar(None, pa.int64())))


def times(ts: pa.Array) -> pa.Array:
    return pc.round(pc.multiply(ts, 1e6)).cast(pa.int64()).cast(TIME)


_NO_ID = pa.scalar(bytes(16), pa.binary())
_NO_BYTES = pa.scalar(None, pa.binary())
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)
# Where a UUID's 32 hex digits go in its 36 characters (the others are dashes).
_DIGIT_PLACES = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def uuids(stored: pa.Array) -> pa.Array:
    """UUIDs stored as their 16 bytes (or null) as canonical text, all of a
    chunk's at once: numpy writes each byte's two hex digits into a block of
    36-character rows, which becomes the Arrow string array as it is."""
    n = len(stored)
    raw = pc.fill_null(stored, _NO_ID).cast(pa.binary(16))  # fails on a value that is not 16 bytes
    values = np.frombuffer(raw.buffers()[1], np.uint8, count=16 * n, offset=16 * raw.offset).reshape(n, 16)
    text = np.full((n, 36), ord("-"), np.uint8)
    text[:, _DIGIT_PLACES[0::2]] = _HEX_DIGITS[values >> 4]
    text[:, _DIGIT_PLACES[1::2]] = _HEX_DIGITS[values & 15]
    offsets = np.arange(0, 36 * n + 1, 36, dtype=np.int32)
    canonical = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))
    return pc.if_else(stored.is_valid(), canonical, pa.scalar(None, pa.string())) if stored.null_count else canonical


def request_ids(stored: pa.Array) -> pa.Array:
    # Ray's request ids are UUIDs, stored as their 16 bytes; other ids (and the
    # UUIDs that begin with 0xFF, one in 256) are stored as text, 0xFF first.
    # Text ids are few (Ray makes UUIDs): decoded in Python, which pyarrow's
    # binary_slice cannot do for them (it fails on a value shorter than the cut).
    as_text = pc.fill_null(pc.equal(pc.binary_slice(stored, 0, 1), pa.scalar(b"\xff", pa.binary())), False)
    if not pc.any(as_text).as_py():
        return uuids(stored)
    texts = pa.array([request_id_text(v) for v in stored.filter(as_text).to_pylist()], pa.string())
    return pc.replace_with_mask(uuids(pc.if_else(as_text, _NO_BYTES, stored)), as_text, texts)


def scores(reasons: pa.Array, stored: pa.Array) -> pa.Array:
    """Decisions' scores (stored as JSON text, null when there were none) as a map; {} for a reason given
    without scores, null without a reason. Decoded in Python, only where there are some."""
    if reasons.null_count == len(reasons):
        return pa.nulls(len(reasons), SCORES)
    return pa.array([None if reason is None else list(json.loads(text).items()) if text else []
                     for reason, text in zip(reasons.to_pylist(), stored.to_pylist())], SCORES)


class Rankings:
    """The rankings of a chunk of decisions, flattened: one entry per ranked
    replica, in order, and the offsets that nest them per rank and per
    decision (decoded by `collector.export.rankings`, indexed by Arrow)."""

    def __init__(self, stored: pa.Array, names: Names):
        flat = ranking_columns(stored)
        self.replica_pks = flat.replica_pk
        self.replica_ids = names.replica_ids(self.replica_pks)
        self._rank_ends = _offsets(flat.entries_per_rank)  # per rank, where its entries end
        self._decision_ranks = _offsets(flat.ranks_per_decision)  # per decision, where its ranks end
        self._decision_entries = self._rank_ends.take(self._decision_ranks)
        by_rank = pa.ListArray.from_arrays(self._rank_ends, self.replica_ids)
        # Each entry's rank within its decision: its rank's number, less its decision's first rank's.
        n_ranks = len(flat.entries_per_rank)
        rank_decision = pa.ListArray.from_arrays(self._decision_ranks, pa.nulls(n_ranks)).value_parent_indices()
        rank_in_decision = pc.subtract(pa.array(np.arange(n_ranks)),
                                       self._decision_ranks.take(rank_decision).cast(pa.int64()))
        self.parents = pa.ListArray.from_arrays(self._decision_entries, self.replica_pks).value_parent_indices()
        self.entries = {
            "replica_id": self.replica_ids,
            "rank": rank_in_decision.take(by_rank.value_parent_indices()).cast(pa.int32()),
            "queue_len": flat.queue_len,
            "queue_len_age_s": pc.divide(flat.queue_len_age_us.cast(pa.float64()), 1e6),
            "stats_age_s": pc.divide(flat.stats_age_us.cast(pa.float64()), 1e6),
            "stats_age_source": _AGE_SOURCE_NAMES.take(flat.age_source),
            "stats": flat.stats,
        }

    def ranks(self) -> pa.Array:
        """Per decision: the replica ids of each rank."""
        return pa.ListArray.from_arrays(self._decision_ranks, pa.ListArray.from_arrays(self._rank_ends,
                                                                                        self.replica_ids))

    def candidates(self) -> pa.Array:
        """Per decision: each ranked replica's inputs."""
        return pa.ListArray.from_arrays(self._decision_entries, pa.StructArray.from_arrays(
            [self.entries[field.name] for field in CANDIDATE], fields=list(CANDIDATE)))


def _offsets(sizes: np.ndarray) -> pa.Array:
    """List offsets (int32) from list sizes: 0, then where each list ends."""
    offsets = np.zeros(len(sizes) + 1, np.int32)
    np.cumsum(sizes, out=offsets[1:])
    return pa.array(offsets)


_AGE_SOURCE_NAMES = pa.array([AGE_SOURCE_NAMES.get(i) for i in range(3)], pa.string())  # by stored code
TRUE, FALSE, UNKNOWN = pa.scalar(True), pa.scalar(False), pa.scalar(None, pa.bool_())
