"""App factories for worker processes of `collector.cli.server.serve_workers`
that the tests want to misbehave (a module of its own: a worker imports it)."""

from __future__ import annotations

import os

from routelens.collector.store.db import DatabaseError

FAILURE = "the database went away between the supervisor's check and this worker (test)"


def failing_app(settings):
    """Records this worker's pid in $ROUTELENS_TEST_PIDS, then cannot start."""
    with open(os.environ["ROUTELENS_TEST_PIDS"], "a") as pids:
        pids.write(f"{os.getpid()}\n")
    raise DatabaseError(FAILURE)
