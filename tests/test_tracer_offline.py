"""The tracer on real router classes without a cluster (routers.testing):
sampling, accounting, rejections and the tracer's own failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter, defaultdict

import pytest

from routelens.routers import TracingMixin, ray_contract
from routelens.routers import completions as completions_module
from routelens.routers import mixin as mixin_module
from routelens.routers.config import TracerConfig
from routelens.routers.examples import (
    TracedPowerOfTwoChoicesRequestRouter,
    TracedUniformRequestRouter,
    UniformRequestRouter,
)
from routelens.routers.exporter import Exporter
from routelens.routers.faults import faults
from routelens.routers.testing import FakeResult, RayRouter, make_request, make_router, recorded_events


@pytest.fixture(autouse=True, params=["results from Ray", "own done-callbacks"])
def result_source(request, monkeypatch):
    """Each test both ways the tracer learns a request's result: from Ray's own
    done-callback (Ray 2.60), and from callbacks of its own (the fallback)."""
    if request.param == "own done-callbacks":
        monkeypatch.setattr(ray_contract, "RESULTS_FROM_RAY", False)
    return request.param


def exported_events(path):
    batches = [json.loads(line) for line in open(path)]
    return [e for b in batches for e in b["events"]], batches


async def route(router, pr):
    """One request through Ray's own routing machinery, then routed and completed."""
    replica = await router._choose_replica_for_request(pr)
    result = FakeResult.sent(router, replica.replica_id, pr)
    router.on_request_routed(pr, replica.replica_id, result)
    await asyncio.sleep(0)
    result.finish("ok")


async def wait_until(condition, timeout_s=10.0):
    """Until condition() holds: on a loaded machine the loop may get there late."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def run_traffic(tmp_path, router_cls, n, concurrency, **router_kwargs):
    sink = str(tmp_path / "events.jsonl")
    kwargs = {"jsonl_path": sink, **router_kwargs}
    exporter = Exporter(TracerConfig(flush_interval_s=0.2, **kwargs))

    async def main():
        router = make_router(router_cls, 8, router_kwargs=kwargs, exporter=exporter)
        for start in range(0, n, concurrency):
            await asyncio.gather(*(route(router, make_request()) for _ in range(min(concurrency, n - start))))
        await asyncio.sleep(completions_module.RESULTS_DRAIN_INTERVAL_S * 2)  # the last results drain
        tracer = router._routelens
        # Nothing is left behind once every request completed.
        assert not tracer._open_attempts and not tracer._unmatched_completions and not tracer._refusals_unclaimed
        return tracer.source

    source = asyncio.run(main())
    assert exporter.flush(10)
    exporter.close()
    return source, *exported_events(sink)


class CountedPowerOfTwo(TracedPowerOfTwoChoicesRequestRouter):
    """Counts choose_replicas calls from outside the tracer, to check its books."""

    calls = 0

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        CountedPowerOfTwo.calls += 1
        return await super().choose_replicas(candidate_replicas, pending_request)


def test_sampling_keeps_requests_whole_and_accounts_for_every_event(tmp_path):
    CountedPowerOfTwo.calls = 0
    source, events, batches = run_traffic(tmp_path, CountedPowerOfTwo, 1000, 20, sample_rate=0.3)
    per_request = defaultdict(set)
    for e in events:
        if e["type"] in ("routed", "completed"):
            per_request[e["internal_request_id"]].add(e["type"])
    # About 30% of requests traced, each with both its routed and completed event.
    assert 200 <= len(per_request) <= 400
    assert all(kinds == {"routed", "completed"} for kinds in per_request.values())
    # Routed events name decisions that were exported, even when FIFO handed the
    # request a replica found for a request that was not sampled.
    decisions = {e["id"] for e in events if e["type"] == "decision"}
    assert all(e["decision_id"] in decisions for e in events if e["type"] == "routed")
    # Every event produced was exported or counted as sampled out.
    dropped = batches[-1]["dropped"]
    assert set(dropped) == {"sampled_out"}
    assert batches[-1]["produced"] == len(events) + dropped["sampled_out"] == source.produced
    # ... and counted once: a decision per call, a routed and a completed per request.
    membership = sum(e["type"] in ("replicas", "stats") for e in events)
    assert source.produced == CountedPowerOfTwo.calls + 2 * 1000 + membership


def test_fifo_handoffs_are_attributed_exactly(tmp_path):
    source, events, _ = run_traffic(tmp_path, TracedPowerOfTwoChoicesRequestRouter, 600, 60)
    decisions = {e["id"]: e for e in events if e["type"] == "decision"}
    routed = [e for e in events if e["type"] == "routed"]
    assert len(routed) == 600
    for r in routed:
        d = decisions[r["decision_id"]]
        assert r["attribution"] == "exact"
        assert r["replica_id"] in d["ranks"][r["rank"]]
        assert r["own_ranking"] == (d["internal_request_id"] == r["internal_request_id"])


def test_without_the_replicas_answers_unclaimed_completions_become_rejections(tmp_path, monkeypatch):
    """Where the replicas' answers cannot be read (another Ray), a completion
    no accepted attempt claims within the grace period is taken for a refusal."""
    monkeypatch.setattr(completions_module, "REJECTION_GRACE_S", 0.05)
    monkeypatch.setattr(ray_contract, "REFUSALS", False)
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=0.1))

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        pr = make_request()
        replica = router._replicas_list[0]
        # Refused once by replica 0, then accepted by it: two completions, one claimed.
        FakeResult.sent(router, replica.replica_id, pr).finish(None)
        result = FakeResult.sent(router, replica.replica_id, pr)
        router.on_request_routed(pr, replica.replica_id, result)
        result.finish("ok")
        await wait_until(lambda: not router._routelens._unmatched_completions)  # one grace period later

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    completed = [e for e in events if e["type"] == "completed"]
    assert sorted(c["rejected"] for c in completed) == [False, True]
    accepted = next(c for c in completed if not c["rejected"])
    assert accepted["ok"] is True and accepted["routed_id"] is not None


def sink_and_exporter(tmp_path):
    """A JSON Lines sink, and an exporter writing to it every 0.1 s."""
    sink = str(tmp_path / "events.jsonl")
    return sink, Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=0.1))


async def until_settled(tracer):
    """Until the tracer holds no attempt or completion unrecorded. Ray's
    done-callback reaches the loop through call_soon_threadsafe: let it."""
    await asyncio.sleep(0.01)
    await wait_until(lambda: not tracer._open_attempts and not tracer._unmatched_completions)
    assert not tracer._open_attempts and not tracer._unmatched_completions, "the tracer did not settle"


@pytest.mark.parametrize("sender", ["usual", "Ray Client", "Java replica"])
def test_one_send_through_rays_own_sending_code(tmp_path, monkeypatch, result_source, sender):
    """Ray's sender asks the replica first (the rejection protocol) and then
    calls on_request_routed; inside Ray Client, and to a Java replica, it
    sends without asking and calls no on_request_routed. Either way the
    request is routed once, with exact attribution, and completed, never
    rejected. (Without the results from Ray, the tracer cannot pair an
    unasked send: it is recorded only as completed.)"""
    monkeypatch.setattr(completions_module, "REJECTION_GRACE_S", 0.05)
    sink, exporter = sink_and_exporter(tmp_path)

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter,
                             use_replica_queue_len_cache=sender != "Ray Client")
        if sender == "Java replica":
            for replica in router._replicas_list:
                replica.is_cross_language = True
            router.update_replicas(router._replicas_list)
        result = await RayRouter(router).send(make_request())
        result.finish("ok")
        await until_settled(router._routelens)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    routed = [e for e in events if e["type"] == "routed"]
    completed = [e for e in events if e["type"] == "completed"]
    assert len(completed) == 1 and completed[0]["rejected"] is False
    if sender == "usual" or result_source == "results from Ray":
        assert len(routed) == 1 and routed[0]["attribution"] == "exact" and routed[0]["rank"] == 0
        assert completed[0]["routed_id"] == routed[0]["id"] and completed[0]["ok"] is True
        # Only a replica that was asked reports its queue; only a request sent asking it waits for the
        # answer before it is routed (send_to_routed_ms, where its latency starts: null, not 0, otherwise).
        assert (routed[0]["reported_queue_len"] is None) == (sender != "usual")
        assert (routed[0]["send_to_routed_ms"] is None) == (sender != "usual")
    else:
        assert routed == [] and completed[0]["ok"] is None


def test_each_send_is_routed_once_beside_a_java_replica(tmp_path, monkeypatch, result_source):
    """With one Java replica in the deployment the tracer watches every send
    for ones made without asking; those made with it stay Ray's to report."""
    monkeypatch.setattr(completions_module, "REJECTION_GRACE_S", 0.05)
    sink, exporter = sink_and_exporter(tmp_path)

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        router._replicas_list[1].is_cross_language = True
        router.update_replicas(router._replicas_list)
        ray_router = RayRouter(router)
        for _ in range(20):
            (await ray_router.send(make_request())).finish("ok")
        await until_settled(router._routelens)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    routed = Counter(e["replica_id"] for e in events if e["type"] == "routed")
    completed = Counter(e["replica_id"] for e in events if e["type"] == "completed")
    python_replica, java_replica = "replica000", "replica001"
    assert completed[python_replica] + completed[java_replica] == 20
    assert routed[python_replica] == completed[python_replica] > 0
    assert routed[java_replica] == (completed[java_replica] if result_source == "results from Ray" else 0)


@pytest.mark.parametrize("result_source", ["results from Ray"], indirect=True)  # reservations need them
def test_an_unused_reservation_ends_its_own_attempt(tmp_path, result_source):
    """Nested calls share an internal_request_id: two reservations of one
    request on one replica, one dispatched and one left unused. The unused
    one ends without outcome or latency; the dispatched one keeps its own."""
    sink, exporter = sink_and_exporter(tmp_path)

    async def main():
        router = make_router(TracedUniformRequestRouter, 1, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        replica_id = router._replicas_list[0].replica_id
        dispatched, unused = make_request(), make_request()
        unused.metadata.internal_request_id = dispatched.metadata.internal_request_id
        tracer = router._routelens
        tracer.on_reserved(dispatched, replica_id, 1)  # the count each reservation's answer reported
        tracer.on_reserved(unused, replica_id, 2)
        tracer.on_reservation_unused(replica_id, unused.metadata)
        FakeResult.sent(router, replica_id, dispatched).finish("ok")
        await until_settled(tracer)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    routed = {e["request_id"]: e["id"] for e in events if e["type"] == "routed"}
    outcome = {c["routed_id"]: (c["ok"], c["latency_ms"] is None) for c in events if c["type"] == "completed"}
    dispatched_id, unused_id = sorted(routed, key=lambda r: int(r.split("-")[1]))
    assert outcome == {routed[dispatched_id]: (True, False), routed[unused_id]: (None, True)}
    reported = {e["request_id"]: e["reported_queue_len"] for e in events if e["type"] == "routed"}
    assert reported == {dispatched_id: 1, unused_id: 2}


def test_a_refusal_through_rays_own_sending_code_is_a_rejection(tmp_path, monkeypatch):
    monkeypatch.setattr(completions_module, "REJECTION_GRACE_S", 0.05)
    sink, exporter = sink_and_exporter(tmp_path)

    async def main():
        router = make_router(TracedUniformRequestRouter, 1, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        router._replicas_list[0].refuses = True
        assert await RayRouter(router).send(make_request()) is None  # Ray cancels the refused attempt
        await until_settled(router._routelens)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    assert [e["type"] for e in events if e["type"] in ("routed", "completed")] == ["completed"]
    assert [e["rejected"] for e in events if e["type"] == "completed"] == [True]


@pytest.mark.parametrize("router_cls", [TracedUniformRequestRouter, TracedPowerOfTwoChoicesRequestRouter])
def test_each_answer_carries_what_the_router_believed_and_what_the_replica_reported(tmp_path, monkeypatch,
                                                                                   router_cls):
    """Through Ray's own sending code, replicas that accept and refuse: each
    answer (routed event, or refusal) carries the chosen replica's queue
    length as its decision saw it, the shortest the router saw among every
    candidate, ranked or not (Uniform ranks one), and the count the replica
    reported in its answer."""
    monkeypatch.setattr(completions_module, "REJECTION_GRACE_S", 0.05)
    sink, exporter = sink_and_exporter(tmp_path)
    believed = {"replica000": 2, "replica001": 1, "replica002": 3, "replica003": 4}
    reported = {"replica000": 4, "replica001": 0, "replica002": 3, "replica003": 2}

    async def main():
        router = make_router(router_cls, 4, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        cache = router.replica_queue_len_cache
        for replica in router._replicas_list:
            replica.queue_len = reported[replica.replica_id.unique_id]
        for refusing in [False, True] * 10:
            for replica in router._replicas_list:
                replica.refuses = refusing
                # What the router believes, set again before each send (a send and its answer change it).
                cache.update(replica.replica_id, believed[replica.replica_id.unique_id])
            result = await RayRouter(router).send(make_request())
            assert (result is None) == refusing
            if result is not None:
                result.finish("ok")
            await until_settled(router._routelens)  # and Ray's own callbacks (the cache's decrement) ran

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    decisions = [e for e in events if e["type"] == "decision"]
    answers = [e for e in events if e["type"] == "routed" or (e["type"] == "completed" and e["rejected"])]
    assert len(answers) == 20 and sum(e["type"] == "routed" for e in answers) == 10
    for answer in answers:
        replica = answer["replica_id"]
        assert (answer["believed_queue_len"], answer["shortest_queue_len"], answer["reported_queue_len"]) == (
            believed[replica], min(believed.values()), reported[replica]), answer
    # Each answer names its decision (a refusal as a routed event does), and the belief is the input that
    # decision recorded for the replica.
    inputs = {d["id"]: d["replicas"] for d in decisions}
    assert all(a["believed_queue_len"] == inputs[a["decision_id"]][a["replica_id"]]["queue_len"] for a in answers)
    # The shortest is over every candidate, not over the ranked ones (Uniform ranks one, pow-2 two): some
    # answers came from a replica longer than one the router did not rank.
    assert any(a["believed_queue_len"] > a["shortest_queue_len"] for a in answers)
    # Completions of accepted attempts are not answers: they carry none of it.
    assert all("reported_queue_len" not in e for e in events if e["type"] == "completed" and not e["rejected"])


def test_a_result_that_comes_before_routed_is_its_attempts_own(tmp_path, result_source):
    """A fast request can complete before Ray resumes to call on_request_routed:
    its completion is paired with it (not taken for a rejection), failure included."""
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=0.1))

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        assert router._routelens.results_from_ray == (result_source == "results from Ray")
        pr = make_request()
        replica = await router._choose_replica_for_request(pr)
        result = FakeResult.sent(router, replica.replica_id, pr)
        result.finish(RuntimeError("the replica raised"))
        router.on_request_routed(pr, replica.replica_id, result)
        await wait_until(lambda: not router._routelens._open_attempts)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    routed = [e for e in events if e["type"] == "routed"]
    completed = [e for e in events if e["type"] == "completed"]
    assert len(routed) == 1 and len(completed) == 1
    assert completed[0]["routed_id"] == routed[0]["id"]
    assert completed[0]["rejected"] is False and completed[0]["ok"] is False
    assert completed[0]["latency_ms"] >= 0


HELD_S = 0.05  # how long the router's loop is held between a request's send and its on_request_routed


def test_latency_starts_at_the_send_however_long_the_loop_is_held(tmp_path):
    """Issue 27: a router that blocks its loop (Ray's prefix-aware router
    calls ray.get there) delays on_request_routed past the replica's answer.
    The request's latency starts at its send all the same, and the delay is
    recorded as its own figure: neither can be below the time held."""
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=0.1))
    answered = asyncio.Event()

    class HeldAnswer(FakeResult):
        async def get_rejection_response(self):
            await answered.wait()
            return await super().get_rejection_response()

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        sent = []
        for replica in router._replicas_list:
            replica.try_send_request = lambda pr, with_rejection: sent.append(pr) or HeldAnswer()
        sending = asyncio.create_task(RayRouter(router).send(make_request()))
        await wait_until(lambda: sent)
        time.sleep(HELD_S)  # the loop held, as a router that blocks it holds it
        answered.set()
        result = await sending
        result.finish("ok")
        await wait_until(lambda: not router._routelens._open_attempts)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    [routed] = [e for e in events if e["type"] == "routed"]
    [completed] = [e for e in events if e["type"] == "completed"]
    assert completed["routed_id"] == routed["id"]
    assert completed["latency_ms"] >= HELD_S * 1000.0
    assert completed["latency_ms"] >= routed["send_to_routed_ms"] >= HELD_S * 1000.0


ANSWER_GAP_S = 0.1  # between the answers of two requests in flight, answered in the other order than sent


@pytest.mark.parametrize("unanswered_kept", [2, 1])
def test_each_request_in_flight_keeps_its_own_send_time(tmp_path, monkeypatch, unanswered_kept):
    """Send times are noted per sender and matched to their request with
    its answer: two requests in flight, answered in the other order than
    they were sent, each wait their own time (the first sent, longest).
    The tracer keeps no send time once the answers are in; with room for
    fewer unanswered sends than are in flight, the oldest is forgotten and
    its latency starts where Ray routes it (send_to_routed_ms null)."""
    monkeypatch.setattr(mixin_module, "MAX_UNANSWERED_SENDS", unanswered_kept)
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=0.1))
    answers = {}

    class AnsweredOnCue(FakeResult):
        def __init__(self, cue):
            super().__init__()
            self.cue = cue

        async def get_rejection_response(self):
            await self.cue.wait()
            return await super().get_rejection_response()

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)

        def send(pr, with_rejection):
            answers[pr.metadata.request_id] = cue = asyncio.Event()
            return AnsweredOnCue(cue)

        for replica in router._replicas_list:
            replica.try_send_request = send
        first, second = make_request(), make_request()
        sending = [asyncio.create_task(RayRouter(router).send(first))]
        await wait_until(lambda: len(answers) == 1)
        sending.append(asyncio.create_task(RayRouter(router).send(second)))
        await wait_until(lambda: len(answers) == 2)
        answers[second.metadata.request_id].set()
        await asyncio.sleep(ANSWER_GAP_S)
        answers[first.metadata.request_id].set()
        for result in await asyncio.gather(*sending):
            result.finish("ok")
        await wait_until(lambda: not router._routelens._open_attempts)
        assert router._routelens.send_times == {}
        return first.metadata.request_id

    first_id = asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    routed = {e["request_id"]: e for e in events if e["type"] == "routed"}
    latency_ms = {e["routed_id"]: e["latency_ms"] for e in events if e["type"] == "completed"}
    [second_id] = set(routed) - {first_id}
    first_latency_ms = latency_ms[routed[first_id]["id"]]
    assert routed[second_id]["send_to_routed_ms"] < ANSWER_GAP_S * 1000.0
    if unanswered_kept == 2:
        assert first_latency_ms >= routed[first_id]["send_to_routed_ms"] >= ANSWER_GAP_S * 1000.0
    else:  # the first send's time was forgotten when the second was noted
        assert routed[first_id]["send_to_routed_ms"] is None and first_latency_ms < ANSWER_GAP_S * 1000.0


class CompletionCountingRouter(TracedUniformRequestRouter):
    """A subclass's own on_request_completed between Ray and the mixin."""

    completions = 0

    def on_request_completed(self, replica_id, internal_request_id):
        type(self).completions += 1
        return super().on_request_completed(replica_id, internal_request_id)


def test_results_reach_the_tracer_through_a_subclass_override(tmp_path):
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=0.1))

    async def main():
        router = make_router(CompletionCountingRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        for fails in (False, True):
            pr = make_request()
            replica = await router._choose_replica_for_request(pr)
            result = FakeResult.sent(router, replica.replica_id, pr)
            router.on_request_routed(pr, replica.replica_id, result)
            result.finish(RuntimeError("failed") if fails else "done")
        await wait_until(lambda: not router._routelens._open_attempts)

    CompletionCountingRouter.completions = 0
    asyncio.run(main())
    assert CompletionCountingRouter.completions == 2
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    assert [e["ok"] for e in events if e["type"] == "completed"] == [True, False]


class ExplodingStats(dict):
    def __eq__(self, other):
        raise RuntimeError("cannot compare these stats")

    __ne__ = __eq__
    __hash__ = None


def test_tracer_failures_never_reach_the_router(tmp_path):
    """A replica whose stats break the tracer: update_replicas and routing go on."""
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink))
    before = faults.total

    async def main():
        router = make_router(TracedUniformRequestRouter, 3, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        for replica in router._replicas_list:
            replica.routing_stats = ExplodingStats(load=1)
        router.update_replicas(router._replicas_list)  # the tracer fails comparing stats
        router.update_replicas(router._replicas_list[:2])  # and Ray's own bookkeeping still happened
        assert len(router._replicas_list) == 2
        ranks = await router.choose_replicas(router._replicas_list, make_request())
        assert len(ranks) == 1 and ranks[0][0] in router._replicas_list

    asyncio.run(main())
    assert faults.total > before


class KwargsRecordingRouter(UniformRequestRouter):
    def initialize_state(self, **kwargs):
        self.received = kwargs
        super().initialize_state(**kwargs)


class TracedKwargsRecordingRouter(TracingMixin, KwargsRecordingRouter):
    pass


def test_router_kwargs_pass_through_and_labels_reach_the_source(tmp_path):
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink))
    kwargs = {"jsonl_path": sink, "labels": {"router_version": "b"}, "sample_rate": 1, "window_s": 30}

    async def main():
        router = make_router(TracedKwargsRecordingRouter, 2, router_kwargs=kwargs, exporter=exporter)
        await router.choose_replicas(router._replicas_list, make_request())
        return router

    router = asyncio.run(main())
    # The wrapped router's initialize_state sees only the keys the tracer does not own.
    assert router.received == {"window_s": 30}
    assert exporter.flush(10)
    _, batches = exported_events(sink)
    assert {b["source"]["labels"]["router_version"] for b in batches} == {"b"}


def test_without_a_fulfilment_routed_falls_back_to_the_last_decision(tmp_path):
    """Routed events whose fulfilment was not seen name the request's last decision."""
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink))

    async def main():
        router = make_router(TracedUniformRequestRouter, 3, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        inside, outside = make_request(), make_request()
        ranked = (await router.choose_replicas(router._replicas_list, inside))[0][0]
        router.on_request_routed(inside, ranked.replica_id, FakeResult())
        ranked = (await router.choose_replicas(router._replicas_list, outside))[0][0]
        other = next(r for r in router._replicas_list if r is not ranked)
        router.on_request_routed(outside, other.replica_id, FakeResult())

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    decisions = {e["internal_request_id"]: e["id"] for e in events if e["type"] == "decision"}
    routed = {e["internal_request_id"]: e for e in events if e["type"] == "routed"}
    assert len(routed) == 2
    for request_id, r in routed.items():
        assert r["attribution"] == "last_decision" and r["decision_id"] == decisions[request_id]
    ranks = sorted((r["rank"] is None) for r in routed.values())
    assert ranks == [False, True]  # rank 0 when the replica was ranked, null when it was not


def test_replicas_without_routing_stats_have_no_staleness(tmp_path):
    """Ray gives a router {} before a replica first reports, and always for a
    deployment without record_routing_stats: there is no value to be stale."""
    _, events, _ = run_traffic(tmp_path, TracedUniformRequestRouter, 20, 5)
    candidates = [c for e in events if e["type"] == "decision" for c in e["replicas"].values()]
    assert candidates
    assert all(c["stats"] == {} and c["stats_age_s"] is None and c["stats_age_source"] is None
               for c in candidates)


def test_records_built_in_place_follow_their_layouts(tmp_path):
    """The decision and routed records are built inline on the hot path
    (routers.records says why): their slots are where the names say."""
    from routelens.routers import records

    exporter = Exporter(TracerConfig(jsonl_path=str(tmp_path / "events.jsonl"), flush_interval_s=3600))

    async def main():
        router = make_router(TracedUniformRequestRouter, 2, router_kwargs={"jsonl_path": str(tmp_path / "x")},
                             exporter=exporter)
        pr = make_request()
        result = await RayRouter(router).send(pr)
        result.finish("ok")
        await asyncio.sleep(0.01)
        return router, pr

    router, pr = asyncio.run(main())
    by_kind = {item[records.KIND]: item for item in list(exporter._queue)}
    exporter._queue.clear()
    exporter.close()
    source, trace = router._routelens.source, pr._routelens
    decision, routed, completed = by_kind[records.DECISION], by_kind[records.ROUTED], by_kind[records.COMPLETED]
    assert len(decision) == records.D_EXPLANATION + 1 and decision[records.SOURCE] is source
    assert decision[records.D_QUEUE_LENS] == {}  # a copy of the router's queue-length cache, empty at first
    assert decision[records.D_TRACE] is trace and decision[records.D_ATTEMPT] == 0
    assert decision[records.D_N_CANDIDATES] == 2 and decision[records.D_EXPORTED] is True
    assert decision[records.D_ID] is None and decision[records.D_EXPLANATION] is None  # the router explained nothing
    assert len(routed) == records.R_SEND_TO_ROUTED_MS + 1 and routed[records.SOURCE] is source
    assert routed[records.R_REPORTED_QUEUE_LEN] == 0  # the fake replica's answer
    assert routed[records.R_SEND_TO_ROUTED_MS] >= 0.0  # sent by Ray's usual sender, asking the replica
    assert routed[records.R_TRACE] is trace and routed[records.R_DECISION] is decision
    assert routed[records.R_RANK] == 0 and routed[records.R_OWN_RANKING] is True
    assert routed[records.R_ATTEMPTS] == 1 and routed[records.R_ATTRIBUTION] == "exact"
    assert routed[records.R_REPLICA_ID] is decision[records.D_RANKS][0][0].replica_id
    assert completed[records.C_ROUTED] == (routed[records.TS], routed[records.SEQ])
    assert completed[records.C_OK] is True and completed[records.C_REJECTED] is False


class ExplainingUniform(UniformRequestRouter):
    """Explains each decision after awaiting a delay set per request (so that
    concurrent calls interleave), from a task of its own for every other request.
    A router's own choose_replicas: the mixin wraps it (TracedExplainingUniform)."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        number = int(pending_request.metadata.request_id.rsplit("-", 1)[1])
        await asyncio.sleep(0.001 * (number % 7))
        if number % 2:
            await asyncio.gather(self._explain_from_a_task(number))
        else:
            self.routelens_explain(f"request {number}", number=number, half=number / 2)
        return await super().choose_replicas(candidate_replicas, pending_request)

    async def _explain_from_a_task(self, number):
        await asyncio.sleep(0)
        self.routelens_explain(f"request {number}", number=number, half=number / 2)


class TracedExplainingUniform(TracingMixin, ExplainingUniform):
    pass


def decisions_of(router):
    return [e for e in recorded_events(router) if e["type"] == "decision"]


def decisions_made(tmp_path, router_cls, n_decisions, n_replicas):
    """The decision events of `n_decisions` choose_replicas calls, one after another, of a new router."""
    async def main():
        router = make_router(router_cls, n_replicas, record_to=str(tmp_path / "events.jsonl"))
        for _ in range(n_decisions):
            await router.choose_replicas(router._replicas_list, make_request())
        return router

    return decisions_of(asyncio.run(main()))


def test_each_decision_keeps_its_own_explanation_when_calls_interleave(tmp_path):
    async def main():
        router = make_router(TracedExplainingUniform, 4, record_to=str(tmp_path / "events.jsonl"))
        await asyncio.gather(*(router.choose_replicas(router._replicas_list, make_request()) for _ in range(30)))
        return router

    decisions = decisions_of(asyncio.run(main()))
    assert len(decisions) == 30
    for d in decisions:
        number = int(d["request_id"].rsplit("-", 1)[1])
        assert d["reason"] == f"request {number}"
        assert d["scores"] == {"number": number, "half": number / 2}


class TracedPowerOfTwoExplainingLocality(TracedPowerOfTwoChoicesRequestRouter):
    """A traced subclass of a router it cannot change: explains from one of
    the wrapped router's helpers, which its choose_replicas calls."""

    def apply_locality_routing(self, pending_request=None):
        candidates = super().apply_locality_routing(pending_request)
        self.routelens_explain("locality", candidates=len(candidates))
        return candidates


def test_a_traced_subclass_explains_from_a_helper_of_the_router_it_wraps(tmp_path):
    decisions = decisions_made(tmp_path, TracedPowerOfTwoExplainingLocality, 3, 5)
    assert [(d["reason"], d["scores"]) for d in decisions] == [("locality", {"candidates": 5})] * 3


class ExplainingTwice(UniformRequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        self.routelens_explain("first", score=1)
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        self.routelens_explain("second", score=2)
        return ranks


class TracedExplainingTwice(TracingMixin, ExplainingTwice):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ranks = await super().choose_replicas(candidate_replicas, pending_request)
        # Below the mixin: its choose_replicas has returned and recorded the decision.
        self.routelens_explain("too late", score=3)
        return ranks


def test_the_last_explanation_wins_and_one_outside_a_decision_is_counted(tmp_path):
    before = faults.total

    async def main():
        router = make_router(TracedExplainingTwice, 3, record_to=str(tmp_path / "events.jsonl"))
        await router.choose_replicas(router._replicas_list, make_request())
        router.routelens_explain("after", score=3)  # outside choose_replicas: ignored
        plain = make_router(TracedUniformRequestRouter, 3, record_to=str(tmp_path / "events.jsonl"))
        await plain.choose_replicas(plain._replicas_list, make_request())
        return router, plain

    router, plain = asyncio.run(main())
    assert faults.total == before + 2
    (explained,) = decisions_of(router)
    assert explained["reason"] == "second" and explained["scores"] == {"score": 2}
    (unexplained,) = decisions_of(plain)
    assert "reason" not in unexplained and "scores" not in unexplained


class ExplainingBeyondBounds(UniformRequestRouter):
    calls = []  # (reason, scores) to explain, one per decision

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        reason, scores = self.calls.pop(0)
        self.routelens_explain(reason, **scores)
        return await super().choose_replicas(candidate_replicas, pending_request)


class TracedExplainingBeyondBounds(TracingMixin, ExplainingBeyondBounds):
    pass


def test_explanations_are_bounded_and_every_cut_is_counted(tmp_path):
    from routelens.routers.explanations import MAX_REASON_CHARS, MAX_SCORE_NAME_CHARS, MAX_SCORES

    many = {f"s{i}": i for i in range(MAX_SCORES + 3)}
    ExplainingBeyondBounds.calls = [
        ("r" * (MAX_REASON_CHARS + 10), {}),  # cut
        ("many", many),  # the first MAX_SCORES kept
        ("odd", {"n" * (MAX_SCORE_NAME_CHARS + 1): 1.0, "nan": float("nan"), "inf": float("inf"), "flag": True,
                 "text": "1", "huge": 10 ** 400, "ok": 7}),  # only "ok" kept
        ("", {"x": 1}),  # no reason: ignored
        (12, {"x": 1}),  # not a str: ignored
    ]
    before = faults.total
    decisions = decisions_made(tmp_path, TracedExplainingBeyondBounds, 5, 3)
    assert [(d.get("reason"), d.get("scores")) for d in decisions] == [
        ("r" * MAX_REASON_CHARS, {}),
        ("many", {f"s{i}": i for i in range(MAX_SCORES)}),
        ("odd", {"ok": 7}),
        (None, None),
        (None, None),
    ]
    assert faults.total == before + 1 + 1 + 6 + 1 + 1


def test_the_collector_accepts_exactly_the_explanations_the_tracer_keeps():
    from routelens.collector.ingest import schema
    from routelens.routers import explanations

    assert (schema.MAX_REASON_CHARS, schema.MAX_SCORES, schema.MAX_SCORE_NAME_CHARS) == (
        explanations.MAX_REASON_CHARS, explanations.MAX_SCORES, explanations.MAX_SCORE_NAME_CHARS)
