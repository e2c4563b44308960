"""Screenshots of every dashboard view at 1440x900, into docs/screenshots/.

    .venv/bin/python scripts/screenshots.py                  # a small synthetic week (bench/queries.py's load)
    .venv/bin/python scripts/screenshots.py --db sqlite:///routelens-demo/routelens.db --window 15m

Serves `routelens up` on the database (the real command, in a child
process) and drives Debian's Chromium as the browser tests do. Without --db, it builds
(once, cached in /tmp) the benchmarks' synthetic database with 200,000
decisions and shows the last 24 h of it.
"""

from __future__ import annotations

import argparse
import os
import sys

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)

from playwright.sync_api import sync_playwright  # noqa: E402

from routelens.collector.cli.server_process import ServerProcess  # noqa: E402
from routelens.collector.settings import parse_duration  # noqa: E402
from tests.support.browser import CHROMIUM_ARGS, chromium_path  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

OUT = os.path.join(ROOT, "docs", "screenshots")
# View, the extra query, and the element that shows it is drawn.
SHOTS = [
    ("overview", "", "#overview-traffic .main-svg"),
    ("distribution", "", "#distribution-shares .main-svg"),
    ("staleness", "", "#staleness-heatmap .main-svg"),
    ("rank-hits", "", "#rank-hits-handoffs .main-svg"),
    ("prefix-affinity", "", "#prefix-affinity-groups-chart .main-svg"),
    ("explorer", "decision={decision}", "#decision-candidates"),
    ("compare", "compare_shift=previous", "#compare-ranks .main-svg"),
    ("whatif", "replay={replay}", "#whatif-shares-0 .main-svg"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", help="a routelens database URL (default: a synthetic one)")
    parser.add_argument("--window", default="24h", help="window ending at the data's end (default: %(default)s)")
    args = parser.parse_args()
    if args.db:
        db_url, end = args.db, None
    else:
        from queries import database

        path, info = database(200_000)
        db_url, end = f"sqlite:///{path}", info["end"]
    os.makedirs(OUT, exist_ok=True)
    with ServerProcess(db_url, free_port(), command="up") as up:
        # The synthetic data ended before now: a window that ends with it.
        window = f"since={end - parse_duration(args.window)}&until={end}" if end else f"window={args.window}"
        params = dict(pair.split("=") for pair in window.split("&"))
        decisions = httpx.get(f"{up.url}/v1/decisions", params={**params, "limit": 1}).json()["decisions"]
        replays = httpx.get(f"{up.url}/v1/replays", params={"limit": 1}).json()["replays"]
        # What a view's extra query names: the newest decision in the window, the newest replay stored.
        chosen = {"decision": decisions[0]["id"] if decisions else None,
                  "replay": replays[0]["id"] if replays else None}
        # Prefix affinity draws only requests with a prefix group (an LLM router's: the demo's llm app).
        prefix_groups = httpx.get(f"{up.url}/v1/prefix-affinity", params=params).json()["groups"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            for view, extra, drawn in SHOTS:
                if any("{" + name + "}" in extra and value is None for name, value in chosen.items()):
                    continue  # nothing to show: no decision in the window, or no replay stored
                if view == "prefix-affinity" and not prefix_groups:
                    continue
                query = "&".join(q for q in (window, extra.format(**chosen)) if q)
                page.goto(f"{up.url}/{'' if view == 'overview' else view}?{query}")
                page.wait_for_selector(drawn, timeout=60_000)
                page.wait_for_function("!document.querySelector('[data-dash-is-loading=\"true\"]')")
                page.wait_for_timeout(500)  # charts finish their transitions
                path = os.path.join(OUT, f"{view}.png")
                page.screenshot(path=path)
                print(f"wrote {os.path.relpath(path, ROOT)}")
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
