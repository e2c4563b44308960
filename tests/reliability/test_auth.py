"""The token, everywhere it matters: with one configured, `routelens up`
refuses every endpoint but /healthz and the API docs (docs/collector.md: "every
endpoint but /healthz and /docs") without it, accepts it as a bearer token
(and the dashboard's sign-in cookie), compares it in constant time; without
one, the CLI listens on 127.0.0.1 only, and warns when told to listen wider.

tests/test_collector_ingest.py covers ingest's 401 and its header; the
browser sign-in is in tests/test_dashboard.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from routelens.collector.api.auth import SESSION, TokenAuth, session_signer
from routelens.collector.settings import Settings
from routelens.dashboard.up import create_up_app
from routelens.routers.delivery import CollectorClient
from routelens.routers.spool import Spool
from tests.support.collector_server import CollectorServer
from tests.support.ports import free_port
from tests.support.wire_source import WireSource

TOKEN = "s3cret-token-0123456789"
WRONG = "s3cret-token-0123456780"  # same length, last character differs
OPEN = {"/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
DASH = ["/", "/_dash-layout", "/_dash-dependencies", "/explorer?window=1h"]
LIFETIME = Settings().session_lifetime_s
COOKIE = TokenAuth(TOKEN, LIFETIME).cookie_name


def _session(signing_token: str = TOKEN, seconds_ago: int = 0) -> str:
    """A Cookie header: this server's session cookie, signed with `signing_token` `seconds_ago`."""
    signer = session_signer(signing_token)
    signer.get_timestamp = lambda: int(time.time()) - seconds_ago
    return f"{COOKIE}={signer.sign(SESSION).decode()}"


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


def _dash_update(client, headers=None):
    # What the page posts when a control changes (the render callback).
    body = {"output": "..view.children...nav.children...custom-window.children..",
            "outputs": [{"id": "view", "property": "children"}, {"id": "nav", "property": "children"},
                        {"id": "custom-window", "property": "children"}], "inputs": [
                {"id": "url", "property": "pathname", "value": "/"},
                {"id": "url", "property": "search", "value": ""},
                {"id": "tick", "property": "n_intervals", "value": None}],
            "changedPropIds": ["url.pathname"]}
    client.cookies.clear()
    return client.post("/_dash-update-component", json=body, headers=headers or {})


def _streams(client) -> set:
    """The paths whose answer is an event stream, which never ends (GET /v1/tail)."""
    spec = client.get("/openapi.json").json()
    return {path for path, item in spec["paths"].items() for operation in item.values()
            if "text/event-stream" in operation["responses"].get("200", {}).get("content", {})}


def test_every_api_route_but_health_and_docs_wants_the_token(up):
    requests = list(_api_requests(up.app))
    paths = {path for _, path in requests}
    assert {"/v1/events", "/v1/summary", "/v1/export", "/metrics", "/v1/decisions", "/v1/tail"} <= paths
    streams = _streams(up)
    assert streams == {"/v1/tail"}
    for method, path in requests:
        # A stream is asked with a window that cannot be: past the token, it answers 422 at once, where
        # the stream would never end (in process, the test client reads an answer whole).
        path += "?since=never" if path in streams else ""
        for headers in ({}, {"authorization": f"Bearer {WRONG}"}, {"authorization": f"Basic {TOKEN}"},
                        {"authorization": TOKEN}, {"cookie": _session(WRONG)}):
            response = up.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.status_code)
        bearer = up.request(method, path, headers={"authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code != 401, (method, path)
        if path.endswith("?since=never"):
            assert bearer.status_code == 422 and "since" in bearer.text, (method, path, bearer.text)
    for path in OPEN - {"/docs/oauth2-redirect"}:
        assert up.get(path).status_code == 200, path


def test_metrics_and_export_accept_the_bearer_token_and_the_sign_in_cookie(up):
    for path in ("/metrics", "/v1/export?format=csv", "/v1/summary"):
        assert up.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        up.cookies.clear()
        assert up.get(path, headers={"cookie": _session()}).status_code == 200, path


def test_the_dashboard_and_its_callbacks_want_the_token_or_the_cookie(up):
    for path in DASH:
        up.cookies.clear()
        refused = up.get(path)
        assert refused.status_code == 401 and 'name="token"' in refused.text, path  # the sign-in page
        assert up.get(path, headers={"authorization": f"Bearer {WRONG}"}).status_code == 401, path
        assert up.get(path, headers={"cookie": _session(WRONG)}).status_code == 401, path
        assert up.get(path, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        up.cookies.clear()
        assert up.get(path, headers={"cookie": _session()}).status_code == 200, path
    assert _dash_update(up).status_code == 401
    assert _dash_update(up, headers={"authorization": f"Bearer {WRONG}"}).status_code == 401
    assert _dash_update(up, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert _dash_update(up, headers={"cookie": _session()}).status_code == 200


def test_signing_in_with_a_wrong_token_of_the_same_length_sets_no_cookie(up):
    up.cookies.clear()
    wrong = up.post("/login", data={"token": WRONG, "next": "/"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    right = up.post("/login", data={"token": TOKEN, "next": "/explorer"})
    assert right.status_code == 303 and right.headers["location"] == "/explorer"
    assert right.headers["set-cookie"].startswith(f"{COOKIE}=")


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
    assert up.get("/", headers={"cookie": _session(WRONG)}).status_code == 401
    assert len(calls) == 2  # the cookie's signature too (itsdangerous)
    up.post("/login", data={"token": WRONG})
    assert (WRONG.encode(), TOKEN.encode()) in calls[-1:]

    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    up.cookies.clear()
    assert up.get("/v1/summary", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 401
    assert up.get("/", headers={"cookie": _session()}).status_code == 401
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


def _run_up(tmp_path, *args, probe=lambda port: None) -> tuple:
    """`routelens up` until it answers /healthz; its listening addresses, its
    stderr, and what `probe(port)` found while it served."""
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
        found = probe(port)
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    return addresses, stderr, found


def test_without_a_token_the_cli_listens_on_loopback_only_and_says_nothing_alarming(tmp_path):
    addresses, stderr, _ = _run_up(tmp_path)
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, and nothing else
    assert "dashboard at http://127.0.0.1:" in stderr and "warning" not in stderr


def test_listening_wider_without_a_token_warns_and_with_one_does_not(tmp_path):
    addresses, stderr, _ = _run_up(tmp_path, "--host", "0.0.0.0")
    assert addresses == {"00000000"}, addresses
    assert "warning: listening on 0.0.0.0 without a token" in stderr, stderr
    _, stderr, _ = _run_up(tmp_path, "--host", "0.0.0.0", "--token", TOKEN)
    assert "warning" not in stderr, stderr



def test_the_cli_serves_the_host_names_it_is_told_to_and_no_others(tmp_path):
    """`--allow-host`, through `--workers 2` (whose processes get the settings as JSON)."""
    def answers(port):
        return {host: httpx.get(f"http://127.0.0.1:{port}/v1/summary", headers={"host": f"{host}:{port}"}).status_code
                for host in ("dash.example", "api.corp.example", "rebound.example", "localhost")}

    _, stderr, found = _run_up(tmp_path, "--allow-host", "Dash.Example", "--allow-host", "*.corp.example",
                               "--workers", "2", probe=answers)
    assert found == {"dash.example": 200, "api.corp.example": 200, "rebound.example": 400, "localhost": 200}, stderr


@pytest.mark.parametrize("args", [("--allow-host", "a*b"), ("--allow-host", "dash.example:8321"),
                                  ("--allow-host", ""), ("--session-lifetime", "0s")])
def test_a_bad_host_name_or_lifetime_is_a_usage_error(tmp_path, args):
    done = subprocess.run([sys.executable, "-m", "routelens.collector.cli", "up", "--db", str(tmp_path / "x.db"),
                           *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert args[0] in done.stderr and not (tmp_path / "x.db").exists()


# --- sign-in on the real server (uvicorn, real sockets): issue 24, point 7 ---

def _up_settings(tmp_path, **settings) -> Settings:
    return Settings(db_url=f"sqlite:///{tmp_path / 'served.db'}", retention_s=None, **settings)


@pytest.fixture
def served(tmp_path):
    """`routelens up` with the token, on uvicorn; a client that follows no redirects and keeps no cookies."""
    with CollectorServer(_up_settings(tmp_path, token=TOKEN), app_factory=create_up_app) as server, \
            httpx.Client(base_url=server.url, follow_redirects=False) as client:
        yield client


def _sign_in(client, token: str = TOKEN, next_path: str = "/") -> httpx.Response:
    client.cookies.clear()
    return client.post("/login", data={"token": token, "next": next_path})


def _session_cookie(client, token: str = TOKEN) -> str:
    """`name=value` of the cookie a right sign-in sets."""
    response = _sign_in(client, token)
    assert response.status_code == 303, response.text
    pair = response.headers["set-cookie"].split(";")[0]
    client.cookies.clear()
    return pair


@pytest.mark.parametrize("other", ['x={"a":1}', "x=a b", "x=é", "x", 'x="unterminated', "=; ;"])
def test_another_apps_cookie_does_not_undo_a_sign_in(served, other):
    """A browser sends every cookie of the host, other local apps' too, in
    one header; one that Python's SimpleCookie cannot parse, before ours,
    made every request after a right sign-in a 401 (a sign-in loop)."""
    session = _session_cookie(served)
    for cookie in (f"{other}; {session}", f"{session}; {other}"):
        for path in ("/", "/v1/summary", "/v1/export?format=csv"):
            response = served.get(path, headers={"cookie": cookie.encode()})
            assert response.status_code == 200, (cookie, path, response.status_code)


@pytest.mark.parametrize("next_path", [
    "/\\evil.com", "/\t/evil.com", "/\n/evil.com", "\\/evil.com", "//evil.com", "///evil.com", "https://evil.com",
    "http:/evil.com", "evil.com", " /x", "/é", "", "/\r\nSet-Cookie: planted=1", "/x\r\nLocation: //evil.com",
])
def test_after_sign_in_only_a_path_of_this_server_is_followed(served, next_path):
    """Browsers drop tabs and newlines from a URL and read a backslash as a
    slash: `/\\evil.com` and `/<tab>/evil.com` are evil.com to them. A CR LF
    in `next` crashed the response (500). Anything but a plain path goes to /."""
    response = _sign_in(served, next_path=next_path)
    assert response.status_code == 303, (next_path, response.status_code)
    assert response.headers["location"] == "/", next_path
    assert "planted" not in response.headers.get("set-cookie", "")


@pytest.mark.parametrize("next_path", ["/", "/explorer", "/distribution?window=24h&app=shop",
                                       "/explorer?decision=0196b8a2-7c4e-7000-8000-000000000000#top"])
def test_after_sign_in_a_path_of_this_server_is_followed(served, next_path):
    response = _sign_in(served, next_path=next_path)
    assert response.status_code == 303 and response.headers["location"] == next_path


def test_the_session_cookie_is_not_accepted_for_ingest(served):
    """Ingest is the tracer's: it sends the bearer token. A browser's session
    (which a cross-site form could ride on) cannot write events."""
    session = _session_cookie(served)
    refused = served.post("/v1/events", content=b"{}", headers={"cookie": session, "content-type": "application/json"})
    assert refused.status_code == 401
    bearer = served.post("/v1/events", content=b"{}",
                         headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert bearer.status_code == 422  # past the token: the empty batch is refused for what it is


def test_two_servers_on_one_host_keep_their_own_sign_in(tmp_path):
    """Cookies are per host, not per port: the second server's sign-in
    overwrote the first's cookie, signing the browser out of the first."""
    with CollectorServer(_up_settings(tmp_path, token=TOKEN), app_factory=create_up_app) as first, \
            CollectorServer(Settings(db_url=f"sqlite:///{tmp_path / 'other.db'}", token=WRONG, retention_s=None),
                            app_factory=create_up_app) as second, \
            httpx.Client(follow_redirects=False) as browser:  # one cookie jar, as a browser has
        assert browser.post(first.url + "/login", data={"token": TOKEN}).status_code == 303
        assert browser.post(second.url + "/login", data={"token": WRONG}).status_code == 303
        assert browser.get(first.url + "/").status_code == 200
        assert browser.get(second.url + "/").status_code == 200


def test_the_session_cookie_is_signed_and_expires(tmp_path):
    """The cookie was an unsalted SHA-256 of the token: good forever, and the
    same for every server with that token. It is now signed (itsdangerous),
    with its time, and good for `session_lifetime_s` (a short one here)."""
    settings = _up_settings(tmp_path, token=TOKEN, session_lifetime_s=60)
    with CollectorServer(settings, app_factory=create_up_app) as server, \
            httpx.Client(base_url=server.url, follow_redirects=False) as client:
        set_cookie = _sign_in(client).headers["set-cookie"]
        name, value = set_cookie.split(";")[0].split("=", 1)
        assert name == COOKIE and name.startswith("routelens_session_") and TOKEN not in set_cookie
        assert {"Max-Age=60", "Path=/", "HttpOnly", "SameSite=Strict"} <= {a.strip() for a in set_cookie.split(";")}
        client.cookies.clear()
        old_digest = hashlib.sha256(b"routelens-dashboard:" + TOKEN.encode()).hexdigest()  # the cookie before
        for cookie, status in ((f"{name}={value}", 200), (_session(seconds_ago=30), 200),
                               (_session(seconds_ago=61), 401), (_session(seconds_ago=-3600), 401),
                               (_session(WRONG), 401), (f"{name}={value[:-1]}x", 401), (f"{name}={old_digest}", 401),
                               (f"{name}=", 401), (f"{name}={SESSION.decode()}", 401)):
            for path in ("/", "/v1/summary"):
                assert client.get(path, headers={"cookie": cookie}).status_code == status, (cookie, path)


NON_ASCII = "tökén-€-0123456789"


def test_a_non_ascii_token_is_compared_as_utf8_bytes(tmp_path):
    """curl, httpx and browsers send a header's and a form's characters as
    UTF-8; the header used to be read as latin-1 and the token as UTF-8."""
    with CollectorServer(_up_settings(tmp_path, token=NON_ASCII), app_factory=create_up_app) as server, \
            httpx.Client(base_url=server.url, follow_redirects=False) as client:
        utf8 = client.get("/v1/summary", headers={"authorization": b"Bearer " + NON_ASCII.encode()})
        assert utf8.status_code == 200
        latin1 = client.get("/v1/summary", headers={"authorization": b"Bearer " + NON_ASCII.encode("cp1252")})
        assert latin1.status_code == 401
        assert _sign_in(client, NON_ASCII).status_code == 303


def test_without_a_token_a_host_name_not_of_this_machine_is_refused(tmp_path):
    """DNS rebinding: a web page whose name the attacker points at 127.0.0.1
    reaches a local dashboard, with its own name in the Host header."""
    with CollectorServer(_up_settings(tmp_path), app_factory=create_up_app) as server, \
            httpx.Client(base_url=server.url) as client:
        for path in ("/", "/v1/summary", "/healthz"):
            refused = client.get(path, headers={"host": f"rebound.example:{server.port}"})
            assert refused.status_code == 400, path
            for host in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST"):
                assert client.get(path, headers={"host": f"{host}:{server.port}"}).status_code == 200, (path, host)
        assert client.post("/v1/events", content=b"{}", headers={"host": "rebound.example"}).status_code == 400


def test_without_a_token_the_address_listened_on_and_configured_names_are_served(tmp_path):
    settings = _up_settings(tmp_path, listen_host="192.0.2.7", allowed_hosts=("dash.example", "*.corp.example"))
    with CollectorServer(settings, app_factory=create_up_app) as server, httpx.Client(base_url=server.url) as client:
        for host in ("192.0.2.7", "192.0.2.7:8321", "dash.example", "Dash.Example:80", "ci.corp.example"):
            assert client.get("/v1/summary", headers={"host": host}).status_code == 200, host
        for host in ("192.0.2.8", "dash.example.evil", "corp.example.evil", "", "a b"):
            refused = client.get("/v1/summary", headers={"host": host})
            assert refused.status_code == 400 and "host" in refused.text.lower(), host


def test_listening_on_the_network_without_a_token_any_host_name_is_served(tmp_path):
    """Open to its network by choice (the command warns): its tracers address
    it by whatever name, and a 400 would lose their batches."""
    with CollectorServer(_up_settings(tmp_path, listen_host="0.0.0.0"), app_factory=create_up_app) as server, \
            httpx.Client(base_url=server.url) as client:
        for host in ("collector.svc.example", "10.1.2.3:8321", "127.0.0.1"):
            assert client.get("/v1/summary", headers={"host": host}).status_code == 200, host


def test_with_a_token_any_host_name_is_served_with_the_token(served):
    """The token is the guard then (a rebound page has no token, and no cookie
    of this host): behind a proxy or on a cluster's DNS name, no list is needed."""
    assert served.get("/v1/summary", headers={"host": "collector.svc.example"}).status_code == 401
    assert served.get("/v1/summary", headers={"host": "collector.svc.example",
                                              "authorization": f"Bearer {TOKEN}"}).status_code == 200


def test_the_tracer_sends_a_non_ascii_token_as_utf8(tmp_path):
    """http.client encodes a header as latin-1: the tracer's batches with a
    token like this one were retried forever (or refused), never stored."""
    source = WireSource("utf8-token-source")
    batch = source.batch([source.decision(time.time(), [["r1"]])])
    with CollectorServer(_up_settings(tmp_path, token=NON_ASCII)) as server:
        client = CollectorClient(server.url, NON_ASCII, Spool(str(tmp_path / "spool"), max_bytes=1_000_000),
                                 timeout_s=10.0)
        drops = []
        try:
            assert client.deliver(json.dumps(batch).encode(), 1, lambda *drop: drops.append(drop))
        finally:
            client.close()
        assert drops == [] and client.backlog == 0
        sources = httpx.get(server.url + "/v1/sources", params={"window": "24h"},
                            headers={"authorization": b"Bearer " + NON_ASCII.encode()}).json()
        assert "utf8-token-source" in json.dumps(sources)
