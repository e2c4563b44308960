"""Stored rankings as flat columns: the numpy walk reads exactly what msgspec decodes."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pyarrow as pa
import pytest

from routelens.collector.export.rankings import RankingColumns, Unreadable, _decoded, ranking_columns, walked

_encode = msgspec.msgpack.Encoder().encode

# Integers at the edges of each MessagePack width (fixint, int8/uint8 ... int64/uint64 within int64).
EDGES = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
         -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]


def random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none"] + (["list", "dict"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice(EDGES + [rng.randrange(-10**6, 10**6)])
    if kind == "float":
        return rng.uniform(-1e6, 1e6)
    if kind == "str":  # fixstr, str8 and str16 lengths
        return "x" * rng.choice([0, 5, 31, 32, 255, 256, 70000 if depth == 0 and rng.random() < 0.01 else 3])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.choice([0, 2, 17]))]
    return {f"k{i}": random_value(rng, depth + 1) for i in range(rng.choice([0, 1, 16, 17]))}


def random_entry(rng: random.Random) -> list:
    pk = rng.choice([1, 50, 200, 70000, 2**40])
    if rng.random() < 0.2:
        return [pk]  # a ranked replica the event gave no inputs for
    maybe = lambda value: None if rng.random() < 0.15 else value  # noqa: E731
    stats = rng.choice([None, {"throughput": rng.randrange(300)}, random_value(rng, 1) or None])
    if stats is not None and not isinstance(stats, dict):
        stats = {"value": stats}
    return [pk, maybe(rng.choice(EDGES)), maybe(rng.randrange(2**40)), maybe(rng.choice(EDGES[:9])),
            maybe(rng.choice([1, 2])), stats]


def random_ranking(rng: random.Random) -> bytes:
    ranks = [[random_entry(rng) for _ in range(rng.choice([0, 1, 2, 2, 5, 20]))]
             for _ in range(rng.choice([0, 1, 1, 1, 2, 3, 16]))]
    return _encode(ranks)


def same(a: RankingColumns, b: RankingColumns) -> None:
    for name in RankingColumns.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.tolist() == y.tolist(), name
        else:
            assert x.type == y.type and x.to_pylist() == y.to_pylist(), name


@pytest.mark.parametrize("seed", range(20))
def test_the_walk_reads_what_msgspec_decodes(seed):
    rng = random.Random(seed)
    stored = pa.array([random_ranking(rng) for _ in range(300)], pa.binary())
    same(walked(stored), _decoded(stored))
    # A slice of the chunk (an array whose offsets do not start at 0) too.
    same(walked(stored.slice(17, 100)), _decoded(stored.slice(17, 100)))


def test_the_bench_shape_is_read():
    """Pow-2 decisions as the ingest stores them: one rank of two replicas with their inputs."""
    rows = [_encode([[[3, 2, 123456, 98765, 1, {"throughput": 41}], [7, 0, 5, None, 2, None]]]),
            _encode([[[9, None, None, None, None, {"throughput": 200, "load": 0.5}]]]), _encode([[], [[4]]])]
    columns = walked(pa.array(rows, pa.binary()))
    assert columns.ranks_per_decision.tolist() == [1, 1, 2]
    assert columns.entries_per_rank.tolist() == [2, 1, 0, 1]
    assert columns.replica_pk.to_pylist() == [3, 7, 9, 4]
    assert columns.queue_len.to_pylist() == [2, 0, None, None]
    assert columns.queue_len_age_us.to_pylist() == [123456, 5, None, None]
    assert columns.stats_age_us.to_pylist() == [98765, None, None, None]
    assert columns.age_source.to_pylist() == [1, 2, None, None]
    assert columns.stats.to_pylist() == ['{"throughput":41}', None, '{"throughput":200,"load":0.5}', None]


def test_an_empty_chunk():
    same(walked(pa.array([], pa.binary())), _decoded(pa.array([], pa.binary())))


@pytest.mark.parametrize("stored", [
    b'[[[3,2,1.5,2.0,"s",{"a":1}]]]',  # the JSON form
    _encode([[[3, 2, 2**64 - 1, 5, 1, None]]]),  # an integer beyond int64 (uint64)
    _encode([[[3, 2.5, 1, 5, 1, None]]]),  # a float where an integer belongs
    _encode([[[3, 2, 1, 5, 1, None]]]) + b"\x00",  # bytes after the ranking
    _encode([[[3, 2, 1, 5, 7, None]]]),  # an age source other than 1 or 2
    _encode([[[3, 2, 1, 5, 1, {"t": msgspec.msgpack.Ext(1, b"x")}]]]),  # an ext type in the stats
    _encode([[[3, 2, 1]]]),  # an entry of 3 values
    _encode([[[3, 2, 1, 5, 1, None]]])[:-2],  # cut short
], ids=["json", "uint64", "float", "trailing", "age-source", "ext", "short-entry", "cut"])
def test_what_the_walk_does_not_read_is_left_to_msgspec(stored):
    good = _encode([[[1, 2, 3, 4, 2, {"throughput": 1}]]])
    chunk = pa.array([good, stored, good], pa.binary())
    with pytest.raises(Unreadable):
        walked(chunk)
    try:
        expected = _decoded(chunk)
    except Exception as exc:  # what msgspec (or Arrow) says is wrong: ranking_columns says the same
        with pytest.raises(type(exc)):
            ranking_columns(chunk)
    else:
        same(ranking_columns(chunk), expected)


def test_a_null_ranking_is_left_to_msgspec():
    with pytest.raises(Unreadable):
        walked(pa.array([None], pa.binary()))
