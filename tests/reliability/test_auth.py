"""The token, everywhere it matters: with one configured, `routelens up`
refuses every endpoint but /healthz and the API docs (README: "every
endpoint but /healthz and /docs") without it, accepts it as a bearer token
(and the dashboard's sign-in cookie), compares it in constant time; without
one, the CLI listens on 127.0.0.1 only, and warns when told to listen wider.

tests/test_collector_ingest.py covers ingest's 401 and its header; the
browser sign-in is in tests/test_dashboard.py.
"""

from __future__ import annotations

import hmac
import os
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from routelens.collector.api.auth import COOKIE, cookie_value
from routelens.collector.settings import Settings
from routelens.dashboard.up import create_up_app
from tests.support.ports import free_port

TOKEN = "s3cret-token-0123456789"
WRONG = "s3cret-token-0123456780"  # same length, last character differs
OPEN = {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
DASH = ["/", "/_dash-layout", "/_dash-dependencies", "/explorer?window=1h"]


@pytest.fixture
def up(tmp_path):
    app = create_up_app(Settings(db_url=f"sqlite:///{tmp_path / 'guarded.db'}", token=TOKEN, retention_s=None))
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as client:
        yield client
    app.state.engine.dispose()


def _api_requests(app):
    """(method, path) of every API route, path parameters filled in."""
    for route in app.routes:
        methods = getattr(route, "methods", None)
        if not methods or route.path in OPEN:
            continue
        path = route.path.replace("{decision_id}", "0196b8a2-7c4e-7000-8000-000000000000")
        for method in methods - {"HEAD"}:
            yield method, path


def _dash_update(client, headers=None, cookies=None):
    # What the page posts when a control changes (the render callback).
    body = {"output": "..view.children...nav.children...custom-window.children..",
            "outputs": [{"id": "view", "property": "children"}, {"id": "nav", "property": "children"},
                        {"id": "custom-window", "property": "children"}], "inputs": [
                {"id": "url", "property": "pathname", "value": "/"},
                {"id": "url", "property": "search", "value": ""},
                {"id": "tick", "property": "n_intervals", "value": None}],
            "changedPropIds": ["url.pathname"]}
    client.cookies.clear()
    return client.post("/_dash-update-component", json=body, headers=headers or {}, cookies=cookies)


def test_every_api_route_but_health_and_docs_wants_the_token(up):
    requests = list(_api_requests(up.app))
    paths = {path for _, path in requests}
    assert {"/v1/events", "/v1/summary", "/v1/export", "/metrics", "/v1/decisions"} <= paths
    for method, path in requests:
        for headers in ({}, {"authorization": f"Bearer {WRONG}"}, {"authorization": f"Basic {TOKEN}"},
                        {"authorization": TOKEN}, {"cookie": f"{COOKIE}={cookie_value(WRONG)}"}):
            response = up.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.status_code)
        bearer = up.request(method, path, headers={"authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code != 401, (method, path)
    for path in OPEN - {"/docs/oauth2-redirect"}:
        assert up.get(path).status_code == 200, path


def test_metrics_and_export_accept_the_bearer_token_and_the_sign_in_cookie(up):
    for path in ("/metrics", "/v1/export?format=csv", "/v1/summary"):
        assert up.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        up.cookies.clear()
        assert up.get(path, cookies={COOKIE: cookie_value(TOKEN)}).status_code == 200, path


def test_the_dashboard_and_its_callbacks_want_the_token_or_the_cookie(up):
    for path in DASH:
        up.cookies.clear()
        refused = up.get(path)
        assert refused.status_code == 401 and 'name="token"' in refused.text, path  # the sign-in page
        assert up.get(path, headers={"authorization": f"Bearer {WRONG}"}).status_code == 401, path
        assert up.get(path, cookies={COOKIE: cookie_value(WRONG)}).status_code == 401, path
        assert up.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        up.cookies.clear()
        assert up.get(path, cookies={COOKIE: cookie_value(TOKEN)}).status_code == 200, path
    assert _dash_update(up).status_code == 401
    assert _dash_update(up, headers={"authorization": f"Bearer {WRONG}"}).status_code == 401
    assert _dash_update(up, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert _dash_update(up, cookies={COOKIE: cookie_value(TOKEN)}).status_code == 200


def test_signing_in_with_a_wrong_token_of_the_same_length_sets_no_cookie(up):
    up.cookies.clear()
    wrong = up.post("/login", data={"token": WRONG, "next": "/"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    right = up.post("/login", data={"token": TOKEN, "next": "/explorer"})
    assert right.status_code == 303 and right.headers["location"] == "/explorer"
    assert f"{COOKIE}={cookie_value(TOKEN)}" in right.headers["set-cookie"]


def test_the_token_is_compared_in_constant_time(up, monkeypatch):
    """Every check goes through hmac.compare_digest, and its answer decides:
    with it answering "different", even the right token is refused."""
    calls = []
    real = hmac.compare_digest

    def recording(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    assert up.get("/v1/summary", headers={"authorization": f"Bearer {WRONG}"}).status_code == 401
    assert (WRONG.encode(), TOKEN.encode()) in calls
    up.cookies.clear()
    assert up.get("/", cookies={COOKIE: cookie_value(WRONG)}).status_code == 401
    assert (cookie_value(WRONG).encode(), cookie_value(TOKEN).encode()) in calls
    up.post("/login", data={"token": WRONG})
    assert (WRONG.encode(), TOKEN.encode()) in calls[-1:]

    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    up.cookies.clear()
    assert up.get("/v1/summary", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 401
    assert up.get("/", cookies={COOKIE: cookie_value(TOKEN)}).status_code == 401
    assert up.post("/login", data={"token": TOKEN}).status_code == 401


# --- the real CLI: where it listens, and what it says ---

def _listening_addresses(port: int) -> set:
    """Local addresses of the sockets listening on `port` (/proc/net/tcp, state 0A)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def _run_up(tmp_path, *args) -> tuple:
    """`routelens up` until it answers /healthz; its listening addresses and its stderr."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ROUTELENS_TOKEN"}
    server = subprocess.Popen([sys.executable, "-m", "routelens.collector.cli", "up", "--db", str(tmp_path / "cli.db"),
                               "--port", str(port), *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              env=env, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "routelens up did not start"
            time.sleep(0.1)
        addresses = _listening_addresses(port)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    return addresses, stderr


def test_without_a_token_the_cli_listens_on_loopback_only_and_says_nothing_alarming(tmp_path):
    addresses, stderr = _run_up(tmp_path)
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, and nothing else
    assert "dashboard at http://127.0.0.1:" in stderr and "warning" not in stderr


def test_listening_wider_without_a_token_warns_and_with_one_does_not(tmp_path):
    addresses, stderr = _run_up(tmp_path, "--host", "0.0.0.0")
    assert addresses == {"00000000"}, addresses
    assert "warning: listening on 0.0.0.0 without a token" in stderr, stderr
    _, stderr = _run_up(tmp_path, "--host", "0.0.0.0", "--token", TOKEN)
    assert "warning" not in stderr, stderr
