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
from typing import Dict, Optional


@dataclass(frozen=True)
class Mode:
    """A replay mode: its module has `replay(conn, filters, router_spec, seed, on_progress, **options)`,
    returning a JSON-serializable result, and is imported only when the mode runs (it imports Ray, which
    the collector never does)."""
    module: str
    unit: str  # what on_progress counts
    counted: str  # the rollups' count of it in a window ("decisions", "routed"), for the progress bar's total
    options: Dict[str, Optional[int]]  # the command's options it takes, and their defaults (others' are refused)


DEFAULT_RUNS = 5  # decisions mode: runs of a randomized router

MODES = {
    "decisions": Mode("routelens.collector.replay.decisions", "decisions", "decisions", {"runs": DEFAULT_RUNS}),
    "simulate": Mode("routelens.collector.replay.simulate", "requests", "routed", {"max_ongoing_requests": None}),
}
