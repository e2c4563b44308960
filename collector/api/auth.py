"""The token check shared by the API and the dashboard (constant-time).

A request carries the token in `Authorization: Bearer <token>` (the tracer,
scripts), or carries the `routelens_token` cookie, which the dashboard's
sign-in page sets (so that a browser's downloads from /v1/export are
authorized too). The cookie holds a digest of the token, never the token,
and is always a valid cookie value, whatever characters the token has.
"""

from __future__ import annotations

import hashlib
import hmac
from http.cookies import CookieError, SimpleCookie
from typing import Optional

COOKIE = "routelens_token"


def cookie_value(token: str) -> str:
    return hashlib.sha256(b"routelens-dashboard:" + token.encode()).hexdigest()


def is_authorized(authorization: Optional[str], cookie_header: Optional[str], token: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return hmac.compare_digest(given.strip().encode(), token.encode())
    if cookie_header:
        cookies = SimpleCookie()
        try:
            cookies.load(cookie_header)
        except CookieError:
            return False
        if COOKIE in cookies:
            return hmac.compare_digest(cookies[COOKIE].value.encode(), cookie_value(token).encode())
    return False
