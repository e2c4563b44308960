"""Load generator processes that talk HTTP to collectors directly, and
record every answer, for the tests in test_collector_faults.py.

    python -m tests.support.http_load post --url URL --seconds S --threads T \\
        --events-per-batch N --out post.json [--ids ids.jsonl]
    python -m tests.support.http_load read --url URL [--url URL2] --seconds S --out read.json

`post`: each thread is one source, POSTing wire-format batches (as
`tests.support.wire_source.WireSource` builds them: decision, routed, completed per
request) back to back, as fast as the collector takes them. Nothing is
retried: a batch whose answer never came (the collector was killed) is
recorded as such, so that the test can check it was stored whole or not at
all. With `--ids`, every batch's event ids and outcome are written there.

`read`: the dashboard's read load: each read endpoint the panels use and the
dashboard's render callback for each view, in a loop, round robin over the
given servers. Every status is counted; bodies of 5xx answers are kept.

Both stop after `--seconds` and write their tally as JSON to `--out`.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import threading
import time
import urllib.parse
import uuid
from collections import Counter

from tests.support.wire_source import WireSource

REPLICAS = [f"replica{i:03d}" for i in range(16)]

# The panels' read endpoints (what the dashboard's views query), over a window
# wide enough to cover everything ingested during the test.
READ_PATHS = ["/v1/summary", "/v1/distribution", "/v1/staleness", "/v1/rank-hits", "/v1/decisions",
              "/v1/sources", "/v1/deployments", "/v1/timeseries"]
VIEWS = ["/", "/distribution", "/staleness", "/rank-hits", "/explorer"]


def _run_threads(worker, count: int) -> float:
    """Runs `worker(n)` in `count` threads until all return; the seconds it took."""
    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - started


def connection(url: str, timeout_s: float) -> http.client.HTTPConnection:
    parsed = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout_s)


def make_batch(source: WireSource, n_events: int) -> dict:
    """A batch of `n_events` events of one source, requests as the tracer records them."""
    events = []
    now = time.time()
    i = 0
    while len(events) < n_events:
        first, second = REPLICAS[i % 16], REPLICAS[(i * 7 + 3) % 16]
        decision = source.decision(now, [[first, second]], candidates={
            first: {"queue_len": i % 5, "queue_len_age_s": 0.01},
            second: {"queue_len": (i + 2) % 5, "queue_len_age_s": 0.02}},
            request_id=f"request-{uuid.uuid4().hex}", internal_request_id=uuid.uuid4().hex)
        routed = source.routed(now, first, decision)
        events += [decision, routed, source.completed(now, first, routed)][:n_events - len(events)]
        i += 1
    return source.batch(events)


def post(args) -> dict:
    tally = {"statuses": Counter(), "errors": Counter(), "bodies_5xx": [], "events_ok": 0, "batches": 0}
    lock = threading.Lock()
    ids_out = open(args.ids, "w") if args.ids else None
    deadline = time.monotonic() + args.seconds

    def running() -> bool:
        return time.monotonic() < deadline and not (args.stop_file and os.path.exists(args.stop_file))

    def worker(number: int):
        source = WireSource(f"poster-{uuid.uuid4().hex[:12]}-{number}", deployment="Bulk")
        conn = None
        while running():
            batch = make_batch(source, args.events_per_batch)
            body = gzip.compress(json.dumps(batch).encode(), 3)
            try:
                if conn is None:
                    conn = connection(args.url, args.timeout)
                conn.request("POST", "/v1/events", body=body,
                             headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
                response = conn.getresponse()
                status, text = response.status, response.read()
                outcome = str(status)
            except (OSError, http.client.HTTPException) as exc:
                # Refused (the collector is down) or cut off mid-request (it was killed).
                if conn is not None:
                    conn.close()
                conn = None
                status, text, outcome = None, b"", type(exc).__name__
            with lock:
                tally["batches"] += 1
                if status is None:
                    tally["errors"][outcome] += 1
                else:
                    tally["statuses"][outcome] += 1
                if status == 200:
                    tally["events_ok"] += len(batch["events"])
                if status is not None and status >= 500 and len(tally["bodies_5xx"]) < 20:
                    tally["bodies_5xx"].append(text.decode("utf-8", "replace")[:300])
                if ids_out is not None:
                    ids_out.write(json.dumps({"outcome": outcome, "ids": [e["id"] for e in batch["events"]]}) + "\n")
            if status is None:
                time.sleep(0.05)  # the collector is away: do not spin on refused connections

    tally["seconds"] = _run_threads(worker, args.threads)
    if ids_out is not None:
        ids_out.close()
    return tally


def dash_render(view: str) -> bytes:
    """The body of the dashboard's render callback for one view, as the page sends it."""
    return json.dumps({
        "output": "..view.children...nav.children...custom-window.children..",
        "outputs": [{"id": "view", "property": "children"}, {"id": "nav", "property": "children"},
                    {"id": "custom-window", "property": "children"}],
        "inputs": [{"id": "url", "property": "pathname", "value": view},
                   {"id": "url", "property": "search", "value": "?window=15m"},
                   {"id": "tick", "property": "n_intervals", "value": 0}],
        "changedPropIds": ["url.pathname"], "state": [],
    }).encode()


def read(args) -> dict:
    tally = {"statuses": Counter(), "errors": Counter(), "bodies_5xx": [], "requests": 0, "by_path": Counter()}
    lock = threading.Lock()
    deadline = time.monotonic() + args.seconds

    def worker(number: int):
        conns = {url: connection(url, args.timeout) for url in args.url}
        i = number
        while time.monotonic() < deadline:
            url = args.url[i % len(args.url)]
            dashboard = args.dashboard and url == args.url[-1] and i % 3 == 0
            if dashboard:
                path, method = "/_dash-update-component", "POST"
                body, headers = dash_render(VIEWS[(i // 3) % len(VIEWS)]), {"Content-Type": "application/json"}
            else:
                path, method, body, headers = READ_PATHS[i % len(READ_PATHS)] + "?window=15m", "GET", None, {}
            i += 1
            try:
                conns[url].request(method, path, body=body, headers=headers)
                response = conns[url].getresponse()
                status, text = response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                conns[url].close()
                conns[url] = connection(url, args.timeout)
                with lock:
                    tally["errors"][type(exc).__name__] += 1
                continue
            with lock:
                tally["requests"] += 1
                tally["statuses"][str(status)] += 1
                tally["by_path"][path.split("?")[0]] += 1
                if status >= 500 and len(tally["bodies_5xx"]) < 20:
                    tally["bodies_5xx"].append(f"{path}: {text.decode('utf-8', 'replace')[:300]}")

    tally["seconds"] = _run_threads(worker, args.threads)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["post", "read"])
    parser.add_argument("--url", action="append", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--events-per-batch", type=int, default=2000)
    parser.add_argument("--ids", help="post: write each batch's outcome and event ids here (JSON lines)")
    parser.add_argument("--stop-file", help="post: stop once this file exists (or at --seconds)")
    parser.add_argument("--dashboard", action="store_true", help="read: the last --url also serves the dashboard")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.mode == "post":
        args.url = args.url[0]
    tally = post(args) if args.mode == "post" else read(args)
    with open(args.out + ".tmp", "w") as out:
        json.dump(tally, out)
    os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
