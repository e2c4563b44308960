"""`routelens up`: the collector's API and the dashboard in one process, on one port."""

from __future__ import annotations

from a2wsgi import WSGIMiddleware
from fastapi import FastAPI

from collector.app import create_app
from collector.settings import Settings
from dashboard.app import create_dashboard


def create_up_app(settings: Settings) -> FastAPI:
    """The collector's app (ingest, /v1, /docs, /healthz, /metrics) with the
    dashboard at `/`: a Dash (WSGI) app, mounted after the API's routes so
    that those keep their paths."""
    app = create_app(settings)
    dashboard = create_dashboard(app.state.engine, prefix="/")
    app.mount("/", WSGIMiddleware(dashboard.server))
    return app
