"""A collector app on one database, driven through its HTTP interface in process."""

from __future__ import annotations

import gzip
import json

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from routelens.collector.api.app import create_app
from routelens.collector.settings import Settings
from routelens.collector.store.db import make_engine
from routelens.collector.store.models import ROLLUP_KEY, Base, rollups


def rows(db_url: str, table) -> int:
    """Rows in one table of the database, read on a connection of their own."""
    return scalar(db_url, select(func.count()).select_from(table))


def scalar(db_url: str, query):
    """One value the database answers `query` with, on a connection of its own."""
    engine = make_engine(db_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(query)
    finally:
        engine.dispose()


class Collector:
    """A collector app on one database, driven through its HTTP interface."""

    def __init__(self, db_url: str, **settings):
        # No background pruning: tests prune explicitly (collector.store.retention).
        # "testserver": the Host that TestClient (and schemathesis, in process) send.
        settings = {"retention_s": None, "minute_rollup_retention_s": None, "allowed_hosts": ("testserver",),
                    **settings}
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
