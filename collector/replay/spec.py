"""Which router a replay runs: `RouterSpec`, "package.module:Class" and its
`request_router_kwargs` (JSON), imported in the command's process only;
and how both modes build it where a recorded router ran (`build_router`)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

if TYPE_CHECKING:
    from .recorded import SourceInfo


class ReplayError(ValueError):
    """A replay that cannot be made as asked (the router, its kwargs, the
    window); the message says why in one line."""


@dataclass(frozen=True)
class RouterSpec:
    """A RequestRouter subclass by import path ("package.module:Class", or
    "package.module.Class" as the tracer records router classes), and the
    `request_router_kwargs` its `initialize_state` is given."""

    path: str
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, path: str, kwargs_json: str = "") -> "RouterSpec":
        """From the command line's values; raises ReplayError on a malformed path or kwargs."""
        module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
        if not module or not name:
            raise ReplayError(f"--router: expected package.module:Class, got {path!r}")
        kwargs: Any = {}
        if kwargs_json.strip():
            try:
                kwargs = json.loads(kwargs_json)
            except ValueError as exc:
                raise ReplayError(f"--kwargs: not JSON: {exc}") from None
            if not isinstance(kwargs, dict):
                raise ReplayError(f"--kwargs: expected a JSON object (the router's request_router_kwargs), "
                                  f"got {type(kwargs).__name__}")
        return cls(path, kwargs)

    def load(self) -> type:
        """The class, imported here (the current directory first on the path,
        as for `python -m`), and built once as a replay builds it (with
        `kwargs`). Raises ReplayError if it cannot be imported, is not a
        concrete RequestRouter or cannot be built; ModuleNotFoundError (name
        "ray") without Ray."""
        from ray.serve.request_router import RequestRouter  # Ray: the caller says what to install without it

        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        found = _import(self.path)
        if not (inspect.isclass(found) and issubclass(found, RequestRouter)):
            raise ReplayError(f"{self.path} is not a RequestRouter subclass (ray.serve.request_router)")
        if inspect.isabstract(found):
            raise ReplayError(f"{self.path} is abstract: it does not implement "
                              f"{', '.join(sorted(found.__abstractmethods__))}")

        async def build() -> None:
            build_router(found, self.kwargs)

        try:
            asyncio.run(build())
        except Exception as exc:  # its constructor or initialize_state: the user's to fix
            raise ReplayError(f"{self.path} cannot be built with kwargs {self.kwargs}: "
                              f"{type(exc).__name__}: {exc}") from None
        return found


def build_router(cls: type, kwargs: Dict[str, Any], app: str = "replay", deployment: str = "replay",
                 source: Optional["SourceInfo"] = None, members: Sequence[Any] = (),
                 clock: Optional[Callable[[], float]] = None) -> Any:
    """A router of `cls`, initialized with `kwargs`, as Ray builds it in the
    process of the recorded `source` (on the offline harness, no replicas
    yet): on its node, in the zone of the `members` (objects with `node_id`
    and `availability_zone`) on that node, a proxy's preferring its own
    node; a traced class has its tracer off (it records and ships nothing).
    `clock`: the router's time (its queue-length cache's), Ray's wall
    clock by default. Called inside an event loop, as Ray builds routers.

    It never probes replicas (Ray's `_probe_queue_lens`, which update_replicas
    starts for new replicas, answers nothing): decisions mode gives its
    queue-length cache the recorded lengths, simulate mode models probes on
    its own clock."""
    from routelens.routers.testing import make_router  # imports Ray: only when a replay runs

    node = source.node_id if source is not None else None
    zone = next((m.availability_zone for m in members if node is not None and m.node_id == node), None)
    init: Dict[str, Any] = {"self_node_id": node, "self_availability_zone": zone,
                            "prefer_local_node_routing": source is not None and source.handle_source == "PROXY",
                            "prefer_local_az_routing": True}
    if clock is not None:
        init["get_curr_time_s"] = clock
    router = make_router(cls, 0, deployment=deployment, app=app, router_kwargs=kwargs, traced=False,
                         router_init=init)
    router._probe_queue_lens = _no_probe
    return router


async def _no_probe(replicas: Any, backoff_index: int) -> list:
    return []


def _import(path: str) -> Any:
    """What "module:Qual.Name" names, or "module.Qual.Name" (the longest module that imports)."""
    if ":" in path:
        module, _, qualname = path.partition(":")
        cuts = [(module, qualname)]
    else:
        parts = path.split(".")
        cuts = [(".".join(parts[:cut]), ".".join(parts[cut:])) for cut in range(len(parts) - 1, 0, -1)]
    problem = None
    for module_name, qualname in cuts:
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == "ray" or (exc.name or "").startswith("ray."):
                raise
            if exc.name is not None and module_name.startswith(exc.name):  # this cut names no module: a shorter one
                problem = problem or f"cannot import {module_name}: {exc}"
                continue
            raise ReplayError(f"cannot import {module_name}: {exc}") from None
        except Exception as exc:  # the module itself fails on import
            raise ReplayError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
        for part in qualname.split("."):
            found = getattr(found, part, None)
            if found is None:
                problem = problem or f"{module_name} has no {qualname}"
                break
        else:
            return found
    raise ReplayError(problem)
