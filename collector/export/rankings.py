"""A chunk of stored rankings as flat columns, decoded by numpy.

The export turns about 15,000 rankings at a time into Arrow columns.
Decoding each with msgspec and transposing the Python lists that come out
cost about 2.5 us per decision, the largest part of the export's CPU time.
Every ranking the ingest stores in MessagePack has one shape (see
`collector.store.types`): an array of ranks, each an array of entries, each
[pk] or [pk, queue_len, queue_len_age_us, stats_age_us, age_source, stats].
MessagePack says each value's kind and size in its first byte, so all the
chunk's rankings can be walked at once: one cursor per ranking, advanced by
array operations, an entry per step. The stats maps are cut out as
MessagePack and only the distinct ones are decoded (routing stats repeat:
a replica's stats change once per collection period).

A chunk this walk cannot read exactly (the JSON form, a value of another
kind than the shape's) is decoded by msgspec instead
(`collector.store.types.ranking_layouts`), which also says what is wrong, if
anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, zip_longest
from typing import Dict, Sequence, Tuple

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..store.types import ranking_layouts

_decode = msgspec.msgpack.Decoder().decode
_encode = msgspec.json.Encoder().encode

# What a MessagePack value's first byte (its tag) says: its kind, how many bytes after the tag hold a
# number (an integer's value; a string's, array's or map's length), and the number the tag holds itself
# when none do (fixint, fixstr, fixarray, fixmap). Kinds a stored ranking never holds (ext) are _UNREAD.
_UNREAD, _INT, _NIL, _ARRAY, _MAP, _BYTES, _SCALAR = range(7)
_KIND = np.full(256, _UNREAD, np.int8)
_WIDTH = np.zeros(256, np.int64)
_IN_TAG = np.zeros(256, np.int64)
_KIND[0x00:0x80], _IN_TAG[0x00:0x80] = _INT, np.arange(128)  # positive fixint
_KIND[0xE0:], _IN_TAG[0xE0:] = _INT, np.arange(-32, 0)  # negative fixint
_KIND[0x80:0x90], _IN_TAG[0x80:0x90] = _MAP, np.arange(16)
_KIND[0x90:0xA0], _IN_TAG[0x90:0xA0] = _ARRAY, np.arange(16)
_KIND[0xA0:0xC0], _IN_TAG[0xA0:0xC0] = _BYTES, np.arange(32)  # fixstr
_KIND[0xC0], _KIND[0xC2:0xC4] = _NIL, _SCALAR  # nil, false, true
for _first, _kind, _widths in ((0xC4, _BYTES, (1, 2, 4)), (0xCA, _SCALAR, (4, 8)), (0xCC, _INT, (1, 2, 4, 8)),
                               (0xD0, _INT, (1, 2, 4, 8)), (0xD9, _BYTES, (1, 2, 4)), (0xDC, _ARRAY, (2, 4)),
                               (0xDE, _MAP, (2, 4))):
    _KIND[_first:_first + len(_widths)], _WIDTH[_first:_first + len(_widths)] = _kind, _widths
# The number after a tag is read as 8 big-endian bytes, shifted right by _SHIFT. A signed one narrower than
# 8 bytes (int8, int16, int32) at or above _HALF is negative: _SPAN is subtracted (two's complement). An
# unsigned 8-byte one (uint64) read negative is beyond int64.
_SHIFT = (8 * (8 - _WIDTH) % 64).astype(np.uint64)
_HALF = np.full(256, np.iinfo(np.int64).max, np.int64)
_SPAN = np.zeros(256, np.int64)
_HALF[0xD0:0xD3], _SPAN[0xD0:0xD3] = [1 << 7, 1 << 15, 1 << 31], [1 << 8, 1 << 16, 1 << 32]
_UINT64 = 0xCF
_PADDING = 9  # a tag and 8 bytes are read at every position


class Unreadable(Exception):
    """The chunk holds something the walk does not read."""


@dataclass
class RankingColumns:
    """A chunk's rankings, flattened: per decision its number of ranks, per
    rank its number of entries, and per entry (ranked replica), in order,
    its values (null where the entry has no inputs, or the input is null)."""
    ranks_per_decision: np.ndarray
    entries_per_rank: np.ndarray
    replica_pk: pa.Array  # int64
    queue_len: pa.Array  # int64
    queue_len_age_us: pa.Array  # int64
    stats_age_us: pa.Array  # int64
    age_source: pa.Array  # int8: 1 stamped, 2 observed
    stats: pa.Array  # string: JSON text


def ranking_columns(stored: pa.Array) -> RankingColumns:
    """The flat columns of a chunk of stored rankings (binary)."""
    try:
        return walked(stored)
    except Unreadable:
        return _decoded(stored)


def walked(stored: pa.Array) -> RankingColumns:
    """`ranking_columns` by the walk alone: raises `Unreadable` where it would decode by msgspec."""
    if stored.null_count:
        raise Unreadable("a null ranking")
    offsets = np.frombuffer(stored.buffers()[1], np.int32, len(stored) + 1, 4 * stored.offset).astype(np.int64)
    data = np.frombuffer(stored.buffers()[2], np.uint8, offsets[-1]) if offsets[-1] else np.zeros(0, np.uint8)
    return _Walk(data, offsets).columns()


class _Walk:
    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self._data = np.concatenate([data, np.zeros(_PADDING, np.uint8)])
        # At each position, the 8 bytes after it as one integer (a view: unaligned, overlapping), read in
        # the machine's byte order (faster to gather) and swapped to MessagePack's (big-endian) once gathered.
        self._after = np.ndarray(len(data), "<u8", self._data, offset=1, strides=(1,))
        self._offsets = offsets

    def _read(self, pos: np.ndarray, limit: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The value at each position: (kind, number, where its tag and number end)."""
        if np.any(pos >= limit):
            raise Unreadable("past the end of a ranking")
        tag = self._data[pos].astype(np.intp)  # (an index of the platform's type: the lookups below are faster)
        kind, width, number = _KIND[tag], _WIDTH[tag], _IN_TAG[tag]  # the caller checks the kind (_expect)
        wide = np.flatnonzero(width)  # few: the ages, mostly
        if wide.size:
            at, tag_at = pos[wide], tag[wide]
            value = (self._after[at].byteswap() >> _SHIFT[tag_at]).view(np.int64)
            value -= (value >= _HALF[tag_at]) * _SPAN[tag_at]
            if np.any((tag_at == _UINT64) & (value < 0)):
                raise Unreadable("an integer beyond int64")
            number[wide] = value
        return kind, number, pos + 1 + width

    def _skip(self, pos: np.ndarray, limit: np.ndarray) -> np.ndarray:
        """Where each value starting at `pos` ends, containers with all they hold."""
        pos = pos.copy()
        remaining = np.ones(len(pos), np.int64)  # values still to pass, per cursor
        active = np.arange(len(pos))
        while active.size:
            kind, number, after = self._read(pos[active], limit[active])
            _expect(kind, _READ)
            remaining[active] += np.where(kind == _ARRAY, number, np.where(kind == _MAP, 2 * number, 0)) - 1
            pos[active] = np.where(kind == _BYTES, after + number, after)
            active = active[remaining[active] > 0]
        return pos

    def columns(self) -> RankingColumns:
        starts, ends = self._offsets[:-1], self._offsets[1:]
        kind, ranks_left, pos = self._read(starts, ends)
        _expect(kind, _ARRAYS)
        ranks_per_decision = ranks_left.copy()
        first_rank = np.cumsum(ranks_per_decision) - ranks_per_decision
        entries_per_rank = np.zeros(first_rank[-1] + ranks_per_decision[-1] if len(starts) else 0, np.int64)
        entries_left = np.zeros(len(starts), np.int64)
        entries_read = np.zeros(len(starts), np.int64)
        steps = [self._entries(pos, np.zeros(0, np.int64), entries_read)]  # the first: none, for the shapes
        active = np.flatnonzero(ranks_left)
        while active.size:  # one entry per cursor and step
            # The cursors at the end of a rank read the next one's header (and the next, if it is empty).
            opening = active[entries_left[active] == 0]
            while opening.size:
                kind, size, after = self._read(pos[opening], ends[opening])
                _expect(kind, _ARRAYS)
                entries_per_rank[first_rank[opening] + ranks_per_decision[opening] - ranks_left[opening]] = size
                pos[opening], entries_left[opening] = after, size
                ranks_left[opening] -= 1
                opening = opening[(size == 0) & (ranks_left[opening] > 0)]
            reading = active[entries_left[active] > 0]
            steps.append(self._entries(pos, reading, entries_read))
            entries_left[reading] -= 1
            active = active[(entries_left[active] > 0) | (ranks_left[active] > 0)]
        if not np.array_equal(pos, ends):
            raise Unreadable("a ranking with bytes after its end")
        # The steps read the chunk's entries in another order than its own: each entry goes to its place,
        # its decision's first plus its number within the decision.
        read = {key: np.concatenate([step[key] for step in steps]) for key in steps[0]}
        place = (np.cumsum(entries_read) - entries_read)[read.pop("cursor")] + read.pop("number")
        entry = {}
        for key, values in read.items():
            entry[key] = np.empty_like(values)
            entry[key][place] = values
        inputs, null = entry["inputs"], entry["null"]
        if np.any(~null[:, 3] & ((inputs[:, 3] < 0) | (inputs[:, 3] > 2))):
            raise Unreadable("an age source other than 1 or 2")
        return RankingColumns(
            ranks_per_decision, entries_per_rank, pa.array(entry["pk"]),
            *(_with_nulls(inputs[:, i], null[:, i]) for i in range(3)),
            _with_nulls(inputs[:, 3].astype(np.int8), null[:, 3]),
            self._stats(entry["stats_from"], entry["stats_to"]))

    def _entries(self, pos: np.ndarray, cursors: np.ndarray, entries_read: np.ndarray) -> Dict[str, np.ndarray]:
        """The entry at each cursor's position, which moves past it."""
        limit = self._offsets[1:][cursors]
        kind, size, after = self._read(pos[cursors], limit)
        _expect(kind, _ARRAYS)
        if not np.all((size == 1) | (size == 6)):
            raise Unreadable("an entry of another length than 1 or 6")
        kind, pk, after = self._read(after, limit)
        _expect(kind, _INTS)
        full = np.flatnonzero(size == 6)  # the entries with inputs
        inputs = np.zeros((len(cursors), 4), np.int64)
        null = np.ones((len(cursors), 4), bool)
        here, end = after[full], limit[full]
        for i in range(4):  # queue_len, queue_len_age_us, stats_age_us, age_source
            kind, inputs[full, i], here = self._read(here, end)
            _expect(kind, _INTS_OR_NILS)
            null[full, i] = kind == _NIL
        kind, _, _ = self._read(here, end)
        _expect(kind, _MAPS_OR_NILS)
        # The stats map's bytes: none for an entry without inputs, or with nil stats.
        stats_from, stats_to = after.copy(), after.copy()
        stats_to[full] = self._skip(here, end)
        stats_from[full] = np.where(kind == _MAP, here, stats_to[full])
        after[full] = stats_to[full]
        pos[cursors] = after
        number = entries_read[cursors]
        entries_read[cursors] += 1
        return {"cursor": cursors, "number": number, "pk": pk, "inputs": inputs, "null": null,
                "stats_from": stats_from, "stats_to": stats_to}

    def _stats(self, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
        """The stats maps between `starts` and `ends` (none where they are equal) as JSON text, each
        distinct map decoded once. The maps are found in the chunk's bytes, without copying them,
        as every other value of a binary array whose others are what lies between the maps."""
        bounds = np.zeros(2 * len(starts) + 1, np.int32)
        bounds[1::2], bounds[2::2] = starts, ends
        pieces = pa.Array.from_buffers(pa.binary(), 2 * len(starts), [None, pa.py_buffer(bounds),
                                                                        pa.py_buffer(self._data)])
        distinct = pc.dictionary_encode(pieces.take(pa.array(np.arange(1, 2 * len(starts), 2))))
        texts = json_texts([_decode(stored) if stored else None for stored in distinct.dictionary.to_pylist()])
        return texts.take(distinct.indices)


def _kinds(*kinds: int) -> np.ndarray:
    """A table of the kinds a value may be (by kind: allowed or not), for `_expect`."""
    allowed = np.zeros(_SCALAR + 1, bool)
    allowed[list(kinds)] = True
    return allowed


_READ = _kinds(_INT, _NIL, _ARRAY, _MAP, _BYTES, _SCALAR)  # any but _UNREAD
_ARRAYS, _INTS, _INTS_OR_NILS, _MAPS_OR_NILS = _kinds(_ARRAY), _kinds(_INT), _kinds(_INT, _NIL), _kinds(_MAP, _NIL)


def _expect(kind: np.ndarray, allowed: np.ndarray) -> None:
    if not np.all(allowed[kind]):
        raise Unreadable("a value of another kind than the stored shape's")


def _with_nulls(values: np.ndarray, null: np.ndarray) -> pa.Array:
    """An Arrow array of `values`, null where `null` (built from buffers: pa.array(mask=) is slower)."""
    validity = pa.py_buffer(np.packbits(~null, bitorder="little")) if null.any() else None
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [validity, pa.py_buffer(np.ascontiguousarray(values))])


def json_texts(values: Sequence[object]) -> pa.Array:
    """Each value as JSON text, None as null. Encoded by a C loop (map), and
    the nulls (encoded as "null") put back by Arrow: no Python code per value."""
    texts = pa.array(list(map(_encode, values)), pa.binary()).cast(pa.string())
    return pc.if_else(pc.equal(texts, "null"), pa.scalar(None, pa.string()), texts)


def _decoded(stored: pa.Array) -> RankingColumns:
    """The chunk's columns through msgspec: every stored form, a Python object per value."""
    layouts = ranking_layouts(stored.to_pylist())
    ranks = list(chain.from_iterable(layouts))  # per rank: its entries
    entries = list(chain.from_iterable(ranks))  # per ranked replica: (pk, inputs...), or (pk,) alone
    columns = list(zip_longest(*entries))
    columns += [(None,) * len(entries)] * (6 - len(columns))  # no entry had inputs
    pks, queue_lens, queue_len_ages, stats_ages, age_sources, stats = columns
    return RankingColumns(np.array(list(map(len, layouts)), np.int64), np.array(list(map(len, ranks)), np.int64),
                          *(pa.array(values, pa.int64()) for values in (pks, queue_lens, queue_len_ages, stats_ages)),
                          pa.array(age_sources, pa.int8()), json_texts(stats))
