"""Replay: recorded traffic through another request router, offline, in the CLI process.

`routelens replay` gives a window's recorded traffic to a router the user
names (`collector.replay.spec.RouterSpec`), on the offline harness
(`routelens.routers.testing`), in one of two modes:

- decisions: each recorded decision's candidates, rebuilt with the inputs
  they had (`collector.replay.recorded`, which reads a window's decisions
  in chunks, as the export does), given to the router;
- simulate: the recorded requests, closed loop, through a simulated
  deployment driven by the recorded router and by the given one
  (`collector.replay.simulation_inputs` reads what it needs).

The collector never runs user code: replays are made by the command only,
and their results stored (`collector.store.replays`) for the read API to
serve. docs/replay.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Mode:
    """A replay mode: its module has `replay(conn, filters, router_spec, seed, on_progress, **options)`,
    returning a JSON-serializable result, and is imported only when the mode runs (it imports Ray, which
    the collector never does)."""
    module: str
    counts: str  # what on_progress counts, as the rollups count it: "decisions" or "routed" (requests)
    options: Tuple[str, ...]  # the command's options it takes (the others' are refused)


DEFAULT_RUNS = 5  # decisions mode: runs of a randomized router

MODES = {
    "decisions": Mode("routelens.collector.replay.decisions", "decisions", ("runs",)),
    "simulate": Mode("routelens.collector.replay.simulate", "routed", ("max_ongoing_requests",)),
}
