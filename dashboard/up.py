"""`routelens up`: the collector's API and the dashboard in one process, on one port."""

from __future__ import annotations

import hmac
import html
from urllib.parse import parse_qs

from a2wsgi import WSGIMiddleware
from fastapi import FastAPI

from routelens.collector.api.app import create_app
from routelens.collector.api.auth import COOKIE, cookie_value, is_authorized
from routelens.collector.settings import Settings

from .app import create_dashboard


def create_up_app(settings: Settings) -> FastAPI:
    """The collector's app (ingest, /v1, /docs, /healthz, /metrics) with the
    dashboard at `/`: a Dash (WSGI) app, mounted after the API's routes so
    that those keep their paths. With a token, the dashboard asks for it."""
    app = create_app(settings)
    dashboard = WSGIMiddleware(create_dashboard(app.state.engine, prefix="/").server)
    app.mount("/", TokenGate(dashboard, settings.token) if settings.token else dashboard)
    return app


_LOGIN = """<!doctype html><html><head><meta charset="utf-8"><title>routelens: sign in</title></head>
<body style="font-family: system-ui, sans-serif; margin: 15vh auto; max-width: 380px">
<h2>routelens</h2><p>This collector wants its token (<code>routelens up --token</code>).</p>{error}
<form method="post" action="/login"><input type="password" name="token" id="token" autofocus
 style="width: 100%; padding: 6px"> <input type="hidden" name="next" value="{next}">
<p><button type="submit" id="sign-in">Sign in</button></p></form></body></html>"""


class TokenGate:
    """ASGI middleware in front of the dashboard: a request without the token
    (header or cookie) gets a sign-in page (401); posting the right token to
    /login sets the cookie, which the API accepts too (downloads)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] == "/login" and scope["method"] == "POST":
            return await self._login(receive, send)
        if is_authorized(headers.get("authorization"), headers.get("cookie"), self.token):
            return await self.app(scope, receive, send)
        target = scope["path"] + ("?" + scope["query_string"].decode("latin-1") if scope["query_string"] else "")
        await _respond(send, 401, _LOGIN.format(error="", next=html.escape(target, quote=True)))

    async def _login(self, receive, send):
        body, more = b"", True
        while more and len(body) < 8192:  # a token and a path: anything longer is not a sign-in
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        form = parse_qs(body.decode("utf-8", "replace"))
        given, target = form.get("token", [""])[0], form.get("next", ["/"])[0]
        if not target.startswith("/") or target.startswith("//"):
            target = "/"  # only a path of this server
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            await _respond(send, 401, _LOGIN.format(error='<p style="color: #c0392b" id="wrong">Wrong token.</p>',
                                                    next=html.escape(target, quote=True)))
            return
        await send({"type": "http.response.start", "status": 303, "headers": [
            (b"location", target.encode("latin-1", "replace")),
            (b"set-cookie", f"{COOKIE}={cookie_value(self.token)}; Path=/; HttpOnly; SameSite=Strict".encode()),
        ]})
        await send({"type": "http.response.body", "body": b""})


async def _respond(send, status: int, page: str) -> None:
    body = page.encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
