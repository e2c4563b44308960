"""Refusing a replayed router's calls to a Ray cluster.

A replay runs routers in the command's process, offline: there is no
cluster, and the recorded answers of actors a router called (Ray's
prefix-aware router asks a prefix-tree actor from `initialize_state`,
`update_replicas` and `choose_replicas`) are not in the record. Left
alone, such a call would start a local Ray instance (Ray initializes
itself on first use), connect to the one RAY_ADDRESS names (and change a
live actor's state with replayed requests), or wait for an answer that
never comes.

Every call that needs a cluster passes through one of two places, whatever
the API (`ray.get`, `ray.wait`, `ray.put`, `ray.get_actor`, `ray.kill`,
creating an actor, calling an actor's method, a task, a placement group):
Ray's `auto_init_ray`, which each of them calls first to initialize Ray on
first use (and calls whether or not Ray is initialized), or an explicit
`ray.init`. While a replay runs, both raise `ClusterCallRefused`, naming
the router and what it called, before anything reaches a cluster. A router
that catches the error and goes on is refused all the same: the first
refusal is kept, and raised by `check` (the modes call it between batches)
and when the replay ends. Calls from other threads than the replay's (Ray's
own, in a process connected to Ray) go through.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from .spec import ReplayError


class ClusterCallRefused(ReplayError):
    """A replayed router called something that needs a Ray cluster."""


class ClusterGuard:
    """The refusal a replay's routers met, if any (the first one)."""

    def __init__(self) -> None:
        self.refused: Optional[ClusterCallRefused] = None

    def check(self) -> None:
        """Raises the refusal, if a router met one (and perhaps caught it)."""
        if self.refused is not None:
            raise self.refused

    def clear(self) -> None:
        """Forgets the refusal: the replay left the router that met it out (simulate mode, the recorded router)."""
        self.refused = None

    def refuse(self, what: str) -> None:
        if self.refused is None:
            router, method = _calling_router(sys._getframe(1))
            self.refused = ClusterCallRefused(
                f"{router} cannot be replayed: {method} called {what}, which needs a Ray cluster; a replay runs "
                "the router in this process, without one (docs/replay.md, \"What cannot be replayed\")")
        raise self.refused


@contextmanager
def refusing_cluster_calls() -> Iterator[ClusterGuard]:
    """Within: every call a router makes that needs a Ray cluster raises ClusterCallRefused;
    a refusal met (and caught by the router) is raised on the way out."""
    import ray  # imported when a replay runs, as the modes import it (tests/test_packaging.py)
    from ray._private import auto_init_hook

    guard = ClusterGuard()
    real_auto_init = auto_init_hook.auto_init_ray
    real_init = ray.init
    # The replay's routers run in this thread. Other threads' calls go through: in a process that is
    # connected to Ray (a test run, a notebook), Ray's own threads (handles' long polls) keep working.
    replaying = threading.get_ident()

    def refused_auto_init() -> None:
        if threading.get_ident() != replaying:
            return real_auto_init()
        # Called by Ray's auto_init_wrapper: its `fn` is the API the router called, `args[0]` its object.
        caller = sys._getframe(1).f_locals
        guard.refuse(_api_name(caller.get("fn"), caller.get("args") or ()))

    def refused_init(*args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() != replaying:
            return real_init(*args, **kwargs)
        guard.refuse("ray.init")

    # The modules that bound auto_init_ray by name (client_mode_hook, placement_group) get the refusal too.
    bound = [module for name, module in list(sys.modules.items())
             if (name == "ray" or name.startswith("ray.")) and getattr(module, "auto_init_ray", None) is real_auto_init]
    for module in bound:
        module.auto_init_ray = refused_auto_init
    ray.init = refused_init
    try:
        yield guard
    except Exception:
        guard.check()  # the refusal, rather than what a router that caught it did next
        raise
    else:
        guard.check()
    finally:
        for module in bound:
            module.auto_init_ray = real_auto_init
        ray.init = real_init


def _api_name(fn: Any, args: tuple) -> str:
    """What the router called, as it wrote it."""
    qualname = getattr(fn, "__qualname__", "")
    target = args[0] if args else None
    if qualname.startswith("ActorClass."):
        return f"{getattr(getattr(target, '__ray_metadata__', None), 'class_name', 'an actor class')}.remote() " \
               "(creating an actor)"
    if qualname.startswith("ActorMethod."):
        return f"{getattr(target, '_method_name', 'a method')}.remote() (an actor's method)"
    if qualname.startswith("RemoteFunction."):
        return f"{getattr(target, '_function_name', 'a function')}.remote() (a task)"
    return f"ray.{fn.__name__}" if hasattr(fn, "__name__") else "a Ray API"


def _calling_router(frame: Any) -> tuple:
    """The router whose code made the call (the innermost frame of a RequestRouter's method), and
    that method; without one, the innermost function outside Ray."""
    from ray.serve.request_router import RequestRouter

    outside = None
    while frame is not None:
        code = frame.f_code
        method = getattr(code, "co_qualname", code.co_name)
        if isinstance(frame.f_locals.get("self"), RequestRouter):
            return type(frame.f_locals["self"]).__name__, method
        module = frame.f_globals.get("__name__", "")
        if outside is None and module != __name__ and module != "ray" and not module.startswith("ray."):
            outside = method
        frame = frame.f_back
    return "the router", outside or "it"
