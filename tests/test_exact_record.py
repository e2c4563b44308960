"""An exact record where Ray's routing gets intricate (issue 23, tracer
points), offline: real router classes and Ray's own routing and sending
code (routers.testing), each case driven in the order that used to go
wrong. tests/test_ground_truth.py checks the same on real Serve."""

from __future__ import annotations

import asyncio
import gc
from typing import List

import pytest
from ray.serve.request_router import FIFOMixin, RequestRouter

from routelens.routers import TracingMixin, decisions, records
from routelens.routers.config import TracerConfig
from routelens.routers.exporter import Exporter
from routelens.routers.faults import faults
from routelens.routers.testing import FakeReplica, FakeResult, RayRouter, make_request, make_router
from tests.test_tracer_offline import exported_events, sink_and_exporter, until_settled


class ScriptedRouter(FIFOMixin, RequestRouter):
    """Ranks the replicas as the test scripts it: each call takes the next
    ranking, given as lists of replica indices."""

    script: List[List[List[int]]] = []

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        by_index = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[by_index[i] for i in rank] for rank in self.script.pop(0)]


class TracedScriptedRouter(TracingMixin, ScriptedRouter):
    pass


def test_two_routing_tasks_of_one_request_each_name_their_own_decision(tmp_path):
    """A retried request can be routed by two tasks at once. Task one ranks
    [replica 0], then task two ranks [replica 1], [replica 0]; task one then
    fulfils with replica 0. The routed event names task one's decision, at
    rank 0, not the request's latest decision that ranked replica 0."""
    sink, exporter = sink_and_exporter(tmp_path)

    async def main():
        TracedScriptedRouter.script = [[[0]], [[1], [0]]]
        router = make_router(TracedScriptedRouter, 2, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        replicas = sorted(router._replicas_list, key=lambda r: r.replica_id.unique_id)
        pr = make_request()
        second_decided = asyncio.Event()

        async def task_one():
            await router.choose_replicas(router._replicas_list, pr)
            await second_decided.wait()
            router._pending_requests_to_fulfill.append(pr)  # as Ray queues it
            router._fulfill_next_pending_request(replicas[0], pr.metadata)

        async def task_two():
            await router.choose_replicas(router._replicas_list, pr)
            second_decided.set()

        await asyncio.gather(task_one(), task_two())
        assert pr.future.result() is replicas[0]
        result = FakeResult.sent(router, replicas[0].replica_id, pr)
        router.on_request_routed(pr, replicas[0].replica_id, result)
        result.finish("ok")
        await until_settled(router._routelens)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    decisions_by_id = {e["id"]: e for e in events if e["type"] == "decision"}
    [routed] = [e for e in events if e["type"] == "routed"]
    named = decisions_by_id[routed["decision_id"]]
    assert (named["attempt"], routed["rank"], routed["attribution"]) == (0, 0, "exact")


class RefusedFirst(FakeReplica):
    """Refuses its first request; the refused attempt's completion comes only
    when the test finishes it (Ray cancels a refused attempt, but its
    generator has usually ended already: the completion is not a cancellation)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.results: List[FakeResult] = []

    def try_send_request(self, pr, with_rejection):
        result = LateResult(accepted=bool(self.results), queue_len=self.queue_len)
        self.results.append(result)
        return result


class LateResult(FakeResult):
    def cancel(self) -> None:
        pass  # too late: the attempt is complete, its completion on its way


@pytest.mark.parametrize("refused_completion", ["after the accepted attempt was routed",
                                                "before the replica's answer was read"])
def test_a_refusal_and_an_acceptance_on_one_replica_are_never_swapped(tmp_path, refused_completion):
    sink, exporter = sink_and_exporter(tmp_path)

    async def main():
        router = make_router(TracedScriptedRouter, 1, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        replica = RefusedFirst(router._replicas_list[0].replica_id)
        router.update_replicas([replica])
        TracedScriptedRouter.script = [[[0]], [[0]]]
        ray_router = RayRouter(router)
        pr = make_request()
        if refused_completion == "before the replica's answer was read":
            original = LateResult.get_rejection_response

            async def answer_after_completing(result):
                result.finish(None)
                await asyncio.sleep(0.01)  # Ray's done-callback reaches the loop first
                return await original(result)

            LateResult.get_rejection_response = answer_after_completing
            try:
                assert await ray_router.send(pr) is None
            finally:
                LateResult.get_rejection_response = original
            accepted = await ray_router._route_and_send_request_once(pr, "response", is_retry=True)
        else:
            assert await ray_router.send(pr) is None
            accepted = await ray_router._route_and_send_request_once(pr, "response", is_retry=True)
            # The refused attempt's completion, after routed (its value: what Ray's cancel left).
            replica.results[0].finish(RuntimeError("the refused attempt"))
        await asyncio.sleep(0.05)  # the accepted request's work
        accepted.finish("ok")
        await until_settled(router._routelens)

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    [routed] = [e for e in events if e["type"] == "routed"]
    completed = sorted((e for e in events if e["type"] == "completed"), key=lambda e: e["rejected"])
    assert [(c["rejected"], c["ok"], c["routed_id"]) for c in completed] == [
        (False, True, routed["id"]), (True, False, None)]
    assert completed[0]["latency_ms"] >= 50


def test_a_refusal_is_recorded_as_the_replica_answers_and_kept_at_exit(tmp_path):
    """No grace period: an exporter shut down right after the refusal still
    delivers it, and the books balance."""
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=5))

    async def main():
        router = make_router(TracedScriptedRouter, 1, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        router._replicas_list[0].refuses = True
        TracedScriptedRouter.script = [[[0]]]
        assert await RayRouter(router).send(make_request()) is None
        return router._routelens.source

    source = asyncio.run(main())  # the loop ends: no timer of the tracer's runs after this
    exporter.close()
    events, batches = exported_events(sink)
    assert [(e["type"], e["rejected"]) for e in events if e["type"] == "completed"] == [("completed", True)]
    assert batches[-1]["produced"] == len(events) + sum(batches[-1]["dropped"].values()) == source.produced


def test_what_the_tracer_holds_at_exit_is_counted_as_dropped(tmp_path):
    """A completion no attempt claimed yet (its attempt failed before the
    replica answered) is held for a grace period; if the process ends
    first, it is counted, so produced == stored + dropped still holds."""
    sink = str(tmp_path / "events.jsonl")
    exporter = Exporter(TracerConfig(jsonl_path=sink, flush_interval_s=5))

    async def main():
        router = make_router(TracedScriptedRouter, 1, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        pr = make_request()
        FakeResult.sent(router, router._replicas_list[0].replica_id, pr).finish(RuntimeError("actor died"))
        await asyncio.sleep(0.01)
        return router._routelens.source

    source = asyncio.run(main())
    exporter.close()
    events, batches = exported_events(sink)
    assert [e for e in events if e["type"] == "completed"] == []
    assert batches[-1]["dropped"] == {"unsettled_at_exit": 1}
    assert batches[-1]["produced"] == len(events) + 1 == source.produced


class NoStats:
    """A replica object that lacks what Ray's replicas have."""

    def __init__(self, replica_id):
        self.replica_id = replica_id


def test_one_unreadable_replica_leaves_the_others_membership_recorded(tmp_path):
    sink, exporter = sink_and_exporter(tmp_path)
    faults_before = faults.total

    async def main():
        router = make_router(TracedScriptedRouter, 3, router_kwargs={"jsonl_path": sink}, exporter=exporter)
        replicas = sorted(router._replicas_list, key=lambda r: r.replica_id.unique_id)
        router.update_replicas([*replicas[:2], NoStats(replicas[2].replica_id)])

    asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    memberships = [[m["replica_id"] for m in e["replicas"]] for e in events if e["type"] == "replicas"]
    assert memberships == [["replica000", "replica001", "replica002"], ["replica000", "replica001"]]
    assert faults.total == faults_before + 1


class NeverFinds(RequestRouter):
    """Ranks nothing: a request backs off until it is cancelled."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        pending_request.routing_context.should_backoff = True  # as Ray's routers say when every tier failed
        return []


class TracedNeverFinds(TracingMixin, NeverFinds):
    pass


@pytest.mark.parametrize("sample_rate", [1.0, 0.000001])
def test_requests_cancelled_while_backing_off_leave_no_decisions_behind(tmp_path, sample_rate):
    """20 requests back off through hundreds of decisions, then are
    cancelled: the tracer keeps no decision but its routing tasks' latest
    (and none of a finished task's once it makes room), and every decision
    is accounted for."""
    sink = str(tmp_path / "events.jsonl")
    kwargs = {"jsonl_path": sink, "sample_rate": sample_rate}
    exporter = Exporter(TracerConfig(flush_interval_s=0.1, **kwargs))

    async def main():
        router = make_router(TracedNeverFinds, 2, router_kwargs=kwargs, exporter=exporter)
        router.initial_backoff_s = router.max_backoff_s = 0.0005  # as Ray backs off, but quicker
        tracer = router._routelens
        requests = [make_request() for _ in range(20)]
        waiting = [asyncio.ensure_future(router._choose_replica_for_request(pr)) for pr in requests]
        def made() -> int:  # Ray routes 4 of them at a time (two tasks a replica)
            return sum(pr._routelens.decisions for pr in requests if hasattr(pr, "_routelens"))

        while made() < 400:
            await asyncio.sleep(0.005)
        for future in waiting:
            future.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await asyncio.sleep(0.01)  # the routing tasks end
        total = made()
        requests.clear()  # the requests go, as Ray lets them go
        waiting.clear()
        assert exporter.flush(10)  # the queue holds the decisions it has not exported yet
        gc.collect()
        alive = [o for o in gc.get_objects() if isinstance(o, list) and len(o) == records.D_ID + 1
                 and o[records.KIND] == records.DECISION and o[records.SOURCE] is tracer.source]
        assert len(alive) <= len(tracer._decision_by_task) <= decisions.MAX_KEPT_TASKS
        return tracer.source, total

    source, made = asyncio.run(main())
    assert exporter.flush(10)
    events, _ = exported_events(sink)
    produced, dropped = source.counters()
    stored = [e for e in events if e["type"] == "decision"]
    assert produced == len(events) + sum(dropped.values())
    if sample_rate == 1.0:
        assert len(stored) == made and dropped == {}
    else:
        assert stored == [] and dropped == {"sampled_out": made}
