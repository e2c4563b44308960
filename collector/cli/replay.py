"""`routelens replay`: a window's recorded traffic through another router, in this process; the result stored.

The mode's module (`collector.replay.MODES`) is imported only here, when a
replay runs: it imports Ray, which the rest of the collector never does.
Bad input (a class that cannot be imported or is no RequestRouter, kwargs
that are not a JSON object, a router that cannot be built or simulated, an
empty window, another mode's option) is one line and exit status 2, with
nothing stored.
"""

from __future__ import annotations

import importlib
import json
import sys
from typing import Callable, Dict, Iterator, List, Optional

from rich import box
from rich.console import Console
from rich.table import Table

from ..replay import MODES, Mode
from ..replay.spec import ReplayError, RouterSpec
from ..store import replays
from ..store.db import check_schema, make_engine
from .errors import UsageError
from .files import expected_rows, filters_of, progress
from .gc_tuning import tune_gc_for_bulk_work

NO_RAY = ('replay runs the router in this process, which needs Ray: pip install "ray[serve]>=2.60,<2.61" '
          "(or pip install routelens, which brings it)")


def run_replay(args) -> int:
    f = filters_of(args)
    try:
        spec = RouterSpec.parse(args.router, args.kwargs)
    except ReplayError as exc:
        raise UsageError(str(exc)) from None
    mode = MODES[args.mode]
    options = _options(args, mode)
    with _ray_needed():
        run = importlib.import_module(mode.module).replay
    tune_gc_for_bulk_work()  # after Ray's import: what it made is frozen out of collections
    engine = make_engine(args.db, sqlite_cache_mb=8)
    try:
        check_schema(engine, args.db)
        with engine.connect() as connection, _ray_needed(), \
                progress(f"replaying through {_class_name(spec.path)}",
                         lambda: _expected(connection, f, mode, options), unit=mode.unit) as advance:
            try:
                result = run(connection, f, spec, args.seed, advance, **options)
            except ReplayError as exc:
                raise UsageError(str(exc)) from None
        replay_id = replays.save(engine, mode=args.mode, router_class=spec.path, router_kwargs=spec.kwargs,
                                 seed=args.seed, runs=result["runs"], f=f, result=result)
        with engine.connect() as connection:
            record = replays.read(connection, replay_id)
    finally:
        engine.dispose()
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    console = Console(highlight=False, width=80 if not sys.stdout.isatty() else None)
    for table in PRINTERS[args.mode](result, min(console.width, 80)):
        console.print(table)
    console.print(f"stored as replay {replay_id}")
    return 0


def _options(args, mode: Mode) -> Dict[str, Optional[int]]:
    """The mode's options, as given or their defaults; another mode's option given is a UsageError."""
    others = sorted({name for other in MODES.values() for name in other.options} - set(mode.options))
    given = [name for name in others if getattr(args, name) is not None]
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} is not an option of --mode {args.mode}")
    return {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in mode.options.items()}


class _ray_needed:
    """Without Ray, one line saying what to install."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == "ray":
            raise UsageError(NO_RAY) from None
        return False


def _expected(connection, f, mode: Mode, options: dict) -> Optional[int]:
    """What the progress bar counts to: the window's decisions for each run, or its requests."""
    counted = expected_rows(connection, f, mode.counted)
    return None if counted is None else counted * options.get("runs", 1)


def _class_name(path: str) -> str:
    """"Class" of "package.module:Class" or "package.module.Class"."""
    return path.replace(":", ".").rpartition(".")[2]


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
    recorded = ", ".join(_class_name(c) for c in d["recorded_router_classes"])
    runs = f"{result['runs']} runs, mean ± 95% interval" if result["randomized"] else "deterministic: 1 run"
    notes = [f"recorded by {recorded}", f"replayed through {_class_name(result['router']['class'])}, {runs}"]
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


# --- the simulate mode's tables ---

def simulate_tables(result: dict, width: int) -> Iterator[object]:
    """One table per deployment, `width` columns wide: what was recorded, the recorded router
    simulated and the given router simulated, side by side; the deployment's figures, then each
    replica's. Then the notes (what was left out, and why)."""
    given = _class_name(result["router"]["class"])
    for d in result["deployments"]:
        recorded_by = ", ".join(_class_name(c) for c in d["recorded_router_classes"])
        table = Table(title=f"{d['app']}/{d['deployment']}: {d['recorded']['requests']:,} requests simulated",
                      box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, width=width,
                      caption=f"recorded by {recorded_by}; simulated through it and through {given}, seed "
                              f"{result['seed']}; queue wait and latency in ms, p50/p95/p99",
                      caption_justify="left")
        table.add_column("", no_wrap=True)
        for header in ("recorded", "recorded router simulated", f"{given} simulated"):
            table.add_column(header, justify="right", overflow="fold")
        columns = [d["recorded"], d["recorded_simulated"], d["replay"]]
        for label, shown in _SIMULATE_DEPLOYMENT_ROWS:
            table.add_row(label, *("" if c is None else shown(c) for c in columns))
        for replica in d["replicas"]:
            table.add_section()
            columns = [replica["recorded"], replica["recorded_simulated"], replica["replay"]]
            for label, shown in _SIMULATE_REPLICA_ROWS:
                table.add_row(label.format(replica["replica_id"]), *("" if c is None else shown(c) for c in columns))
        yield table
    for note in result["notes"]:
        yield f"note: {note}"


def _percentiles(figures: Dict[str, Optional[float]]) -> str:
    return "/".join("-" if v is None else f"{v:.1f}" if v < 10 else f"{v:.0f}" for v in figures.values())


_SIMULATE_DEPLOYMENT_ROWS: List[tuple] = [
    ("requests", lambda c: f"{c['requests']:,}"),
    ("Jain's index", lambda c: _fixed(c["imbalance"]["jain"], "{:.3f}")),
    ("max/mean", lambda c: _fixed(c["imbalance"]["max_over_mean"], "{:.2f}")),
    ("queue wait", lambda c: _percentiles(c["queue_wait_ms"])),
    ("latency", lambda c: _percentiles(c["latency_ms"])),
    ("rejections", lambda c: f"{c['rejections']:,}"),
    ("hand-offs", lambda c: f"{c['handoffs']:,}"),
    ("decisions", lambda c: f"{c['decisions']:,}"),
]
_SIMULATE_REPLICA_ROWS: List[tuple] = [
    ("share of {}", lambda c: _percent(c["share"])),
    ("  queue wait", lambda c: _percentiles(c["queue_wait_ms"])),
    ("  latency", lambda c: _percentiles(c["latency_ms"])),
    ("  rejections", lambda c: f"{c['rejections']:,}"),
    ("  hand-offs", lambda c: f"{c['handoffs']:,}"),
]


# Each mode's tables.
PRINTERS: Dict[str, Callable[[dict, int], Iterator[object]]] = {"decisions": decisions_tables,
                                                                 "simulate": simulate_tables}
