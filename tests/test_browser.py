"""The browser fixtures (tests/browser.py) on tiny pages from a local HTTP server:
a click changes the page, and the page's errors reach `page.console_errors`."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.browser import ChromiumUnavailable, check_available
from tests.support.ports import free_port

PAGES = {
    "/button": """<!doctype html><html><head><title>button</title></head><body>
<p id="status">not clicked</p>
<button id="go" onclick="document.getElementById('status').textContent = 'clicked'">Go</button>
<script>console.log("a log line"); console.warn("a warning");</script>
</body></html>""",
    "/broken": """<!doctype html><html><head><title>broken</title></head><body>
<p>broken</p>
<script>console.error("logged by the page");</script>
<script>throw new Error("thrown by the page");</script>
</body></html>""",
}


class _Pages(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/favicon.ico":  # Chromium asks for it; a 404 would log a console error
            self.send_response(204)
            self.end_headers()
            return
        body = PAGES.get(self.path)
        if body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def site():
    """The base URL of a server for PAGES on 127.0.0.1."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_click_changes_the_page(page, site):
    from playwright.sync_api import expect

    page.goto(f"{site}/button")
    status = page.locator("#status")
    expect(status).to_have_text("not clicked")
    page.click("#go")
    expect(status).to_have_text("clicked")
    assert page.viewport_size == {"width": 1440, "height": 900}
    # Logs and warnings are no errors.
    assert page.console_errors == []


def test_page_errors_are_recorded(page, site):
    with page.expect_event("pageerror"):
        page.goto(f"{site}/broken")
    assert any(e.startswith("console: ") and "logged by the page" in e for e in page.console_errors), \
        page.console_errors
    assert any(e.startswith("pageerror: ") and "thrown by the page" in e for e in page.console_errors), \
        page.console_errors


def test_each_page_starts_without_errors(page, site):
    # Follows the broken page: nothing carries over from one test's page to the next.
    assert page.console_errors == []
    page.goto(f"{site}/button")
    assert page.title() == "button"
    assert page.console_errors == []


def test_missing_chromium_names_what_to_install(tmp_path):
    with pytest.raises(ChromiumUnavailable, match="apt-get install chromium"):
        check_available(str(tmp_path / "no-such-chromium"))


def test_asyncio_runs_after_a_browser_test():
    # Follows the browser tests: Playwright's loop must not look like the running one
    # (tests/browser.py, `playwright_loop`), or asyncio.run() refuses to start.
    async def answer():
        return 42

    assert asyncio._get_running_loop() is None
    assert asyncio.run(answer()) == 42
