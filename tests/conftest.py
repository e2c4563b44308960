"""Shared fixtures: one real Ray + Serve instance per test session; the
collector's databases (SQLite files, a throwaway PostgreSQL cluster)."""

from __future__ import annotations

import os
import sys

import pytest

from routelens.collector.store.db import check_schema, make_engine, upgrade
from tests.support.browser import browser, page, playwright_loop  # noqa: F401  (a real headless Chromium)
from tests.support.collector_app import Collector
from tests.support.decoys import make_decoys
from tests.support.ports import free_port
from tests.support.postgres import PostgresCluster, PostgresServer, PostgresUnavailable, check_available
from tests.support.system_deps import require
from tests.support.wire_source import WireSource


def pytest_addoption(parser):
    parser.addoption("--run-long", action="store_true", default=False,
                     help="run the long reliability tests (marked reliability_long); also ROUTELENS_LONG=1")


def _run_long(config) -> bool:
    return bool(config.getoption("--run-long")) or os.environ.get("ROUTELENS_LONG") == "1"


# The modules whose tests start Ray: those of the session's instance (marker
# `ray`, which every test of these modules has), and the demo's, which runs
# `routelens demo` with an instance of its own.
RAY_MODULES = ("tests/test_collector_e2e.py", "tests/test_ground_truth.py", "tests/test_serve_robustness.py",
               "tests/test_serve_unrouted_sends.py", "tests/reliability/test_serve_collector_kills.py",
               "tests/test_replay_prediction.py")
DEMO_MODULE = "tests/test_demo.py"
STARTS_RAY = (DEMO_MODULE, *RAY_MODULES)


def _module_path(item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The tests that start Ray run one at a time, the demo's before the
    Ray-backed ones: the session's Ray instance starts after the demo's has
    stopped, and the two never share these 2 cores.

    With pytest-xdist (scripts/test: `-n 3 --no-loadscope-reorder`) they are
    one unit of work (pytest_xdist_make_scheduler, below), which one worker
    runs first while the others work through the rest module by module. Run
    in one process, they come last, so that the session's Ray instance
    never sits idle under the rest of the suite."""
    misplaced = sorted({_module_path(item) for item in items
                        if (item.get_closest_marker("ray") is not None) != (_module_path(item) in RAY_MODULES)})
    if misplaced:
        raise pytest.UsageError(f"tests/conftest.py: RAY_MODULES must list exactly the modules of the tests marked "
                                f"`ray` (all of each module's tests); these are not: {', '.join(misplaced)}")
    # The long reliability runs (minutes of load, several faults) stay out of the default run;
    # each has a short version that always runs. docs/reliability.md has their figures.
    if not _run_long(config):
        skip = pytest.mark.skip(reason="long reliability run: use --run-long or ROUTELENS_LONG=1")
        for item in items:
            if "reliability_long" in item.keywords:
                item.add_marker(skip)
    under_xdist = hasattr(config, "workerinput")
    items.sort(key=lambda item: ((_module_path(item) in STARTS_RAY) != under_xdist,
                                 item.get_closest_marker("ray") is not None))  # stable


# How much less CPU a worker's other tests get than the Ray tests beside them (nice 5: about a third
# of their share). The Ray tests measure Ray itself (stats periods and their staleness, hand-offs,
# latencies); starved by the other workers they measured the machine instead.
OTHER_TESTS_NICENESS = 5
_niced = False


def pytest_runtest_setup(item):
    """Under xdist, a worker lowers its priority at its first test that
    starts no Ray: at once for the workers that run none, after the Ray
    modules for the worker that runs them (they come first there)."""
    global _niced
    if not _niced and hasattr(item.config, "workerinput") and _module_path(item) not in STARTS_RAY:
        os.nice(OTHER_TESTS_NICENESS)
        _niced = True


def pytest_xdist_make_scheduler(config, log):
    """Modules as units of work (a module's fixtures are set up once), the
    modules that start Ray together as one."""
    from xdist.scheduler import LoadScopeScheduling

    class RayModulesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "the modules that start Ray" if module in STARTS_RAY else module

    return RayModulesTogether(config, log)


@pytest.fixture(scope="session")
def serve_instance(tmp_path_factory):
    """Ray (2 CPUs, replicas use num_cpus=0) and Serve with HTTP on a free port.

    Yields the base URL of Serve's HTTP proxy.
    """
    # Ray's processes inherit it: batches this session's routers could not
    # deliver stay in the session's own spool, rather than the host's, where
    # the routers of a later session would adopt and replay them.
    os.environ["ROUTELENS_SPOOL_DIR"] = str(tmp_path_factory.mktemp("spool"))
    # A user's own packages named like routelens' folders, first on every Ray
    # process's path (workers inherit PYTHONPATH): they must change nothing.
    decoys = make_decoys(tmp_path_factory.mktemp("decoys"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(decoys), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(decoys))
    import ray
    from ray import cloudpickle, serve

    from tests.support import ground_truth, serve_apps

    # The test apps and routers are shipped by value, so Ray workers need not import `tests`.
    cloudpickle.register_pickle_by_value(serve_apps)
    cloudpickle.register_pickle_by_value(ground_truth)
    # A cluster of its own ("local"), never one that `ray start` left on the host.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


# --- the collector's databases: SQLite, and a throwaway PostgreSQL cluster ---

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


# --- the collector app, and wire-format batches as the tracer builds them ---

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
