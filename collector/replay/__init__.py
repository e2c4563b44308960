"""Replay: recorded traffic through another request router, offline, in the CLI process.

`routelens replay` rebuilds each recorded decision's candidates with the
inputs they had (`collector.replay.recorded`, which reads a window's
decisions in chunks, as the export does) and gives them to a router the
user names (`collector.replay.spec.RouterSpec`), on the offline harness
(`routelens.routers.testing`). The collector never runs user code: replays
are made by the command only, and their results stored
(`collector.store.replays`) for the read API to serve. docs/replay.md.

Each mode is a module and a function, called as
`function(conn, filters, router_spec, seed, on_progress, **options)` and
returning a JSON-serializable result; the module is imported only when its
mode runs (it may import Ray, which the collector never does). `--mode`
offers exactly these.
"""

from __future__ import annotations

MODES = {
    "decisions": ("routelens.collector.replay.decisions", "replay"),
}
