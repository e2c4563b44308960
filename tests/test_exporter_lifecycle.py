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
        from routers.examples import TracedUniformRequestRouter
        from routers.offline import make_request, make_router

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
    """After fork the child gets a fresh exporter: its events, not the parent's queue."""
    sink = tmp_path / "events-{pid}.jsonl"
    done = run_script(f"""
        import asyncio, os, sys
        from routers.examples import TracedUniformRequestRouter
        from routers.exporter import get_exporter
        from routers.config import TracerConfig
        from routers.offline import make_request, make_router

        kwargs = {{"jsonl_path": {str(sink)!r}, "flush_interval_s": 3600}}

        async def decide(n):
            router = make_router(TracedUniformRequestRouter, 4, router_kwargs=kwargs)
            for _ in range(n):
                await router.choose_replicas(router._replicas_list, make_request())

        asyncio.run(decide(3))  # queued in the parent, not yet exported
        pid = os.fork()
        if pid == 0:
            asyncio.run(decide(5))
            get_exporter(TracerConfig()).flush(10)
            os._exit(0)
        os.waitpid(pid, 0)
        print(pid)
    """)
    assert done.returncode == 0, done.stderr
    child = int(done.stdout.split()[-1])
    files = {p.name: [e for b in lines(p) for e in b["events"]] for p in tmp_path.glob("events-*.jsonl")}
    child_events = files.pop(f"events-{child}.jsonl")
    assert sum(e["type"] == "decision" for e in child_events) == 5
    [parent_events] = files.values()
    assert sum(e["type"] == "decision" for e in parent_events) == 3
