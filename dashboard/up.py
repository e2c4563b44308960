"""`routelens up`: the collector's API and the dashboard in one process, on one port."""

from __future__ import annotations

import html
import re
from urllib.parse import parse_qs

from a2wsgi import WSGIMiddleware
from fastapi import FastAPI
from starlette.requests import HTTPConnection

from routelens.collector.api.app import create_app
from routelens.collector.api.auth import TokenAuth
from routelens.collector.settings import Settings

from .app import create_dashboard

# A path of this server: a single "/", then printable ASCII but backslash.
# Browsers drop tabs and newlines from a URL and read a backslash as "/", so
# that "/\evil.com" and "/<tab>/evil.com" are another site to them; a CR LF
# would split the Location header.
_SAME_SITE_PATH = re.compile(r"/(?!/)[!-\[\]-~]*")


def create_up_app(settings: Settings) -> FastAPI:
    """The collector's app (ingest, /v1, /docs, /healthz, /metrics) with the
    dashboard at `/`: a Dash (WSGI) app, mounted after the API's routes so
    that those keep their paths. With a token, the dashboard asks for it."""
    app = create_app(settings)
    dashboard = WSGIMiddleware(create_dashboard(app.state.engine, prefix="/").server)
    app.mount("/", TokenGate(dashboard, app.state.auth) if app.state.auth else dashboard)
    return app


def same_site_path(target: str) -> str:
    """Where to go after signing in: `target` if it is a path of this server, else "/"."""
    return target if _SAME_SITE_PATH.fullmatch(target) else "/"


_LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>routelens: sign in</title></head>
<body style="font-family: system-ui, sans-serif; margin: 15vh auto; max-width: 380px">
<h2>routelens</h2><p>This collector wants its token (<code>routelens up --token</code>).</p>{error}
<form method="post" action="/login"><input type="password" name="token" id="token" autofocus
 style="width: 100%; padding: 6px"> <input type="hidden" name="next" value="{next}">
<p><button type="submit" id="sign-in">Sign in</button></p></form></body></html>"""


class TokenGate:
    """ASGI middleware in front of the dashboard: a request without the token
    (header or session cookie) gets a sign-in page (401); posting the right
    token to /login sets the session cookie, which the API accepts too
    (downloads)."""

    def __init__(self, app, auth: TokenAuth):
        self.app, self.auth = app, auth

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/login" and scope["method"] == "POST":
            return await self._login(receive, send)
        connection = HTTPConnection(scope)
        if self.auth.is_authorized(connection.headers, connection.cookies):
            return await self.app(scope, receive, send)
        # The path as sent (percent-encoded), to come back to after signing in.
        path = scope.get("raw_path") or scope["path"].encode()
        target = (path + (b"?" + scope["query_string"] if scope["query_string"] else b"")).decode("latin-1")
        await _respond(send, 401, _LOGIN.format(error="", next=html.escape(same_site_path(target), quote=True)))

    async def _login(self, receive, send):
        body, more = b"", True
        while more and len(body) < 8192:  # a token and a path: anything longer is not a sign-in
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        # Decoded as latin-1, each character of a value is one byte the browser
        # percent-encoded: the token's UTF-8 bytes, as is.
        form = parse_qs(body.decode("latin-1"), encoding="latin-1")
        given, target = form.get("token", [""])[0].encode("latin-1"), same_site_path(form.get("next", ["/"])[0])
        if not self.auth.is_token(given):
            await _respond(send, 401, _LOGIN.format(error='<p style="color: #c0392b" id="wrong">Wrong token.</p>',
                                                    next=html.escape(target, quote=True)))
            return
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", target.encode()), (b"set-cookie", self.auth.session_cookie().encode())]})
        await send({"type": "http.response.body", "body": b""})


async def _respond(send, status: int, page: str) -> None:
    body = page.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
