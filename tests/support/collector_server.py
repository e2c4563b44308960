"""A real collector (uvicorn, real sockets) in a background thread, for tests
where traced routers in other processes send to it, or a browser reads it."""

from __future__ import annotations

import threading
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI

from routelens.collector.api.app import create_app
from routelens.collector.settings import Settings
from tests.support.ports import free_port


class CollectorServer:
    """`app_factory`: `collector.api.app.create_app`, or `dashboard.up.create_up_app` for `routelens up`."""

    def __init__(self, settings: Settings, app_factory: Callable[[Settings], FastAPI] = create_app):
        self.app = app_factory(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                     log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="collector", daemon=True)

    def __enter__(self) -> "CollectorServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the collector did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.app.state.engine.dispose()
