"""Unit tests for routers.stats: stamping routing stats and reading the stamp back."""

from __future__ import annotations

import asyncio
import inspect
import time

import pytest

from routelens.routers.stats import STATS_TIMESTAMP_KEY, collected_at, stamp_routing_stats


class App:
    """Stands in for a Serve deployment defining record_routing_stats."""

    def __init__(self, result):
        self.result = result
        self.calls = []

    @stamp_routing_stats
    def record_routing_stats(self, *args, **kwargs):
        """Sync stats."""
        self.calls.append((args, kwargs))
        return self.result

    @stamp_routing_stats
    async def record_routing_stats_async(self):
        """Async stats."""
        await asyncio.sleep(0)
        return self.result


def test_sync_method_gets_a_stamp_between_before_and_after():
    """A sync method's dict gains the timestamp key, taken during the call."""
    app = App({"throughput": 12.5, "model": "m1"})
    before = time.time()
    stats = app.record_routing_stats()
    after = time.time()
    assert before <= stats[STATS_TIMESTAMP_KEY] <= after
    assert {k: v for k, v in stats.items() if k != STATS_TIMESTAMP_KEY} == {"throughput": 12.5, "model": "m1"}


def test_async_method_gets_a_stamp_between_before_and_after():
    """An async method stays a coroutine function and its dict gains the timestamp."""
    app = App({"qps": 3})
    assert inspect.iscoroutinefunction(App.record_routing_stats_async)
    before = time.time()
    stats = asyncio.run(app.record_routing_stats_async())
    after = time.time()
    assert before <= stats[STATS_TIMESTAMP_KEY] <= after
    assert stats["qps"] == 3


def test_original_dict_is_not_mutated():
    """The method's own dict is left without the stamp (a new dict is returned)."""
    original = {"a": 1}
    stats = App(original).record_routing_stats()
    assert original == {"a": 1}
    assert stats is not original


def test_stamp_is_fresh_on_every_call():
    """Each call gets its own, non-decreasing stamp."""
    app = App({"a": 1})
    first = app.record_routing_stats()[STATS_TIMESTAMP_KEY]
    second = app.record_routing_stats()[STATS_TIMESTAMP_KEY]
    assert second >= first


def test_empty_dict_is_stamped():
    """An empty dict still gets the timestamp."""
    assert set(App({}).record_routing_stats()) == {STATS_TIMESTAMP_KEY}


@pytest.mark.parametrize("result", [None, [1, 2], "stats", 42, ("a", 1)])
def test_non_dict_results_are_untouched_sync(result):
    """A sync method returning a non-dict gets exactly that object back."""
    assert App(result).record_routing_stats() is result


@pytest.mark.parametrize("result", [None, [1, 2], "stats"])
def test_non_dict_results_are_untouched_async(result):
    """An async method returning a non-dict gets exactly that object back."""
    assert asyncio.run(App(result).record_routing_stats_async()) is result


def test_arguments_and_metadata_are_passed_through():
    """Arguments reach the method, and its name and docstring are preserved."""
    app = App({})
    app.record_routing_stats(1, key="v")
    assert app.calls == [((1,), {"key": "v"})]
    assert App.record_routing_stats.__name__ == "record_routing_stats"
    assert App.record_routing_stats.__doc__ == "Sync stats."
    assert App.record_routing_stats_async.__name__ == "record_routing_stats_async"


def test_exceptions_propagate():
    """An exception from the method is not swallowed by the decorator."""

    @stamp_routing_stats
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        broken()


def test_collected_at_reads_the_stamp():
    """collected_at returns the stamp a decorated method added."""
    stats = App({"a": 1}).record_routing_stats()
    assert collected_at(stats) == stats[STATS_TIMESTAMP_KEY]


def test_collected_at_returns_float_for_int_stamp():
    """An integer stamp is returned as a float."""
    value = collected_at({STATS_TIMESTAMP_KEY: 1700000000})
    assert value == 1700000000.0 and isinstance(value, float)


@pytest.mark.parametrize(
    "stats",
    [None, {}, {"throughput": 1.0}, {STATS_TIMESTAMP_KEY: "1700000000"}, {STATS_TIMESTAMP_KEY: None}],
)
def test_collected_at_none_without_a_numeric_stamp(stats):
    """Missing stats, an unstamped dict or a non-numeric stamp give None."""
    assert collected_at(stats) is None
