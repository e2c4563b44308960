"""Shared fixtures: one real Ray + Serve instance per test session."""

from __future__ import annotations

import socket

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_instance():
    """Ray (2 CPUs, replicas use num_cpus=0) and Serve with HTTP on a free port.

    Yields the base URL of Serve's HTTP proxy.
    """
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
