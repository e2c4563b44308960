"""Tracer configuration: `request_router_kwargs` first, `ROUTELENS_*` second.

Ray delivers `request_router_kwargs` once, to `initialize_state`. Proxies have
no runtime_env of their own, so a cluster-wide setting usually arrives as an
environment variable instead; both are read here, kwargs winning.

Parsing never raises: a bad value is reported in `TracerConfig.problems` and
replaced by its default, because an exception in `initialize_state` would
freeze replica updates for the whole process.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Tuple

ENV_PREFIX = "ROUTELENS_"


def default_spool_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "routelens", "spool")


def default_jsonl_path() -> str:
    return os.path.join(tempfile.gettempdir(), "routelens", "events-{hostname}-{pid}.jsonl")


@dataclasses.dataclass(frozen=True)
class TracerConfig:
    """What one traced router is told. Keys map 1:1 to kwargs and env vars."""

    # Where batches go. Empty: the JSON Lines sink at `jsonl_path`.
    collector_url: str = ""
    token: str = ""
    # Share of requests traced, decided per request from its internal id.
    sample_rate: float = 1.0
    spool_dir: str = dataclasses.field(default_factory=default_spool_dir)
    labels: Dict[str, str] = dataclasses.field(default_factory=dict)
    # `{pid}` and `{hostname}` are expanded, so processes never share a file.
    jsonl_path: str = dataclasses.field(default_factory=default_jsonl_path)
    # Process-wide exporter settings; the first traced router of a process sets them.
    queue_max_events: int = 20_000
    batch_max_events: int = 1_000
    flush_interval_s: float = 1.0
    spool_max_bytes: int = 256 * 1024 * 1024
    http_timeout_s: float = 5.0
    # Problems found while parsing, logged once by the tracer.
    problems: Tuple[str, ...] = ()

    @property
    def destination_key(self) -> Tuple[str, ...]:
        if self.collector_url:
            return ("http", self.collector_url, self.token, self.spool_dir)
        return ("jsonl", self.jsonl_path)


_FIELDS = {f.name: f for f in dataclasses.fields(TracerConfig) if f.name != "problems"}
OWN_KEYS = frozenset(_FIELDS)


def _parse_labels(value: Any) -> Dict[str, str]:
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            value = json.loads(text)
        else:
            pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("expected k=v pairs separated by commas, or a JSON object")
            value = {k.strip(): v.strip() for k, v in pairs}
    if not isinstance(value, Mapping):
        raise ValueError("expected a mapping of str to str")
    return {str(k): str(v) for k, v in value.items()}


def _coerce(name: str, value: Any) -> Any:
    if name == "labels":
        return _parse_labels(value)
    if name == "collector_url":
        url = str(value).strip()
        if url:
            parsed = urllib.parse.urlsplit(url)
            parsed.port  # raises ValueError for a port out of range or not a number
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError("expected http(s)://host[:port]")
        return url
    if name == "token":
        token = str(value)
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError("must not contain whitespace or control characters")
        return token
    if name == "jsonl_path":
        path = str(value)
        path.format(pid=0, hostname="h")  # only {pid} and {hostname} may be expanded
        return path
    default = _FIELDS[name].default
    if default is dataclasses.MISSING or isinstance(default, str):
        return str(value)
    number = float(value)  # OverflowError for ints beyond float range, caught by the caller
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    if name == "sample_rate":
        if not 0.0 <= number <= 1.0:
            raise ValueError("must be between 0 and 1")
        return number
    if number <= 0:
        raise ValueError("must be positive")
    return int(value) if isinstance(default, int) else number


def load_config(
    router_kwargs: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None
) -> Tuple[TracerConfig, Dict[str, Any]]:
    """Split `request_router_kwargs` into the tracer's config and the rest.

    Returns the config and the kwargs that belong to the wrapped router.
    """
    environ = os.environ if environ is None else environ
    values: Dict[str, Any] = {}
    problems: List[str] = []
    for name in _FIELDS:
        if name in router_kwargs:
            raw, origin = router_kwargs[name], f"request_router_kwargs[{name!r}]"
        elif ENV_PREFIX + name.upper() in environ:
            raw, origin = environ[ENV_PREFIX + name.upper()], ENV_PREFIX + name.upper()
        else:
            continue
        try:
            values[name] = _coerce(name, raw)
        except (TypeError, ValueError, OverflowError, KeyError, IndexError) as exc:
            problems.append(f"{origin}={raw!r} ignored: {exc}")
    return TracerConfig(problems=tuple(problems), **values), passthrough_kwargs(router_kwargs)


def passthrough_kwargs(router_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """The `request_router_kwargs` that belong to the wrapped router."""
    return {k: v for k, v in router_kwargs.items() if k not in OWN_KEYS}
