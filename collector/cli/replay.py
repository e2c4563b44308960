"""`routelens replay`: a window's recorded decisions through another router, in this process; the result stored.

The mode's module (`collector.replay.MODES`) is imported only here, when a
replay runs: it imports Ray, which the rest of the collector never does.
Bad input (a class that cannot be imported or is no RequestRouter, kwargs
that are not a JSON object, a router that cannot be built, an empty window)
is one line and exit status 2, with nothing stored.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
from typing import Callable, Dict, Optional

from rich import box
from rich.console import Console
from rich.table import Table

from ..replay import MODES
from ..replay.spec import ReplayError, RouterSpec
from ..store import replays
from ..store.db import check_schema, make_engine
from .errors import UsageError
from .files import expected_rows, filters_of, progress

NO_RAY = ('replay runs the router in this process, which needs Ray: pip install "ray[serve]>=2.60,<2.61" '
          "(or pip install routelens, which brings it)")


def run_replay(args) -> int:
    f = filters_of(args)
    try:
        spec = RouterSpec.parse(args.router, args.kwargs)
    except ReplayError as exc:
        raise UsageError(str(exc)) from None
    module, name = MODES[args.mode]
    with _ray_needed():
        run = getattr(importlib.import_module(module), name)
    options = {"runs": args.runs} if "runs" in inspect.signature(run).parameters else {}
    engine = make_engine(args.db, sqlite_cache_mb=8)
    try:
        check_schema(engine, args.db)
        with engine.connect() as connection, _ray_needed(), \
                progress(f"replaying through {spec.path.rpartition(':')[2]}",
                         lambda: _expected(connection, f, options.get("runs", 1)), unit="decisions") as advance:
            try:
                result = run(connection, f, spec, args.seed, advance, **options)
            except ReplayError as exc:
                raise UsageError(str(exc)) from None
        replay_id = replays.save(engine, mode=args.mode, router_class=spec.path, router_kwargs=spec.kwargs,
                                 seed=args.seed, runs=result.get("runs", 1), f=f, result=result)
        with engine.connect() as connection:
            record = replays.read(connection, replay_id)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    console = Console(highlight=False, width=80 if not sys.stdout.isatty() else None)
    printer = PRINTERS.get(args.mode)
    if printer is None:
        console.print_json(data=result)
    else:
        for table in printer(result, min(console.width, 80)):
            console.print(table)
    console.print(f"stored as replay {replay_id}")
    return 0


class _ray_needed:
    """Without Ray, one line saying what to install."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "ray":
            raise UsageError(NO_RAY) from None
        return False


def _expected(connection, f, runs: int) -> Optional[int]:
    decisions = expected_rows(connection, f, "decisions")
    return None if decisions is None else decisions * runs


# --- the decisions mode's tables ---

def decisions_tables(result: dict, width: int):
    """One table per deployment, `width` columns wide: the recorded router beside the replayed one,
    then each replica's share."""
    for d in result["deployments"]:
        table = Table(title=f"{d['app']}/{d['deployment']}: {d['decisions']:,} decisions, {d['with_outcome']:,} "
                            f"routed", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, width=width,
                      caption=_caption(result, d), caption_justify="left")
        table.add_column("", overflow="fold")
        table.add_column("recorded", justify="right", overflow="fold")
        table.add_column("replay", justify="right", overflow="fold")
        recorded, replay = d["recorded"], d["replay"]
        table.add_row("real replica in first tier", _percent(recorded["rank0_rate"]),
                      _shown(replay["first_tier_hit_rate"], _percent))
        table.add_row("pick = real replica", "", _shown(replay["agreement"], _percent))
        for name, label, fmt in (("jain", "Jain's index", "{:.3f}"), ("max_over_mean", "max/mean", "{:.2f}")):
            table.add_row(label, _fixed(recorded["imbalance"][name], fmt),
                          _shown(replay["imbalance"][name], fmt.format))
        table.add_section()
        for replica in d["replicas"]:
            table.add_row(f"share of {replica['replica_id']}", _percent(replica["recorded_share"]),
                          _shown(replica["replay_share"], _percent))
        yield table


def _caption(result: dict, d: dict) -> str:
    recorded = ", ".join(c.rpartition(".")[2] for c in d["recorded_router_classes"])
    runs = f"{result['runs']} runs, mean ± 95% interval" if result["randomized"] else "deterministic: 1 run"
    notes = [f"recorded by {recorded}", f"replayed through {result['router']['class'].rpartition(':')[2]}, {runs}"]
    if d["membership_inferred"]:
        notes.append(f"candidates inferred for {d['membership_inferred']:,} decisions")
    errors = d["replay"]["router_errors"]
    if errors and errors["mean"]:
        notes.append(f"router errors: {errors['mean']:,.0f} ({d['replay']['first_error']})")
    return "; ".join(notes)


def _percent(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.1%}"


def _fixed(value: Optional[float], pattern: str) -> str:
    return "" if value is None else pattern.format(value)


def _shown(figure: Optional[dict], fmt: Callable[[float], str]) -> str:
    """A figure over runs: its mean, with its interval's half-width (the
    wider side, where a bound clipped it) when the runs differ."""
    if figure is None:
        return ""
    if figure["low"] == figure["high"]:
        return fmt(figure["mean"])
    return f"{fmt(figure['mean'])} ±{fmt(max(figure['high'] - figure['mean'], figure['mean'] - figure['low']))}"


# Each mode's tables; a mode without is printed as JSON.
PRINTERS: Dict[str, Callable[[dict, int], object]] = {"decisions": decisions_tables}
