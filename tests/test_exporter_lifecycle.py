"""The process-wide exporter at interpreter exit and across fork."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def run_script(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_events_are_flushed_at_interpreter_exit(tmp_path):
    """With an hour-long flush interval, only the exit hook can deliver them."""
    sink = tmp_path / "events.jsonl"
    done = run_script(f"""
        import asyncio
        from routelens.routers.examples import TracedUniformRequestRouter
        from routelens.routers.testing import make_request, make_router

        async def main():
            router = make_router(TracedUniformRequestRouter, 4,
                                 router_kwargs={{"jsonl_path": {str(sink)!r}, "flush_interval_s": 3600}})
            for _ in range(25):
                await router.choose_replicas(router._replicas_list, make_request())

        asyncio.run(main())
    """)
    assert done.returncode == 0, done.stderr
    events = [e for b in lines(sink) for e in b["events"]]
    assert sum(e["type"] == "decision" for e in events) == 25


def test_a_forked_child_exports_its_own_events_only(tmp_path):
    """After fork, a router made before it keeps tracing in the child, under a
    new source; the parent's queued events stay the parent's."""
    sink = tmp_path / "events-{pid}.jsonl"
    done = run_script(f"""
        import asyncio, os
        from routelens.routers.testing import make_request, make_router
        from routelens.routers.examples import TracedUniformRequestRouter

        kwargs = {{"jsonl_path": {str(sink)!r}, "flush_interval_s": 3600}}

        async def decide(router, n):
            for _ in range(n):
                await router.choose_replicas(router._replicas_list, make_request())

        async def main():
            router = make_router(TracedUniformRequestRouter, 4, router_kwargs=kwargs)
            await decide(router, 3)  # queued in the parent, not yet exported
            pid = os.fork()
            if pid == 0:
                await decide(router, 5)
                router._routelens.exporter.flush(10)
                os._exit(0)
            os.waitpid(pid, 0)
            print(pid)

        asyncio.run(main())
    """)
    assert done.returncode == 0, done.stderr
    child = int(done.stdout.split()[-1])
    files = {p.name: lines(p) for p in tmp_path.glob("events-*.jsonl")}
    child_batches = files.pop(f"events-{child}.jsonl")
    [parent_batches] = files.values()
    child_events = [e for b in child_batches for e in b["events"]]
    parent_events = [e for b in parent_batches for e in b["events"]]
    assert sum(e["type"] == "decision" for e in child_events) == 5
    assert sum(e["type"] == "decision" for e in parent_events) == 3
    child_sources = {b["source"]["source_id"] for b in child_batches}
    parent_sources = {b["source"]["source_id"] for b in parent_batches}
    assert child_sources.isdisjoint(parent_sources)
    assert {b["source"]["pid"] for b in child_batches} == {child}


def test_a_spool_left_at_exit_is_replayed_by_the_next_process(tmp_path):
    """Collector down at exit: the batches wait on disk; the next process on
    this host adopts that spool and delivers them, oldest first."""
    from tests.support.event_sink_server import EventSinkServer
    from tests.support.ports import free_port

    port = free_port()
    script = """
        import asyncio
        from routelens.routers.examples import TracedUniformRequestRouter
        from routelens.routers.testing import make_request, make_router

        async def main():
            router = make_router(TracedUniformRequestRouter, 4, app={app!r}, router_kwargs={{
                "collector_url": "http://127.0.0.1:{port}", "spool_dir": {spool!r}, "flush_interval_s": 3600}})
            for _ in range({n}):
                await router.choose_replicas(router._replicas_list, make_request())
            router._routelens.exporter.flush(5)

        asyncio.run(main())
    """
    first = run_script(script.format(app="first", port=port, spool=str(tmp_path), n=7))
    assert first.returncode == 0, first.stderr
    [left] = list(tmp_path.glob("collector-*/*"))
    assert list(left.glob("*.jsonl")), "the undelivered batches must be on disk"

    server = EventSinkServer(port)
    try:
        second = run_script(script.format(app="second", port=port, spool=str(tmp_path), n=2))
        assert second.returncode == 0, second.stderr
        decisions = lambda app: sum(e["type"] == "decision" for e in server.events(app=app).values())
        assert decisions("first") == 7 and decisions("second") == 2
        assert server.batches[0]["source"]["app"] == "first"  # the old spool went first
        assert not any(tmp_path.rglob("*.jsonl"))
    finally:
        server.stop()


def test_a_spool_for_another_collector_is_left_alone(tmp_path):
    """Batches spooled for one collector never go to another one."""
    from tests.support.event_sink_server import EventSinkServer
    from tests.support.ports import free_port

    script = """
        import asyncio
        from routelens.routers.examples import TracedUniformRequestRouter
        from routelens.routers.testing import make_request, make_router

        async def main():
            router = make_router(TracedUniformRequestRouter, 4, app={app!r}, router_kwargs={{
                "collector_url": "http://127.0.0.1:{port}", "spool_dir": {spool!r}, "flush_interval_s": 3600}})
            for _ in range(3):
                await router.choose_replicas(router._replicas_list, make_request())
            router._routelens.exporter.flush(5)

        asyncio.run(main())
    """
    down, up = free_port(), free_port()
    first = run_script(script.format(app="first", port=down, spool=str(tmp_path)))
    assert first.returncode == 0, first.stderr
    spooled = sorted(p.name for p in tmp_path.rglob("*.jsonl"))
    assert spooled
    server = EventSinkServer(up)
    try:
        second = run_script(script.format(app="second", port=up, spool=str(tmp_path)))
        assert second.returncode == 0, second.stderr
        assert {b["source"]["app"] for b in server.batches} == {"second"}
        assert sorted(p.name for p in tmp_path.rglob("*.jsonl")) == spooled
    finally:
        server.stop()
