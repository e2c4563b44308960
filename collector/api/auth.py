"""Who may use a collector: the token, the dashboard's sign-in session, and,
without a token, which Host names are served.

- The tracer and scripts send `Authorization: Bearer <token>`. It is the
  only way to ingest (POST /v1/events).
- The dashboard's sign-in page sets a session cookie, which the read API
  accepts too (so that a browser's downloads from /v1/export work). It is
  signed with itsdangerous, with a key derived from the token (so every
  worker process and every collector with the token agree on it, and a new
  token signs everyone out), carries its signing time and is good for
  `Settings.session_lifetime_s`. Its name carries a digest of the token, so
  that servers on one host (cookies are per host, not per port) each keep
  their own.
- Tokens are compared as UTF-8 bytes, in constant time: the header's bytes
  as sent (Starlette decodes headers as latin-1, which gives them back) and
  the form's bytes as the browser percent-encoded them.
- Without a token, a request whose Host header names another machine is
  refused (400): a web page whose DNS name is pointed at 127.0.0.1 (DNS
  rebinding) would otherwise read and write a local collector.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Mapping, Optional

from itsdangerous import BadSignature, TimestampSigner

from ..settings import Settings

SESSION_COOKIE_PREFIX = "routelens_session_"
SESSION = b"dashboard"  # what the cookie signs: being signed in is all it says
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


def session_signer(token: str) -> TimestampSigner:
    return TimestampSigner(token.encode(), salt="routelens-dashboard-session", digest_method=hashlib.sha256)


class TokenAuth:
    """The token check of one server, for the API and the dashboard."""

    def __init__(self, token: str, session_lifetime_s: int):
        self._token = token.encode()
        self._signer = session_signer(token)
        self.session_lifetime_s = int(session_lifetime_s)
        name_digest = hashlib.sha256(b"routelens-cookie-name:" + self._token).hexdigest()
        self.cookie_name = SESSION_COOKIE_PREFIX + name_digest[:16]

    def is_token(self, given: bytes) -> bool:
        return hmac.compare_digest(given, self._token)

    def has_bearer_token(self, authorization: Optional[str]) -> bool:
        """`authorization`: the header as Starlette gives it (decoded as latin-1)."""
        scheme, _, given = (authorization or "").encode("latin-1").partition(b" ")
        return scheme.lower() == b"bearer" and self.is_token(given.strip())

    def has_session(self, cookies: Mapping[str, str]) -> bool:
        """`cookies`: as Starlette parses the Cookie header (leniently, as browsers send them)."""
        value = cookies.get(self.cookie_name)
        if value is None:
            return False
        try:
            return self._signer.unsign(value, max_age=self.session_lifetime_s) == SESSION
        except BadSignature:  # a forged, altered or expired cookie, or another token's
            return False

    def is_authorized(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        """For reading (the API, the dashboard): the bearer token or a session."""
        return self.has_bearer_token(headers.get("authorization")) or self.has_session(cookies)

    def session_cookie(self) -> str:
        """The Set-Cookie header value that signs a browser in."""
        value = self._signer.sign(SESSION).decode()
        return f"{self.cookie_name}={value}; Max-Age={self.session_lifetime_s}; Path=/; HttpOnly; SameSite=Strict"


def allowed_hosts(settings: Settings) -> Optional[list]:
    """The Host names served, as Starlette's TrustedHostMiddleware takes them
    (IPv6 addresses in brackets, as in a Host header); None: any.

    The list guards a collector without a token that listens on loopback
    only, which DNS rebinding targets: a page of another site, renamed to
    127.0.0.1, read from this machine's browser. One that listens on another
    interface without a token is open to its network by the operator's
    choice (the command warns): refusing the names its tracers address it
    by would lose their batches, so it serves any, unless names are given."""
    if settings.token or not (_is_loopback(settings.listen_host) or settings.allowed_hosts):
        return None
    return [_as_host_header(host) for host in (*LOCAL_HOSTS, settings.listen_host, *settings.allowed_hosts)]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _as_host_header(host: str) -> str:
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host
