"""Windows and filters from the values a user types (query string, command
line): parsed and checked once, for the API, the dashboard and the CLI."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import List, Optional, Tuple

from ..settings import parse_duration
from ..store import times

DEFAULT_WINDOW = "1h"
MINUTE = 60


@dataclass(frozen=True)
class Filters:
    """What to look at: a window [since, until) in epoch seconds, and narrowing filters.

    Empty tuples mean "all". `labels` pairs must all hold (AND); several
    values of one other filter are alternatives (OR). Like `request_id` and
    `model_id`, `reasons` (the routers' own, `routelens_explain`) narrows
    what reads decisions: the drill-down, the decisions and candidates
    exports, the per-reason figures, prefix affinity and the live tail; the
    other panels count every decision.
    """

    since: float
    until: float
    apps: Tuple[str, ...] = ()
    deployments: Tuple[str, ...] = ()
    router_classes: Tuple[str, ...] = ()
    labels: Tuple[Tuple[str, str], ...] = ()
    replicas: Tuple[str, ...] = ()
    request_id: Optional[str] = None
    model_id: Optional[str] = None
    reasons: Tuple[str, ...] = ()

    @property
    def seconds(self) -> float:
        return max(self.until - self.since, 0.0)

    def rollup_bounds(self) -> Tuple[int, int]:
        """The window widened to whole minutes: what the panels cover."""
        return int(math.floor(self.since / MINUTE) * MINUTE), int(math.ceil(self.until / MINUTE) * MINUTE)


class FilterError(ValueError):
    """A window or filter value that cannot be used; the message names it."""


def parse_time(name: str, value: str) -> float:
    """Epoch seconds, or ISO-8601 (UTC unless it says otherwise), in the range
    of times routelens accepts (`store.times`). Beyond it (or NaN), a window
    could not be shown as dates, nor turned into bounds the database can compare."""
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise FilterError(f"{name}: not a time: {value!r} (epoch seconds or ISO-8601)") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        seconds = parsed.timestamp()
    if not 0 <= seconds <= times.END:
        raise FilterError(f"{name}: {value!r} is out of range (1970 to 9999-12-31T23:59:59Z, "
                          f"epoch second {times.END:.0f})")
    return seconds


def parse_label(value: str):
    key, sep, label_value = value.partition("=")
    if not sep or not key:
        raise FilterError(f"label: expected key=value, got {value!r}")
    return key, label_value


def build_filters(window: Optional[str] = None, since: Optional[str] = None, until: Optional[str] = None,
                  app: List[str] = (), deployment: List[str] = (), router_class: List[str] = (),
                  label: List[str] = (), replica: List[str] = (), request_id: Optional[str] = None,
                  model_id: Optional[str] = None, reason: List[str] = (), now: Optional[float] = None) -> Filters:
    """Filters from query-string values; raises FilterError on bad input.
    Shared by the API, the dashboard and the command line."""
    now = time.time() if now is None else now
    end = parse_time("until", until) if until else now
    if since:
        start = parse_time("since", since)
    else:
        try:
            # A window reaching back before 1970 holds what a window from 1970 does.
            start = max(end - parse_duration(window or DEFAULT_WINDOW), 0.0)
        except ValueError as exc:
            raise FilterError(f"window: {exc}") from None
    if start >= end:
        raise FilterError("since must be before until")
    named = {"app": app, "deployment": deployment, "router_class": router_class, "label": label,
             "replica": replica, "request_id": [request_id or ""], "model_id": [model_id or ""], "reason": reason}
    for name, values in named.items():
        # No stored name holds one (ingest refuses them), and PostgreSQL cannot even compare one.
        if any("\x00" in value for value in values):
            raise FilterError(f"{name}: NUL characters are not accepted")
    return Filters(
        since=start, until=end, apps=tuple(app), deployments=tuple(deployment),
        router_classes=tuple(router_class), labels=tuple(parse_label(v) for v in label),
        replicas=tuple(replica), request_id=request_id or None, model_id=model_id or None, reasons=tuple(reason),
    )
