"""Collector settings, the duration syntax the command line and the API share, and the Host names
the command line takes."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

DEFAULT_DB = "sqlite:///routelens.db"
# How long the batches that live readers of GET /v1/tail follow are kept (`stored_batches`): the most a
# reader may fall behind.
STORED_BATCHES_KEEP_S = 600.0
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")


def parse_duration(text: str) -> float:
    """'90s', '15m', '24h', '7d', '2w' -> seconds. Raises ValueError."""
    match = _DURATION.match(text or "")
    if not match:
        raise ValueError(f"not a duration: {text!r} (use a number and a unit: 90s, 15m, 24h, 7d, 2w)")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"a duration must be positive: {text!r}")
    return seconds


def parse_allowed_host(text: str) -> str:
    """A Host name to serve without a token: a name, an IP address, or
    `*.example.com` (any name under it); lowercased. Raises ValueError."""
    host = text.strip().lower()
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    name = host[2:] if host.startswith("*.") else host
    if not _HOST_NAME.match(name):
        raise ValueError(f"not a host name: {text!r} (a name or address without port, or *.example.com)")
    return host


@dataclass(frozen=True)
class Settings:
    db_url: str = DEFAULT_DB
    token: Optional[str] = None  # required as "Authorization: Bearer <token>" when set
    # The dashboard's sign-in (with a token): how long a session cookie is good for.
    session_lifetime_s: int = 12 * 3600
    # Without a token, only requests naming this machine in their Host header
    # are served (against DNS rebinding): localhost, 127.0.0.1, ::1, the
    # address listened on, and these names.
    listen_host: str = "127.0.0.1"
    allowed_hosts: Tuple[str, ...] = ()
    # Ingest limits. The body limit holds for the body as sent and, for gzip,
    # for the JSON it inflates to (checked while inflating).
    max_body_bytes: int = 32 * 1024 * 1024
    max_events_per_batch: int = 20_000
    # Exports streaming at once (GET /v1/export), per process; more get 503 at once. Each holds a database
    # connection of its own, outside the pool that ingest and the read API use, for as long as its client
    # takes to read it (and, on SQLite, a read snapshot: docs/collector.md, "Limits").
    max_exports: int = 4
    # Retention: raw events, then the per-minute rollups. Hourly rollups are kept.
    retention_s: Optional[float] = 7 * 86400
    minute_rollup_retention_s: Optional[float] = 90 * 86400
    retention_interval_s: float = 300.0
    # /metrics: the routing KPIs counted at ingest (collector.api.routing_metrics), and how many replicas
    # and sources get series of their own in each process (the rest share the label value `_other`).
    routing_metrics: bool = True
    metrics_replica_limit: int = 2000
    metrics_source_limit: int = 2000
    # GET /v1/tail: how far behind the newest batch stored a live reader may fall (or resume) before it
    # skips to the newest, told how many events it missed; at most STORED_BATCHES_KEEP_S.
    tail_max_behind_s: float = 60.0
    # Set in the worker processes of `--workers N`: the directory where they
    # all keep their metrics, summed at each scrape (prometheus-client's
    # multiprocess mode). None: this process's metrics alone.
    metrics_dir: Optional[str] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Settings":
        fields = json.loads(text)
        fields["allowed_hosts"] = tuple(fields.get("allowed_hosts", ()))  # JSON has lists, not tuples
        return cls(**fields)
