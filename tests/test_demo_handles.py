"""`routelens demo` starts the routers of its handle-only apps before the traffic through Ray's
public handle API; on a Ray whose `DeploymentHandle.options()` no longer starts the router, it
says so and goes on without waiting for those apps' replicas (tests/test_demo.py runs the pinned
Ray's case, where no such line is printed)."""

from __future__ import annotations

import io

from ray.serve.handle import DeploymentHandle
from rich.console import Console

from routelens.collector.demo.apps import APPS
from routelens.collector.demo.run import _start_handle_routers


class LazyHandle(DeploymentHandle):
    """What a Ray upgrade could look like: options() no longer starts the handle's router."""

    def options(self, **kwargs):
        return self


def test_a_ray_that_starts_a_handles_router_only_at_its_first_request_is_named_and_not_waited_for():
    handle_only = [app for app in APPS if not app.http]
    assert handle_only  # the demo has some: the case is real
    handles = {app.name: LazyHandle(app.deployment.name, app.name) for app in handle_only}
    out = io.StringIO()
    reporting = _start_handle_routers(handles, APPS, Console(file=out, width=200))
    assert reporting == [app for app in APPS if app.http]
    for app in handle_only:
        assert f"{app.name}: this Ray starts a handle's router only at its first request" in out.getvalue()
        assert not handles[app.name].is_initialized  # nothing was started behind its back
