"""`routelens collector --workers N` and `routelens up --workers N`: real
processes on a real SQLite file and the session's PostgreSQL. Requests go to
chosen workers (tests.support.workers finds which process holds a connection), so
that each test knows which worker did what, whatever the kernel would pick."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Dict, List

import httpx
import pytest
from sqlalchemy import func, select

from routelens.collector.store.models import Deployment, Replica, Source, SourceBatch, decisions, stored_batches
from tests.support import sse
from tests.support.collector_app import Collector, rows, scalar
from tests.support.collector_process import ROOT, CollectorProcess
from tests.support.ports import free_port
from tests.support.worker_apps import FAILURE
from tests.support.workers import children, connection_to_each, worker_pids
from tests.test_cli import routelens

WORKERS = 2


def start(db_url: str, *args: str, command: str = "collector") -> CollectorProcess:
    """A collector with WORKERS workers, every one of them serving."""
    collector = CollectorProcess(db_url, command=command, args=("--workers", str(WORKERS), *args)).start()
    pids = worker_pids(collector.process.pid)
    assert len(pids) == WORKERS, pids
    for connection in connection_to_each(collector.port, pids).values():  # each worker answers
        connection.close()
    return collector


def post(connection: http.client.HTTPConnection, batch: dict) -> dict:
    connection.request("POST", "/v1/events", body=gzip.compress(json.dumps(batch).encode()),
                       headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    response = connection.getresponse()
    answer = response.read()
    assert response.status == 200, answer
    return json.loads(answer)


def send_in_step(connections: List[http.client.HTTPConnection], streams: List[List[dict]]) -> List[List[dict]]:
    """Each connection POSTs its stream of batches, the n-th batches of all
    streams at the same moment; the answers, per connection."""
    answers: List[List[dict]] = [[] for _ in connections]
    errors: List[BaseException] = []
    barrier = threading.Barrier(len(connections), timeout=120)

    def send(w: int) -> None:
        try:
            for batch in streams[w]:
                barrier.wait()
                answers[w].append(post(connections[w], batch))
        except BaseException as exc:  # the others must not wait for this one at the barrier
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=send, args=(w,)) for w in range(len(connections))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return answers


def traffic(src, ts: float, replicas: List[str], n: int) -> list:
    """A membership event and n requests: decision, routed, completed each."""
    events = [src.replicas(ts, replicas)]
    for i in range(n):
        t = ts + i * 0.37
        chosen = replicas[i % len(replicas)]
        d = src.decision(t, [[chosen, replicas[(i + 1) % len(replicas)]]], request_id=f"{src.info['source_id']}-{i}",
                         internal_request_id=f"i-{src.info['source_id']}-{i}",
                         candidates={chosen: {"stats_age_s": 0.01 * i, "stats_age_source": "observed"}})
        r = src.routed(t + 0.001, chosen, d, rank=i % 2)
        events += [d, r, src.completed(t + 0.003, chosen, r, latency_ms=1.0 + i)]
    return events


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus exposition."""
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in /metrics:\n{text}"
    return float(found.group(1))


def scrape(collector: CollectorProcess) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=60)
    connection.request("GET", "/metrics")
    body = connection.getresponse().read().decode()
    connection.close()
    return body


def views(get, window: dict) -> Dict[str, dict]:
    """What the panels show of the window (summary, distribution, rank hits):
    equal for equal data. `get(path, window)`: the endpoint's JSON."""
    out = {}
    for path in ("/v1/summary", "/v1/distribution", "/v1/rank-hits"):
        found = get(path, window)
        found.pop("window", None)
        out[path] = found
    return out


def served_views(collector: CollectorProcess, window: dict) -> Dict[str, dict]:
    return views(lambda path, params: collector.get(path + "?" + urllib.parse.urlencode(params)), window)


def reference_views(tmp_path, batches: List[dict], window: dict) -> Dict[str, dict]:
    """The same batches through one in-process collector, one after the other."""
    reference = Collector(f"sqlite:///{tmp_path / 'reference.db'}")
    try:
        for batch in batches:
            reference.store(batch)
        return views(lambda path, params: reference.get(path, **params), window)
    finally:
        reference.close()


def test_concurrent_batches_through_every_worker_are_stored_counted_and_shown_once(db_url, make_source, tmp_path):
    """Each worker gets new sources of the same new deployments at the same
    moment (dimension rows created concurrently; on PostgreSQL, transactions
    that commit in any order), then /metrics, which one worker answers,
    counts what both stored, and a tail that one worker serves, opened
    before, shows every decision posted, each once."""
    collector = start(db_url)
    try:
        connections = list(connection_to_each(collector.port, worker_pids(collector.process.pid)).values())
        with httpx.stream("GET", collector.url + "/v1/tail", timeout=60) as tail:  # served by one worker
            lines = tail.iter_lines()
            assert next(sse.events(lines))[0] == "hello"
            ts = time.time() - 600
            rounds = 6
            sent: List[List[dict]] = [[] for _ in connections]
            for i in range(rounds):
                for w in range(len(connections)):
                    src = make_source(f"w{w}-s{i}", app="shop", deployment=f"D{i % 3}")
                    replicas = [f"D{i % 3}-r{k}" for k in range(5)]
                    sent[w].append(src.batch(traffic(src, ts + i * 10 + w, replicas, 40)))
            answers = send_in_step(connections, sent)
            batches = [batch for per_worker in sent for batch in per_worker]
            assert [a["stored"] for per_worker in answers for a in per_worker] == [len(b["events"]) for b in batches]
            decision_ids = [e["id"] for b in batches for e in b["events"] if e["type"] == "decision"]
            decisions_sent = len(decision_ids)
            assert rows(db_url, decisions) == decisions_sent
            shown = sse.records_until(lines, scalar(db_url, select(func.max(stored_batches.c.seq))))
        assert sorted(record["id"] for record in shown if record["type"] == "decision") == sorted(decision_ids)

        window = {"since": int(ts) - 60, "until": int(ts) + 3600}
        assert served_views(collector, window) == reference_views(tmp_path, batches, window)
        assert [rows(db_url, model.__table__) for model in (Deployment, Replica, Source, SourceBatch)] == \
            [3, 15, len(batches), len(batches)]

        text = scrape(collector)
        assert metric(text, "routelens_events_ingested_total", '{type="decision"}') == decisions_sent
        assert metric(text, "routelens_ingest_seconds_count") == len(batches)
        # The routing KPIs, counted by whichever worker stored each batch, summed by every scrape.
        distribution = collector.get("/v1/distribution?" + urllib.parse.urlencode(window))
        for replica in distribution["replicas"]:
            labels = f'{{app="shop",deployment="{replica["deployment"]}",replica="{replica["replica_id"]}"}}'
            assert metric(text, "routelens_routed_requests_total", labels) == replica["routed"]
            assert metric(text, "routelens_replica_member", labels) == 1
        assert sum(metric(text, "routelens_decisions_total", f'{{app="shop",deployment="D{d}"}}')
                   for d in range(3)) == decisions_sent
        for connection in connections:
            connection.close()
    finally:
        collector.stop()


def test_a_batch_sent_to_two_workers_at_once_is_stored_once(db_url, make_source, tmp_path):
    collector = start(db_url)
    try:
        connections = list(connection_to_each(collector.port, worker_pids(collector.process.pid)).values())
        src = make_source("twice")
        ts = time.time() - 600
        batches = [src.batch(traffic(src, ts + i * 20, ["r1", "r2", "r3"], 30)) for i in range(6)]
        answers = send_in_step(connections, [batches for _ in connections])
        for index, batch in enumerate(batches):
            both = [per_worker[index] for per_worker in answers]
            assert sum(a["stored"] for a in both) == len(batch["events"]), both
            assert all(a["stored"] + a["duplicates"] == len(batch["events"]) for a in both), both
        decisions_sent = sum(1 for b in batches for e in b["events"] if e["type"] == "decision")
        assert rows(db_url, decisions) == decisions_sent
        window = {"since": int(ts) - 60, "until": int(ts) + 3600}
        assert served_views(collector, window) == reference_views(tmp_path, batches, window)
        assert rows(db_url, SourceBatch.__table__) == len(batches)
        text = scrape(collector)
        events_sent = sum(len(b["events"]) for b in batches)
        assert metric(text, "routelens_events_duplicate_total") == events_sent
        assert metric(text, "routelens_events_ingested_total", '{type="decision"}') == decisions_sent
        for connection in connections:
            connection.close()
    finally:
        collector.stop()


def test_one_pruner_for_all_workers(tmp_path, make_source):
    """The supervisor prunes; the workers do not (each would, left to create_app)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = Collector(url)
    src = make_source("old")
    old.store(src.batch(traffic(src, time.time() - 3 * 86400, ["r1", "r2"], 25)))
    old.close()
    assert rows(url, decisions) == 25
    collector = start(url, "--retention", "1d")
    try:
        assert metric(scrape(collector), "routelens_retention_pruners") == 1
        deadline = time.monotonic() + 60
        while rows(url, decisions) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert rows(url, decisions) == 0
    finally:
        collector.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_gone(pids: List[int], timeout_s: float = 60) -> List[int]:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


def _metrics_dir(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        variables = dict(item.split(b"=", 1) for item in environ.read().split(b"\0") if b"=" in item)
    return variables[b"PROMETHEUS_MULTIPROC_DIR"].decode()


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_stopping_stops_every_worker_and_removes_the_metrics(tmp_path, how):
    collector = start(f"sqlite:///{tmp_path / 'stop.db'}")
    supervisor = collector.process.pid
    workers = worker_pids(supervisor)
    started = children(supervisor)  # the workers and multiprocessing's resource tracker
    metrics_dir = _metrics_dir(workers[0])
    assert os.path.isdir(metrics_dir)
    if how == "SIGTERM":
        os.kill(supervisor, signal.SIGTERM)
    else:  # a terminal sends SIGINT to every process of its foreground group
        for pid in (supervisor, *workers):
            os.kill(pid, signal.SIGINT)
    assert collector.process.wait(timeout=60) == 0
    assert _wait_gone(started) == []
    assert not os.path.exists(os.path.dirname(metrics_dir))


def test_workers_end_when_the_supervisor_is_killed(tmp_path):
    collector = start(f"sqlite:///{tmp_path / 'kill.db'}")
    workers = worker_pids(collector.process.pid)
    runtime = os.path.dirname(_metrics_dir(workers[0]))
    try:
        collector.kill()  # SIGKILL: nothing of the supervisor runs
        assert _wait_gone(workers) == []
    finally:
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", runtime], check=False)  # no one was left to remove it


@pytest.mark.parametrize("command", ["collector", "up"])
@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_a_bad_worker_count_is_one_line(command, count, tmp_path):
    result = routelens(command, "--db", str(tmp_path / "x.db"), "--workers", count)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    usage, error = result.stderr.rstrip("\n").rsplit("\n", 1)  # argparse's usage, then one line
    assert usage.startswith(f"usage: routelens {command}")
    assert error.startswith(f"routelens {command}: error: argument --workers: ") and repr(count) in error, error
    assert not os.path.exists(tmp_path / "x.db")


def test_a_worker_that_cannot_start_fails_the_command_in_one_line(tmp_path):
    """The supervisor's check passed, then the workers failed: the command
    says why in one line and exits 1, and no worker is left, none restarted."""
    pids_file = tmp_path / "pids"
    script = ("import sys\n"
              "from routelens.collector.cli.server import ServeError, bind, serve_workers\n"
              "from routelens.collector.settings import Settings\n"
              "try:\n"
              "    with bind('127.0.0.1', int(sys.argv[2])) as sock:\n"
              "        serve_workers(Settings(db_url=sys.argv[1]), 'tests.support.worker_apps:failing_app',\n"
              "                      sock, 2, 'serving')\n"
              "except ServeError as exc:\n"
              "    print(f'routelens collector: {exc}', file=sys.stderr)\n"
              "    sys.exit(1)\n")
    result = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'fail.db'}", str(free_port())],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ROUTELENS_TEST_PIDS": str(pids_file), "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stderr
    assert result.stderr == f"serving\nroutelens collector: {FAILURE}\n"
    started = [int(line) for line in pids_file.read_text().split()]
    assert 1 <= len(started) <= 2, started  # each worker at most once: none restarted
    assert _wait_gone(started) == []


def test_up_with_workers_signs_in_on_one_worker_and_serves_on_the_other(tmp_path):
    """The sign-in cookie one worker sets opens the dashboard and the API on another."""
    collector = start(f"sqlite:///{tmp_path / 'up.db'}", "--token", "s3cret", command="up")
    try:
        first, second = connection_to_each(collector.port, worker_pids(collector.process.pid)).values()
        first.request("POST", "/login", body="token=s3cret&next=/",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        signed_in = first.getresponse()
        signed_in.read()
        assert signed_in.status == 303
        cookie = signed_in.getheader("set-cookie").split(";")[0]
        for path in ("/", "/_dash-layout", "/v1/summary"):
            second.request("GET", path)
            refused = second.getresponse()
            refused.read()
            assert refused.status == 401, path
            second.request("GET", path, headers={"Cookie": cookie})
            answer = second.getresponse()
            answer.read()
            assert answer.status == 200, path
        first.close()
        second.close()
    finally:
        collector.stop()
