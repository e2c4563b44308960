"""The `routelens` command."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from collector.db import DatabaseError
from collector.serve import ServeError
from collector.settings import DEFAULT_DB, Settings, parse_duration



def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="routelens", description="Make Ray Serve request routing observable.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="trace the seed's routers and Ray's default router on a local Ray Serve, then summarize",
        description="Start a local Ray Serve, deploy the Ray custom-routing guide's two apps and a pow-2 "
                    "deployment with traced routers, send traffic through HTTP and a handle, and print "
                    "what the tracer recorded.",
    )
    demo.add_argument("--dir", default="routelens-demo", help="where the decision logs go (default: %(default)s)")
    demo.add_argument("--requests", type=int, default=100,
                      help="requests per app and per path, HTTP and handle (default: %(default)s)")
    demo.add_argument("--port", type=int, default=8000, help="Serve's HTTP port (default: %(default)s)")
    _add_collector(commands)
    _add_db(commands)
    args = parser.parse_args(argv)

    if args.command in ("collector", "db"):
        try:
            return args.run(args)
        except (DatabaseError, ServeError) as exc:
            print(f"routelens {args.command}: {exc}", file=sys.stderr)
            return 1
    if args.command == "demo":
        if args.requests <= 0:
            parser.error("--requests must be positive")
        from collector import demo as demo_job

        demo_job.run(args.dir, args.requests, args.port)
    return 0


def _add_collector(commands) -> None:
    collector = commands.add_parser(
        "collector", help="run the collector: ingest (POST /v1/events) and the read API",
        description="Serve ingest and the read API alone: the unit that scales out (several collectors on "
                    "one PostgreSQL). `routelens up` serves the dashboard as well.",
    )
    _add_db_option(collector)
    collector.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    collector.add_argument("--port", type=int, default=8321, help="port to listen on (default: %(default)s)")
    collector.add_argument("--token", default=os.environ.get("ROUTELENS_TOKEN"),
                           help="require 'Authorization: Bearer TOKEN' (default: $ROUTELENS_TOKEN, else none)")
    collector.add_argument("--retention", default="7d", type=_duration_or_never,
                           help="keep raw events this long, e.g. 24h, 7d, or 'never' (default: %(default)s); "
                                "rollups stay longer")
    collector.add_argument("--max-body-mb", type=float, default=32.0,
                           help="largest batch body accepted, inflated (default: %(default)s)")
    collector.add_argument("--max-events", type=int, default=20_000,
                           help="most events accepted in one batch (default: %(default)s)")
    collector.set_defaults(run=_run_collector)


def _add_db(commands) -> None:
    db_parser = commands.add_parser("db", help="database schema: upgrade, current",
                                    description="Manage the routelens database schema (Alembic migrations).")
    actions = db_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    upgrade = actions.add_parser("upgrade", help="migrate the database to this version's schema (creates it)")
    _add_db_option(upgrade)
    upgrade.add_argument("--revision", default="head", help="target revision (default: %(default)s)")
    upgrade.set_defaults(run=_run_db_upgrade)
    current = actions.add_parser("current", help="print the database's schema revision and this version's")
    _add_db_option(current)
    current.set_defaults(run=_run_db_current)


def _add_db_option(parser) -> None:
    parser.add_argument("--db", default=os.environ.get("ROUTELENS_DB", DEFAULT_DB),
                        help="database URL: sqlite:///FILE, a file path, or postgresql://USER@HOST/DB "
                             "(default: $ROUTELENS_DB, else %(default)s)")


def _duration_or_never(text: str):
    if text.strip().lower() == "never":
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _run_collector(args) -> int:
    from collector.app import create_app
    from collector.serve import serve

    settings = Settings(db_url=args.db, token=args.token or None, retention_s=args.retention,
                        max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_events_per_batch=args.max_events)
    app = create_app(settings)
    print(f"routelens collector: listening on http://{args.host}:{args.port} (API docs at /docs)", file=sys.stderr)
    serve(app, args.host, args.port, settings.token)
    return 0


def _run_db_upgrade(args) -> int:
    from collector import db

    db.upgrade(args.db, args.revision)
    print(f"database at {db.current_revision(db.make_engine(args.db))} (head: {db.head_revision()})")
    return 0


def _run_db_current(args) -> int:
    from sqlalchemy.engine import make_url

    from collector import db

    url = make_url(db.normalize_url(args.db))
    if url.get_backend_name() == "sqlite" and url.database and not os.path.exists(url.database):
        # Opening a missing SQLite file creates it: a question must not leave a database behind.
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


if __name__ == "__main__":
    sys.exit(main())
