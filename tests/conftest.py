"""Shared fixtures: one real Ray + Serve instance per test session; the
collector's databases (SQLite files, a throwaway PostgreSQL cluster)."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from collector.app import create_app
from collector.db import check_schema, make_engine, upgrade
from collector.models import ROLLUP_KEY, Base, rollups
from collector.settings import Settings
from routers.ids import event_id, next_seq
from tests.browser import browser, page, playwright_loop  # noqa: F401  (a real headless Chromium)
from tests.ports import free_port
from tests.postgres import PostgresCluster, PostgresUnavailable, check_available
from tests.system_deps import require


def pytest_addoption(parser):
    # Here, in the initial conftest, so that `pytest --run-long` works from the
    # root too; tests/reliability/conftest.py applies it.
    parser.addoption("--run-long", action="store_true", default=False,
                     help="run the long reliability tests (marked reliability_long); also ROUTELENS_LONG=1")


@pytest.fixture(scope="session")
def serve_instance(tmp_path_factory):
    """Ray (2 CPUs, replicas use num_cpus=0) and Serve with HTTP on a free port.

    Yields the base URL of Serve's HTTP proxy.
    """
    # Ray's processes inherit it: batches this session's routers could not
    # deliver stay in the session's own spool, rather than the host's, where
    # the routers of a later session would adopt and replay them.
    os.environ["ROUTELENS_SPOOL_DIR"] = str(tmp_path_factory.mktemp("spool"))
    import ray
    from ray import cloudpickle, serve

    from tests import serve_apps

    # The test apps are shipped by value, so Ray workers need not import `tests`.
    cloudpickle.register_pickle_by_value(serve_apps)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


# --- the collector's databases: SQLite, and a throwaway PostgreSQL cluster ---

class PostgresServer:
    """The session's cluster, and a template database migrated to head."""

    TEMPLATE = "routelens_template"

    def __init__(self, cluster: PostgresCluster):
        self.cluster = cluster

    def new_database(self, migrated: bool = True) -> str:
        """The URL of a new database: a copy of the template at head, or empty."""
        name = self.cluster.create_database(template=self.TEMPLATE if migrated else None)
        return self.cluster.url(name)

    def drop(self, url: str) -> None:
        self.cluster.drop_database(url.rsplit("/", 1)[1])


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL 15 cluster for the session. Skipped where PostgreSQL is not
    installed, except in CI (CI set), where that is a failure."""
    require(check_available, PostgresUnavailable, "CI must test against PostgreSQL", "PostgreSQL unavailable")
    cluster = PostgresCluster().start()
    try:
        cluster.create_database(PostgresServer.TEMPLATE)
        upgrade(cluster.url(PostgresServer.TEMPLATE))
        yield PostgresServer(cluster)
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path):
    """A fresh database at the schema's head, on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'routelens.db'}"
        engine = make_engine(url)
        check_schema(engine, url)  # creates a new SQLite file at head
        engine.dispose()
        yield url
        return
    server = request.getfixturevalue("postgres")
    url = server.new_database()
    yield url
    server.drop(url)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request, tmp_path):
    """A database with no schema at all, on each backend (SQLite: no file yet)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    server = request.getfixturevalue("postgres")
    url = server.new_database(migrated=False)
    yield url
    server.drop(url)


# --- the collector app, and wire-format v1 batches as the tracer builds them ---

class WireSource:
    """One traced router instance: builds its events (shapes as in
    `routers.wire.encode`, ids from the tracer's own `routers.ids`) and
    numbers its batches from 1, as the exporter does."""

    def __init__(self, source_id: str, app: str = "shop", deployment: str = "Checkout",
                 router_class: str = "routers.examples.TracedPowerOfTwoChoicesRequestRouter",
                 labels: dict = None, **info):
        self.info = {"source_id": source_id, "app": app, "deployment": deployment, "router_class": router_class,
                     "handle_source": "proxy", "node_id": "node-1", "hostname": "host-1", "pid": 4242,
                     "tracer_version": "0.1.0", "labels": dict(labels or {}), **info}
        self.seq = 0

    def batch(self, events, seq: int = None, dropped: dict = None, produced: int = None) -> dict:
        if seq is None:
            self.seq += 1
            seq = self.seq
        body = {"schema_version": 1, "source": dict(self.info), "seq": seq, "dropped": dropped or {},
                "events": list(events)}
        if produced is not None:
            body["produced"] = produced
        return body

    @staticmethod
    def _id(ts: float) -> str:
        return event_id(ts, next_seq())

    def decision(self, ts: float, ranks, candidates: dict = None, request_id: str = None,
                 internal_request_id: str = None, attempt: int = 0, duration_us: int = 120,
                 model_id: str = None) -> dict:
        """`candidates`: replica id -> the inputs it was ranked on (default: none known)."""
        candidates = candidates or {}
        replicas = {}
        for rank in ranks:
            for replica_id in rank:
                given = candidates.get(replica_id, {})
                replicas[replica_id] = {"queue_len": given.get("queue_len"),
                                        "queue_len_age_s": given.get("queue_len_age_s"),
                                        "stats": given.get("stats", {}),
                                        "stats_age_s": given.get("stats_age_s"),
                                        "stats_age_source": given.get("stats_age_source")}
        return {"type": "decision", "id": self._id(ts), "ts": ts, "request_id": request_id,
                "internal_request_id": internal_request_id, "model_id": model_id, "attempt": attempt,
                "duration_us": duration_us, "n_candidates": len(replicas), "ranks": [list(r) for r in ranks],
                "replicas": replicas}

    def routed(self, ts: float, replica_id: str, decision: dict = None, rank=0, own_ranking: bool = True,
               attempts: int = 1, request_id: str = None, internal_request_id: str = None,
               queue_wait_ms: float = 0.5) -> dict:
        if decision is not None:
            request_id = request_id or decision["request_id"]
            internal_request_id = internal_request_id or decision["internal_request_id"]
        return {"type": "routed", "id": self._id(ts), "ts": ts, "request_id": request_id,
                "internal_request_id": internal_request_id, "model_id": None, "replica_id": replica_id,
                "decision_id": decision["id"] if decision is not None else None, "rank": rank,
                "own_ranking": own_ranking, "attempts": attempts, "queue_wait_ms": queue_wait_ms,
                "attribution": "exact"}

    def completed(self, ts: float, replica_id: str, routed: dict = None, latency_ms: float = 12.5,
                  ok: bool = True, rejected: bool = False, internal_request_id: str = None) -> dict:
        if routed is not None:
            internal_request_id = internal_request_id or routed["internal_request_id"]
        return {"type": "completed", "id": self._id(ts), "ts": ts, "internal_request_id": internal_request_id,
                "replica_id": replica_id, "latency_ms": None if rejected else latency_ms,
                "ok": None if rejected else ok, "rejected": rejected,
                "routed_id": routed["id"] if routed is not None else None}

    def replicas(self, ts: float, replica_ids) -> dict:
        members = [{"replica_id": r, "node_id": f"node-{r}", "availability_zone": "az-1",
                    "max_ongoing_requests": 5, "model_ids": []} for r in replica_ids]
        return {"type": "replicas", "id": self._id(ts), "ts": ts, "replicas": members}

    def stats(self, ts: float, replica_id: str, stats: dict, collected_at: float = None) -> dict:
        return {"type": "stats", "id": self._id(ts), "ts": ts, "replica_id": replica_id, "stats": stats,
                "collected_at": collected_at}


class Collector:
    """A collector app on one database, driven through its HTTP interface."""

    def __init__(self, db_url: str, **settings):
        # No background pruning: tests prune explicitly (collector.retention).
        settings = {"retention_s": None, "minute_rollup_retention_s": None, **settings}
        self.app = create_app(Settings(db_url=db_url, **settings))
        self.engine = self.app.state.engine
        # Server errors come back as 500 responses, so that tests can assert there are none.
        self.http = TestClient(self.app, raise_server_exceptions=False)

    def send(self, batch, compress: bool = False, headers: dict = None):
        """POST one batch (a dict, or the body as bytes)."""
        body = batch if isinstance(batch, bytes) else json.dumps(batch).encode()
        sent = {"content-type": "application/json"}
        if compress:
            body = gzip.compress(body)
            sent["content-encoding"] = "gzip"
        sent.update(headers or {})
        return self.http.post("/v1/events", content=body, headers=sent)

    def store(self, batch, **options) -> dict:
        """Send a batch that must be accepted; the answer's counts."""
        response = self.send(batch, **options)
        assert response.status_code == 200, response.text
        return response.json()

    def get(self, path: str, **params) -> dict:
        """GET a read endpoint that must answer 200; its JSON."""
        response = self.http.get(path, params=params)
        assert response.status_code == 200, f"{path} {params}: {response.status_code} {response.text}"
        return response.json()

    def table_counts(self) -> dict:
        """Rows in every table: what a refused batch must leave unchanged."""
        with self.engine.connect() as connection:
            return {name: connection.scalar(select(func.count()).select_from(table))
                    for name, table in Base.metadata.tables.items()}

    def rollup_rows(self) -> list:
        """Every rollup row, in key order: the figures panels read."""
        with self.engine.connect() as connection:
            return [tuple(row) for row in connection.execute(
                select(rollups).order_by(*(rollups.c[k] for k in ROLLUP_KEY)))]

    def close(self) -> None:
        self.http.close()
        self.engine.dispose()


@pytest.fixture
def make_collector(db_url):
    """Collector apps on this test's database: `make_collector(token=...)`."""
    made = []

    def make(**settings) -> Collector:
        made.append(Collector(db_url, **settings))
        return made[-1]

    yield make
    for collector in made:
        collector.close()


@pytest.fixture
def collector(make_collector) -> Collector:
    return make_collector()


@pytest.fixture
def make_source():
    """`make_source(source_id, app=..., deployment=..., router_class=..., labels=...)`."""
    return WireSource
