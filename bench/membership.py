"""A membership-heavy batch: 10 `replicas` events of 100,000 members each,
stored by the collector's writer, next to a plain bulk insert of as many
rows into the same kind of database, measured in the same run (issue 24,
point 2). The ratio writer / bulk insert is the figure that travels.

What is measured, per round and backend:

- bulk: the members as rows of the `replicas` table (the same columns,
  keys and pragmas), inserted with the driver's `executemany`, one
  transaction per event's 100,000 rows (PostgreSQL: COPY, as the collector
  inserts raw events), into a fresh database migrated to the collector's
  schema: the bound;
- writer: the one batch (gzip'd wire format, within the collector's body
  limit, members named by their ids only; built before timing) parsed
  and stored by `collector.ingest.writer.Ingestor` on a fresh database, as
  `POST /v1/events` stores it (without HTTP): the replicas registered, the
  events inserted, the membership applied, in its one transaction. Each
  event's members are the last one's with `--churn` of them replaced (the
  first event adds every member; each next one adds and removes `--churn`).
  Afterwards the stored membership is checked: the last event's members
  are current, every replica it left out has been removed.

    .venv/bin/python bench/membership.py [--members 100000] [--events 10] [--churn 1000] [--rounds 2]
                                         [--backends sqlite,postgres]
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import msgspec  # noqa: E402
import psycopg  # noqa: E402
import workload  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from routelens.collector.ingest.schema import parse  # noqa: E402
from routelens.collector.ingest.writer import Ingestor  # noqa: E402
from routelens.collector.settings import Settings  # noqa: E402
from routelens.collector.store import db  # noqa: E402
from routelens.collector.store.models import Replica  # noqa: E402
from routelens.routers.ids import event_id  # noqa: E402

COLUMNS = ("deployment_pk", "replica_id", "node_id", "availability_zone", "max_ongoing_requests", "model_ids",
           "first_seen", "added_at", "removed_at")


def build(members: int, events: int, churn: int) -> tuple:
    """The batch (gzip'd JSON), each event's member ids, and the bulk insert's rows (one list per event)."""
    ids = workload.replica_ids(members + churn * (events - 1), seed=3)
    t0 = time.time() - 600
    wire_events, member_ids, rows = [], [], []
    for n in range(events):
        chosen = ids[n * churn:n * churn + members]
        ts = t0 + n
        # Members named only (the rest is optional): a million of them fit the body limit, inflated.
        wire_events.append({"type": "replicas", "id": event_id(ts, n), "ts": ts,
                            "replicas": [{"replica_id": replica_id} for replica_id in chosen]})
        member_ids.append(chosen)
        rows.append([(1, replica_id, None, None, None, "[]", ts, ts, None) for replica_id in chosen])
    batch = {"schema_version": 1, "source": workload.source_info(0), "seq": 1, "dropped": {}, "events": wire_events}
    body = msgspec.json.encode(batch)
    assert len(body) <= Settings().max_body_bytes, f"{len(body)} bytes: over the collector's body limit"
    return gzip.compress(body), member_ids, rows


def bulk_sqlite(path: str, rows: List[List[tuple]]) -> float:
    url = f"sqlite:///{path}"
    db.upgrade(url)
    engine = db.make_engine(url)  # the collector's pragmas: WAL, synchronous=NORMAL, cache size
    connection = engine.raw_connection()
    connection.execute("INSERT INTO deployments (pk, app, deployment) VALUES (1, 'bench', 'bench')")
    connection.commit()
    # Each event's rows under a deployment of their own: the replicas' ids are unique per deployment.
    sql = f"INSERT INTO replicas ({', '.join(COLUMNS)}) VALUES ({', '.join(['?'] * len(COLUMNS))})"
    try:
        started = time.perf_counter()
        for n, event_rows in enumerate(rows):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(sql, [(n + 1, *row[1:]) for row in event_rows])
            connection.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        connection.close()
        engine.dispose()


def bulk_postgres(url: str, rows: List[List[tuple]]) -> float:
    db.upgrade(url)
    with psycopg.connect(url) as connection:
        with connection.cursor() as cursor:
            for n in range(len(rows)):
                cursor.execute("INSERT INTO deployments (pk, app, deployment) VALUES (%s, 'bench', %s)",
                               (n + 1, f"bench-{n}"))
            connection.commit()
            started = time.perf_counter()
            for n, event_rows in enumerate(rows):
                with connection.transaction(), cursor.copy(f"COPY replicas ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for row in event_rows:
                        copy.write_row((n + 1, *row[1:]))
            return time.perf_counter() - started


def writer_run(url: str, body: bytes, member_ids: List[List[str]]) -> float:
    engine = db.make_engine(url)
    try:
        db.check_schema(engine, url)
        ingestor = Ingestor(engine)
        started = time.perf_counter()
        result = ingestor.ingest(parse(gzip.decompress(body), 100_000))
        elapsed = time.perf_counter() - started
        assert result.stored == len(member_ids), result
        with engine.connect() as connection:
            current = set(connection.scalars(select(Replica.replica_id).where(Replica.removed_at.is_(None))))
            removed = connection.scalar(select(func.count()).select_from(Replica)
                                        .where(Replica.removed_at.is_not(None)))
        every = {replica_id for ids in member_ids for replica_id in ids}
        assert current == set(member_ids[-1]), "the last event's members are not the current ones"
        assert removed == len(every) - len(member_ids[-1]), removed
        return elapsed
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000, help="members per event (default: %(default)s)")
    parser.add_argument("--events", type=int, default=10, help="replicas events in the batch (default: %(default)s)")
    parser.add_argument("--churn", type=int, default=1000,
                        help="members each event adds and removes after the first (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="bulk + writer pairs per backend (default: %(default)s)")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--pg-fsync", choices=("on", "off"), default="on",
                        help="PostgreSQL fsync and synchronous_commit (default: %(default)s)")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    body, member_ids, rows = build(args.members, args.events, args.churn)
    total = sum(len(ids) for ids in member_ids)
    print(f"machine: {os.cpu_count()} cores; one batch of {args.events} replicas events x {args.members:,} members "
          f"(churn {args.churn:,} per event): {len(body) / 1e6:.1f} MB gzip'd, {total:,} member rows")

    results: Dict[str, List[float]] = {b: [] for b in backends}
    cluster = None
    if "postgres" in backends:
        from tests.support.postgres import PostgresCluster

        cluster = PostgresCluster(fsync=args.pg_fsync == "on").start()
        print(f"postgres: throwaway cluster, fsync={args.pg_fsync}")
    workdir = tempfile.mkdtemp(prefix="routelens-bench-membership-")
    try:
        for round_no in range(1, args.rounds + 1):
            for backend in backends:
                if backend == "sqlite":
                    bulk_s = bulk_sqlite(os.path.join(workdir, f"bulk{round_no}.db"), rows)
                    writer_s = writer_run(f"sqlite:///{os.path.join(workdir, f'writer{round_no}.db')}", body,
                                          member_ids)
                elif backend == "postgres":
                    bulk_s = bulk_postgres(cluster.url(cluster.create_database(f"bulk{round_no}")), rows)
                    url = cluster.url(cluster.create_database(f"writer{round_no}"))
                    db.upgrade(url)
                    writer_s = writer_run(url, body, member_ids)
                else:
                    raise SystemExit(f"unknown backend {backend!r}")
                results[backend].append(writer_s / bulk_s)
                print(f"round {round_no} {backend:8s}: bulk insert {bulk_s:7.2f} s   writer {writer_s:7.2f} s   "
                      f"writer/bulk {writer_s / bulk_s:.2f}", flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir)
    print()
    for backend in backends:
        print(f"  {backend:8s}: writer / bulk insert of the same {total:,} rows, median of rounds: "
              f"{statistics.median(results[backend]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
