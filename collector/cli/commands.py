"""The `routelens` command's subcommands: their options, and what each runs."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional

from ..export.names import FORMATS, TABLES
from ..settings import DEFAULT_DB, STORED_BATCHES_KEEP_S, Settings, parse_allowed_host, parse_duration
from ..store.errors import DatabaseError
from .errors import ConnectionFailed, DemoError, FileError, ServeError, UsageError


def run(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "replay":
        _pin_string_hashing(args.seed)  # the command's own process, which can start again; not main(argv)'s caller

    try:
        return args.run(args)
    except (ConnectionFailed, DatabaseError, DemoError, FileError, ServeError, UsageError) as exc:
        print(f"routelens {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="routelens", description="Make Ray Serve request routing observable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_collector(commands)
    _add_db(commands)
    _add_export(commands)
    _add_import(commands)
    _add_tail(commands)
    _add_replay(commands)
    return parser


def _add_demo(commands) -> None:
    demo = commands.add_parser(
        "demo", help="see routelens at work: traced routers, live traffic and the dashboard, on this machine",
        description="Start `routelens up` on a SQLite file and a local Ray Serve; deploy the Ray custom-routing "
                    "guide's two apps (uniform router, 10 replicas; throughput-aware router, 3 replicas, stamped "
                    "stats every second), a deployment on Ray's default power-of-two router (one slow replica, "
                    "bursts that cause rejections) and a multiplexed-model deployment on a model-then-locality "
                    "router (one replica's stats go stale), all traced; drive mixed HTTP and handle traffic; "
                    "print the dashboard's URL. Ctrl-C, or the end of --duration, shuts everything down.",
    )
    demo.add_argument("--duration", type=_positive_duration,
                      help="stop after this long, e.g. 60, 90s, 10m (default: run until Ctrl-C)")
    demo.add_argument("--rate", type=_positive_float, default=40.0,
                      help="requests per second over all apps, bursts aside (default: %(default)s)")
    demo.add_argument("--db", help="SQLite file to keep the demo's data in (default: a temporary file, "
                                   "removed at the end)")
    demo.add_argument("--port", type=_fixed_port, default=8321, help="the dashboard's port (default: %(default)s)")
    demo.add_argument("--serve-port", type=_fixed_port, default=8000, help="Serve's HTTP port (default: %(default)s)")
    demo.add_argument("--no-traffic", dest="traffic", action="store_false",
                      help="deploy and serve the dashboard, but send nothing (send your own)")
    demo.set_defaults(run=_run_demo)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more: {text!r}")
    return value


def _duration(text: str) -> float:
    """'90s', '15m', ... -> seconds; finite (enough digits make a float infinite, and no duration can be)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not math.isfinite(seconds):
        raise argparse.ArgumentTypeError(f"too long: {text[:80]!r}")
    return seconds


def _positive_duration(text: str) -> float:
    """Seconds, plain (60) or with a unit (90s, 10m)."""
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        return _duration(text)


def _port(text: str) -> int:
    """A TCP port; 0 asks the system for a free one."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {value}")
    return value


def _fixed_port(text: str) -> int:
    """A TCP port, 1 to 65535: one that others are told in advance."""
    value = _port(text)
    if value == 0:
        raise argparse.ArgumentTypeError("a port is 1 to 65535 here (the demo opens the dashboard at it)")
    return value


def _run_demo(args) -> int:
    from ..demo.run import DemoOptions, run

    if args.db and os.path.isdir(args.db):
        raise UsageError(f"--db {args.db} is a directory: name the SQLite file to keep the data in")
    return run(DemoOptions(duration=args.duration, rate=args.rate, db=args.db, port=args.port,
                           serve_port=args.serve_port, traffic=args.traffic))


def _add_collector(commands) -> None:
    collector = commands.add_parser(
        "collector", help="run the collector: ingest (POST /v1/events) and the read API",
        description="Serve ingest and the read API alone: the unit that scales out (several collectors on "
                    "one PostgreSQL). `routelens up` serves the dashboard as well.",
    )
    _add_server_options(collector)
    collector.set_defaults(run=_run_collector, with_dashboard=False)
    up = commands.add_parser(
        "up", help="run the collector and the dashboard in one process, on one port",
        description="Serve ingest, the read API (/v1) and the dashboard (/) in one process.",
    )
    _add_server_options(up)
    up.set_defaults(run=_run_collector, with_dashboard=True)


def _add_server_options(parser) -> None:
    _add_db_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=_port, default=8321,
                        help="port to listen on, 0 for any free one (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("ROUTELENS_TOKEN"),
                        help="require 'Authorization: Bearer TOKEN' (default: $ROUTELENS_TOKEN, else none)")
    parser.add_argument("--session-lifetime", default="12h", type=_positive_duration,
                        help="with --token: how long the dashboard's sign-in lasts (default: %(default)s)")
    parser.add_argument("--allow-host", action="append", default=[], type=_allowed_host, metavar="HOST",
                        help="without --token: serve requests naming HOST in their Host header, besides "
                             "localhost, 127.0.0.1, ::1 and --host (repeatable; *.example.com for a domain)")
    parser.add_argument("--retention", default="7d", type=_duration_or_never,
                        help="keep raw events this long, e.g. 24h, 7d, or 'never' (default: %(default)s); "
                             "rollups stay longer")
    parser.add_argument("--max-body-mb", type=_positive_float, default=32.0,
                        help="largest batch body accepted, inflated (default: %(default)s)")
    parser.add_argument("--max-events", type=_positive_int, default=20_000,
                        help="most events accepted in one batch (default: %(default)s)")
    parser.add_argument("--max-exports", type=_positive_int, default=Settings.max_exports,
                        help="exports streaming at once, per worker process; more are answered 503 with "
                             "Retry-After (default: %(default)s; each holds a database connection while its "
                             "client reads)")
    parser.add_argument("--no-routing-metrics", dest="routing_metrics", action="store_false",
                        help="leave the routing KPIs (counted at ingest) off /metrics, keeping the collector's own")
    parser.add_argument("--metrics-replica-limit", type=_positive_int, default=Settings.metrics_replica_limit,
                        help="replicas with /metrics series of their own, per process; later ones share the "
                             "label replica=\"_other\" (default: %(default)s)")
    parser.add_argument("--metrics-source-limit", type=_positive_int, default=Settings.metrics_source_limit,
                        help="sources (traced routers) with /metrics series of their own, per process; later ones "
                             "share source_id=\"_other\" (default: %(default)s)")
    parser.add_argument("--tail-max-behind", type=_tail_max_behind, default="1m",
                        help="how far behind what is stored a live reader of /v1/tail may fall before it skips "
                             "to the newest, told how many events it missed; at most 10m (default: %(default)s)")
    parser.add_argument("--workers", type=_positive_int, default=1,
                        help="processes serving on the port (default: %(default)s, which handles tens of thousands "
                             "of events/s; give one per core for more: each costs memory and database connections)")


def _tail_max_behind(text: str) -> float:
    """A positive duration within the time `stored_batches` keeps what a reader follows (10 minutes)."""
    seconds = _positive_duration(text)
    if seconds > STORED_BATCHES_KEEP_S:
        raise argparse.ArgumentTypeError(f"at most {STORED_BATCHES_KEEP_S / 60:.0f}m (what a reader follows is "
                                         f"kept that long): {text!r}")
    return seconds


def _add_db(commands) -> None:
    db_parser = commands.add_parser("db", help="database schema: upgrade, current",
                                    description="Manage the routelens database schema (Alembic migrations).")
    actions = db_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = actions.add_parser(
        "upgrade", help="migrate the database to this version's schema (creates it)",
        description="Create the database's tables, or migrate them to this version's schema (Alembic). The "
                    "collector refuses to start on a database behind it. SQLite and PostgreSQL alike.",
    )
    _add_db_option(upgrade)
    upgrade.add_argument("--revision", default="head",
                         help="target revision: head, or a revision id as `db current` prints (default: %(default)s)")
    upgrade.set_defaults(run=_run_db_upgrade)
    current = actions.add_parser(
        "current", help="print the database's schema revision and this version's",
        description="Print the database's schema revision next to the one this routelens expects. "
                    "Asking creates nothing: a missing SQLite file stays missing.",
    )
    _add_db_option(current)
    current.set_defaults(run=_run_db_current)


def _add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="write decision logs as CSV, JSON Lines or Parquet",
        description="Stream rows out of the database in constant memory, with a progress bar on a terminal. "
                    "A file appears under its name only once complete; a FIFO, a device or a pipe (/dev/fd/N) "
                    "is written to as it is. Schema: docs/export.md.",
    )
    _add_db_option(export)
    export.add_argument("-o", "--output", required=True, help="the file to write, or - for standard output")
    export.add_argument("--format", choices=FORMATS,
                        help="default: from the output's extension (.csv, .jsonl, .parquet)")
    export.add_argument("--what", choices=TABLES, default="decisions",
                        help="decisions (one row each, outcome joined; the default), candidates (one row per "
                             "ranked replica), routed, completed, or events (wire-format batches that "
                             "`routelens import` loads; jsonl only)")
    _add_window_and_filters(export)
    export.set_defaults(run=_run_export)


def _add_window_and_filters(parser) -> None:
    """The window and filters of the commands that read recorded events (`files.filters_of`)."""
    parser.add_argument("--window", help="the window ending at --until (default: everything), e.g. 15m, 24h, 7d")
    parser.add_argument("--since", help="window start: epoch seconds or ISO-8601")
    parser.add_argument("--until", help="window end: epoch seconds or ISO-8601 (default: now)")
    _add_filter_options(parser, replica="replica id")


def _add_replay(commands) -> None:
    from ..replay import DEFAULT_RUNS, MODES

    replay = commands.add_parser(
        "replay", help="what another router would have done: recorded traffic replayed through it",
        description="Replay the window's recorded traffic through a RequestRouter subclass you can import, "
                    "in this process (Ray installed; no cluster). --mode decisions: each recorded decision's "
                    "candidates, rebuilt with the inputs they had, given to the router; per deployment, how "
                    "often its first tier holds the replica that really got the request, where that replica "
                    "sits in its ranking, and the share of requests each replica would have got. --mode "
                    "simulate: the recorded requests, closed loop, through a simulated deployment (replicas "
                    "serving for recorded service times) routed by the recorded router and by this one; per "
                    "replica and deployment, share, imbalance, queue wait and latency, rejections, hand-offs. "
                    "Both beside what was recorded. The result is stored in the database (GET /v1/replays). "
                    "docs/replay.md.",
    )
    _add_db_option(replay)
    replay.add_argument("--router", required=True, metavar="MODULE:CLASS",
                        help="the router to replay through, e.g. my_routers:LeastLoaded or "
                             "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter "
                             "(the current directory is on the import path)")
    replay.add_argument("--kwargs", default="", metavar="JSON",
                        help="its request_router_kwargs, a JSON object (default: none)")
    replay.add_argument("--mode", choices=list(MODES), default="decisions",
                        help="decisions: each recorded decision given to the router; simulate: the recorded "
                             "requests through a simulated deployment, closed loop (default: %(default)s)")
    replay.add_argument("--runs", type=_runs,
                        help="decisions mode: runs of a randomized router, each seeded from --seed, reported as a "
                             "mean and a 95%% interval; a router ranking alike with two seeds is run once "
                             f"(default: {DEFAULT_RUNS})")
    replay.add_argument("--max-ongoing-requests", type=_positive_int, metavar="N",
                        help="simulate mode: every replica's slots (default: each replica's recorded "
                             "max_ongoing_requests)")
    replay.add_argument("--seed", type=_seed, default=0,
                        help="seed the runs' random draws derive from; the same seed gives the same result "
                             "(default: %(default)s)")
    replay.add_argument("--json", action="store_true",
                        help="print the stored replay as JSON (as GET /v1/replays/ID answers) instead of tables")
    _add_window_and_filters(replay)
    replay.set_defaults(run=_run_replay)


def _runs(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"at least 2 (a second run with another seed tells a randomized router): "
                                         f"{text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed is 0 to 2**63-1, not {text!r}")
    return value


def _add_import(commands) -> None:
    importer = commands.add_parser(
        "import", help="load the tracer's JSON Lines files (wire-format batches) into a database",
        description="Load files the tracer's local sink wrote (jsonl_path), or `routelens export --what events` "
                    "files, through the same validation and idempotent write path as POST /v1/events. Bad lines "
                    "are reported with file and line number and store nothing. Files ending in .gz are read "
                    "as gzip.",
    )
    importer.add_argument("files", nargs="+", metavar="FILE")
    _add_db_option(importer)
    importer.add_argument("--max-events", type=_positive_int, default=20_000,
                          help="most events accepted in one batch (default: %(default)s)")
    importer.set_defaults(run=_run_import)


def _add_tail(commands) -> None:
    tail = commands.add_parser(
        "tail", help="follow decisions as they are stored, one line each",
        description="Print each decision as it is stored, by any worker or collector on the database of the "
                    "collector at --url: time (UTC), app/deployment, request id, ranking, chosen replica and "
                    "rank, and its outcome when it came along; outcomes that arrive later follow on lines of "
                    "their own. A reader that falls further behind than the collector's --tail-max-behind skips "
                    "to the newest and is told how many events it missed. The filters pass a decision that "
                    "matches them all, and a later routing or outcome whose decision does. Reads GET /v1/tail, "
                    "with the read API's token.",
    )
    tail.add_argument("--url", default=os.environ.get("ROUTELENS_URL", "http://127.0.0.1:8321"),
                      help="the collector (default: $ROUTELENS_URL, else %(default)s)")
    tail.add_argument("--token", default=os.environ.get("ROUTELENS_TOKEN"),
                      help="its token (default: $ROUTELENS_TOKEN, else none)")
    _add_filter_options(tail, replica="chosen replica id")
    tail.add_argument("--json", action="store_true", help="one JSON object per line (JSON Lines), e.g. for jq")
    tail.set_defaults(run=_run_tail)


def _run_tail(args) -> int:
    from .tail import run_tail

    return run_tail(args)


def _add_filter_options(parser, replica: str) -> None:
    """The filters every read takes: --app, --deployment, --router-class, --replica, --label, and
    those of a decision's own fields, --request-id, --model-id, --reason."""
    for name, what in (("app", "Serve app"), ("deployment", "deployment"), ("router-class", "router class"),
                       ("replica", replica), ("label", "router label key=value (all must hold)")):
        parser.add_argument(f"--{name}", action="append", default=[], help=f"{what} (repeatable)")
    parser.add_argument("--request-id", help="request id or internal request id")
    parser.add_argument("--model-id", help="multiplexed model id")
    parser.add_argument("--reason", action="append", default=[],
                        help="the router's reason for a decision (routelens_explain; repeatable)")


def _add_db_option(parser) -> None:
    parser.add_argument("--db", default=os.environ.get("ROUTELENS_DB", DEFAULT_DB),
                        help="database URL: sqlite:///FILE, a file path, or postgresql://USER@HOST/DB "
                             "(default: $ROUTELENS_DB, else %(default)s)")


def _allowed_host(text: str) -> str:
    try:
        return parse_allowed_host(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_or_never(text: str):
    if text.strip().lower() == "never":
        return None
    return _duration(text)


def _run_collector(args) -> int:
    from .server import bind, load_factory, serve, serve_workers
    from .server_process import die_with_parent_if_asked

    die_with_parent_if_asked()  # started by a `ServerProcess` (the demo's, a test's, a bench's)
    settings = Settings(db_url=args.db, token=args.token or None, retention_s=args.retention,
                        max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_events_per_batch=args.max_events,
                        max_exports=args.max_exports, routing_metrics=args.routing_metrics,
                        metrics_replica_limit=args.metrics_replica_limit,
                        metrics_source_limit=args.metrics_source_limit, tail_max_behind_s=args.tail_max_behind,
                        session_lifetime_s=int(args.session_lifetime), listen_host=args.host,
                        allowed_hosts=tuple(args.allow_host))
    # Bound before anything is said about listening there; with --port 0, the port it got is the one to announce.
    with bind(args.host, args.port) as sock:
        port = sock.getsockname()[1]
        if args.with_dashboard:
            factory = "routelens.dashboard.up:create_up_app"
            what = f"dashboard at http://{args.host}:{port}/, API at /v1 (docs at /docs)"
        else:
            factory = "routelens.collector.api.app:create_app"
            what = f"listening on http://{args.host}:{port} (API docs at /docs)"
        if args.workers > 1:
            serve_workers(settings, factory, sock, args.workers,
                          banner=f"routelens {args.command}: {what}, {args.workers} worker processes")
            return 0
        app = load_factory(factory)(settings)
        print(f"routelens {args.command}: {what}", file=sys.stderr)
        serve(app, sock, settings.token)
    return 0


def _run_db_upgrade(args) -> int:
    from ..store import db

    known = db.script_revisions()
    if args.revision != "head" and args.revision not in known:
        raise UsageError(f"no revision {args.revision!r}: give head or one of {', '.join(sorted(known))}")
    db.upgrade(args.db, args.revision)
    print(f"database at {db.current_revision(db.make_engine(args.db))} (head: {db.head_revision()})")
    return 0


def _run_db_current(args) -> int:
    from ..store import db

    if db.missing_sqlite_file(args.db):
        current = None
    else:
        engine = db.make_engine(args.db)
        try:
            current = db.current_revision(engine)
        except Exception as exc:
            raise DatabaseError(f"cannot open the database: {db.first_line(exc)}") from None
        finally:
            engine.dispose()
    head = db.head_revision()
    state = "at head" if current == head else ("empty" if current is None else "behind or ahead of head")
    print(f"current: {current or '(none)'}  head: {head}  ({state})")
    return 0


def _run_export(args) -> int:
    from ..store.db import missing_sqlite_file
    from .files import run_export

    missing = missing_sqlite_file(args.db)
    if missing:
        raise UsageError(f"no database at {missing} (name the file with --db)")
    return run_export(args)


def _run_import(args) -> int:
    from .files import run_import

    return run_import(args)


def _pin_string_hashing(seed: int) -> None:
    """Starts this command again (same process id, arguments, working directory and streams) with
    PYTHONHASHSEED derived from `seed`, unless it already runs with it: so that the same seed gives the
    same replay in every process. Routers iterate over sets of replica ids (Ray's pow-2 draws its two from
    one), whose order follows the process's string hashes, drawn anew for each process unless PYTHONHASHSEED
    sets them; a value the environment already had (tox sets a random one) is replaced for the same reason.
    Before the replay's imports (half a second), so that starting again costs little."""
    pinned = str(seed % 2**32)  # PYTHONHASHSEED takes 0 to 2**32-1
    if os.environ.get("PYTHONHASHSEED") != pinned:
        os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONHASHSEED": pinned})


def _run_replay(args) -> int:
    from ..store.db import missing_sqlite_file
    from .replay import run_replay

    missing = missing_sqlite_file(args.db)
    if missing:
        raise UsageError(f"no database at {missing} (name the file with --db)")
    return run_replay(args)

