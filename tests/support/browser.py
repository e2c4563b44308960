"""A real headless Chromium for the dashboard's browser tests, driven by Playwright.

The browser is Debian's `chromium` (/usr/bin/chromium, or $ROUTELENS_CHROMIUM),
never one Playwright downloads: `scripts/system-deps.sh` installs it. Fixtures
(registered in tests/conftest.py):

- `browser` (session): one Chromium for the session. Skipped where Chromium or
  Playwright is missing, except in CI (CI set), where that is a failure, as
  for PostgreSQL.
- `page` (function): a new context and page, 1440x900. `page.console_errors`
  lists the console errors and uncaught page errors, as strings, so that
  tests can assert there are none.
- `playwright_loop` (autouse): see below; conftest imports it with the others.

Playwright's sync API runs an asyncio loop in a greenlet and, between its calls,
leaves that loop marked as the main thread's running loop. Left so for the
session, every later test that calls `asyncio.run()` fails ("cannot be called
from a running event loop"), and Ray or anything else asking for the running
loop would get Playwright's. Cleared, the next Playwright call kills its
connection. So the mark is set only while a test that uses `browser` (or
`page`) runs, with its function-scoped fixtures, and when the session closes
the browser. Fixtures of wider scope must not drive the browser.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from typing import List

import pytest

from tests.support.system_deps import require

DEFAULT_CHROMIUM = "/usr/bin/chromium"

# Headless, and nothing that reaches the network on its own (component and
# safe-browsing updates, sync, QUIC probes): the tests see only their own servers.
# --no-sandbox: the tests may run as root, where Chromium's sandbox refuses to start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

VIEWPORT = {"width": 1440, "height": 900}


class ChromiumUnavailable(RuntimeError):
    """The browser tests cannot run here; the message says what is missing."""


def chromium_path() -> str:
    """Debian's Chromium, or the browser $ROUTELENS_CHROMIUM names."""
    return os.environ.get("ROUTELENS_CHROMIUM") or DEFAULT_CHROMIUM


def check_available(path: str = None) -> None:
    """Raise `ChromiumUnavailable` unless Playwright can launch Chromium from `path`."""
    path = path or chromium_path()
    found = shutil.which(path)
    if found is None or not os.access(found, os.X_OK):
        raise ChromiumUnavailable(f"no Chromium executable at {path} (install Debian's chromium: "
                                  "apt-get install chromium, or run scripts/system-deps.sh as root; "
                                  "or set ROUTELENS_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        raise ChromiumUnavailable(f"Playwright for Python is not installed ({exc}): "
                                  "pip install 'playwright>=1.40' (in the test extra)") from None


# Playwright's loop, while it runs: what `_enter` marks as running.
_loop = None


def _enter() -> None:
    """Mark Playwright's loop as the running loop again, before calls into Playwright."""
    if _loop is not None and not _loop.is_closed():
        asyncio._set_running_loop(_loop)


def _leave() -> None:
    """Unmark it, so that code outside the browser tests sees no running loop."""
    if _loop is not None and asyncio._get_running_loop() is _loop:
        asyncio._set_running_loop(None)


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium, headless, for the session. Skipped where it is not
    installed, except in CI (CI set), where that is a failure."""
    global _loop
    require(check_available, ChromiumUnavailable, "CI must run the browser tests", "Chromium unavailable")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    _loop = asyncio._get_running_loop()  # None if a later Playwright stops marking it
    try:
        chromium = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        _leave()  # until `playwright_loop` sets it for a test
        try:
            yield chromium
        finally:
            _enter()
            chromium.close()
    finally:
        _enter()
        playwright.stop()
        _leave()
        _loop = None


@pytest.fixture(autouse=True)
def playwright_loop(request):
    """Set Playwright's running-loop mark for the tests that use `browser` (set up
    first of the function-scoped fixtures, torn down last); clear it for all others."""
    if "browser" in request.fixturenames:
        _enter()
        try:
            yield
        finally:
            _leave()
    else:
        _leave()
        yield


def _where(message) -> str:
    """Where a console message comes from: url:line (for a failed load, the resource)."""
    location = message.location or {}
    return f"{location.get('url') or '?'}:{location.get('lineNumber', '?')}"


@pytest.fixture
def page(browser):
    """A page in a context of its own (1440x900); `page.console_errors` collects
    console errors ("console: <text> (<url>:<line>)") and uncaught exceptions
    ("pageerror: <error>")."""
    context = browser.new_context(viewport=VIEWPORT)
    try:
        page = context.new_page()
        errors = []
        page.console_errors = errors
        page.on("console", lambda message: errors.append(f"console: {message.text} ({_where(message)})")
                if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(f"pageerror: {error}"))
        yield page
    finally:
        context.close()


def shown_text(page, selector: str) -> str:
    """The text of an element, once it is on the page."""
    page.wait_for_selector(selector)
    return page.inner_text(selector).strip()


def shown_rows(page, table: str) -> List[List[str]]:
    """The cells of a table's body rows, once it has one."""
    page.wait_for_selector(f"{table} tbody tr")
    return [[cell.strip() for cell in row.split("\t")]
            for row in page.inner_text(f"{table} tbody").strip().splitlines()]


def downloaded(page, selector: str) -> str:
    """The text of the file a click on `selector` downloads."""
    with page.expect_download() as download:
        page.click(selector)
    with open(download.value.path(), encoding="utf-8") as f:
        return f.read()
