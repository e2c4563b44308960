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
import math
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
# The image's name, the view, the extra query, the element that shows it is drawn, and the panel
# scrolled to the top of the image (None: the view's top).
SHOTS = [
    ("overview", "", "", "#overview-traffic .main-svg", None),
    ("distribution", "distribution", "", "#distribution-shares .main-svg", None),
    ("staleness", "staleness", "", "#staleness-heatmap .main-svg", None),
    ("rank-hits", "rank-hits", "", "#rank-hits-handoffs .main-svg", None),
    ("rank-hits-reasons", "rank-hits", "", "#rank-hits-reasons-over-time .main-svg", "#rank-hits-reasons"),
    ("prefix-affinity", "prefix-affinity", "", "#prefix-affinity-groups-chart .main-svg", None),
    ("explorer", "explorer", "decision={decision}", "#decision-candidates", None),
    ("compare", "compare", "compare_shift=previous", "#compare-ranks .main-svg", None),
    ("whatif", "whatif", "replay={replay}", "#whatif-shares-0 .main-svg", None),
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
        if end is None:
            # A database's data ends with its newest decision (to the next whole minute), not now: shot
            # any time after the demo that recorded it, the views show the same.
            newest = httpx.get(f"{up.url}/v1/decisions", params={"since": 0, "limit": 1}).json()["decisions"]
            if not newest:
                raise SystemExit(f"{args.db} holds no decisions: nothing to show")
            end = math.ceil(newest[0]["ts"] / 60) * 60
        window = f"since={end - parse_duration(args.window)}&until={end}"
        params = dict(pair.split("=") for pair in window.split("&"))
        decisions = httpx.get(f"{up.url}/v1/decisions", params={**params, "limit": 50}).json()["decisions"]
        replays = httpx.get(f"{up.url}/v1/replays", params={"limit": 1}).json()["replays"]
        # What a view's extra query names: the newest decision in the window (one its router said why
        # of, if there is one among the newest), the newest replay stored.
        explained = [d for d in decisions if d["reason"] is not None]
        chosen = {"decision": (explained or decisions)[0]["id"] if decisions else None,
                  "replay": replays[0]["id"] if replays else None}
        # The shots of what only some routers record: reasons (routelens_explain), prefix groups (an
        # LLM router's: the demo's llm app).
        reasons = httpx.get(f"{up.url}/v1/rank-hits", params=params).json()["reasons"]["deployments"]
        prefix_groups = httpx.get(f"{up.url}/v1/prefix-affinity", params=params).json()["groups"]
        nothing_to_show = {"rank-hits-reasons": not any(d["explained"] for d in reasons),
                           "prefix-affinity": not prefix_groups}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            for name, view, extra, drawn, top in SHOTS:
                if nothing_to_show.get(name) or any(
                        "{" + key + "}" in extra and value is None for key, value in chosen.items()):
                    continue  # no decision in the window, no replay stored, or none of what it shows
                query = "&".join(q for q in (window, extra.format(**chosen)) if q)
                page.goto(f"{up.url}/{view}?{query}")
                page.wait_for_selector(drawn, timeout=60_000)
                page.wait_for_function("!document.querySelector('[data-dash-is-loading=\"true\"]')")
                page.wait_for_timeout(500)  # charts finish their transitions
                if top:
                    page.locator(top).evaluate("element => element.closest('section').scrollIntoView()")
                path = os.path.join(OUT, f"{name}.png")
                page.screenshot(path=path)
                print(f"wrote {os.path.relpath(path, ROOT)}")
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
