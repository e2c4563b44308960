"""Which router a replay runs: `RouterSpec`, "package.module:Class" and its
`request_router_kwargs` (JSON), imported in the command's process only."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict


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
        module, _, name = _split(path)
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
        return cls(f"{module}:{name}", kwargs)

    def load(self) -> type:
        """The class, imported here (the current directory first on the path,
        as for `python -m`). Raises ReplayError if it cannot be imported or
        is not a concrete RequestRouter; ModuleNotFoundError (name "ray")
        without Ray."""
        from ray.serve.request_router import RequestRouter  # Ray: the caller says what to install without it

        module_name, _, qualname = _split(self.path)
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == "ray" or (exc.name or "").startswith("ray."):
                raise
            raise ReplayError(f"cannot import {module_name}: {exc}") from None
        except Exception as exc:  # the module itself fails on import
            raise ReplayError(f"cannot import {module_name}: {type(exc).__name__}: {exc}") from None
        for part in qualname.split("."):
            found = getattr(found, part, None)
            if found is None:
                raise ReplayError(f"{module_name} has no {qualname}")
        if not (inspect.isclass(found) and issubclass(found, RequestRouter)):
            raise ReplayError(f"{self.path} is not a RequestRouter subclass (ray.serve.request_router)")
        if inspect.isabstract(found):
            raise ReplayError(f"{self.path} is abstract: it does not implement "
                              f"{', '.join(sorted(found.__abstractmethods__))}")
        return found


def _split(path: str):
    """(module, ":", qualname) of "module:Qual.Name", or of "module.Name" (the last dot)."""
    if ":" in path:
        return path.partition(":")
    return path.rpartition(".")
