"""Dashboard refresh time in a real browser, with 10,000,000 decisions loaded.

Serves `routelens up` (the real command, in a child process) on the database
`bench/queries.py` builds (10 million decisions over 50 replicas and 7 days,
cached in /tmp), and times in headless Chromium a full refresh of the
overview, distribution, staleness and rank-hit views for the last 24 h of the
data: from navigation until every callback has answered and every chart is
drawn. Target: <= 1.5 s each.

Machines are shared and noisy: as a baseline measured in the same run, the
same refresh of a page with nothing to compute (the dashboard of an empty
database) is timed too, and each view's time is also given as a ratio to it.

    .venv/bin/python bench/dashboard.py [--decisions 10000000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from playwright.sync_api import Page, sync_playwright  # noqa: E402
from queries import FULL, database  # noqa: E402

from routelens.collector.cli.server_process import ServerProcess  # noqa: E402
from tests.support.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

TARGET_S = 1.5
DAY = 86400.0
# Each view and the element drawn last: its last chart.
VIEWS = {"": "#overview-traffic .main-svg", "distribution": "#distribution-shares .main-svg",
         "staleness": "#staleness-heatmap .main-svg", "rank-hits": "#rank-hits-handoffs .main-svg"}


def refresh(page: Page, url: str, drawn: str) -> float:
    """Seconds from navigation until `drawn` is on the page and no callback is pending."""
    started = time.perf_counter()
    page.goto(url)
    page.wait_for_selector(drawn, timeout=60_000)
    page.wait_for_function("!document.querySelector('[data-dash-is-loading=\"true\"]')", timeout=60_000)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=FULL)
    parser.add_argument("--runs", type=int, default=5, help="refreshes per view; the median is shown")
    args = parser.parse_args()
    path, info = database(args.decisions)
    window = f"since={info['end'] - DAY}&until={info['end']}"
    full = ServerProcess(f"sqlite:///{path}", free_port(), command="up").start()
    empty = ServerProcess(f"sqlite:///{os.path.join(tempfile.mkdtemp(prefix='routelens-bench-dash-'), 'empty.db')}",
                          free_port(), command="up").start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            times = {}
            for view, drawn in [("(empty database)", "#empty-state")] + list(VIEWS.items()):
                server, url_view = (empty, "") if view == "(empty database)" else (full, view)
                url = f"{server.url}/{url_view}?{window}"
                refresh(page, url, drawn)  # warm: the server's caches, the browser's scripts
                times[view] = statistics.median(refresh(page, url, drawn) for _ in range(args.runs))
            browser.close()
    finally:
        full.stop()
        empty.stop()
    baseline = times.pop("(empty database)")
    print(f"{info['decisions']:,} decisions; 24 h window ({window}); median of {args.runs} full refreshes "
          f"in headless Chromium")
    print(f"  baseline, the dashboard of an empty database: {baseline:.3f} s")
    for view, seconds in times.items():
        print(f"  {view or 'overview':13s} {seconds:6.3f} s  ({seconds / baseline:4.1f} x baseline)  target <= "
              f"{TARGET_S} s: {'met' if seconds <= TARGET_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
