"""The session cookie as a credential, and the defences of cookie-authenticated requests.

A browser sends cookies by itself, so a request carrying only the cookie might have been
forged by another site. Three layers stop that:

1. `SameSite=Strict`: the browser sends the cookie with no request started from another
   site, not even a top-level link.
2. The Origin check here: a state-changing request (anything but GET, HEAD, OPTIONS)
   that authenticates by cookie must name this site in its `Origin` header, which a page
   cannot forge and browsers send on every cross-origin and every POST request. It guards
   every route, the JSON API's included, since the one access check admits the cookie there.
3. A per-session anti-forgery token in every form (`csrf_token`), checked by the page
   handlers: the defence that does not depend on browser behaviour.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status

from moderation.http.access import CredentialSource
from moderation.web import service

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def require_same_origin(request: Request) -> None:
    """Refuse a request whose `Origin` is missing or names another site than `Host`."""
    origin = request.headers.get("origin")
    host = request.headers.get("host")
    if not origin or not host or urlsplit(origin).netloc.lower() != host.lower():
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "cross-site request refused: a form must be sent from this site's own pages "
            "(its Origin header must name this host)",
        )


def session_cookie(request: Request) -> str | None:
    token = request.cookies.get(service.COOKIE_NAME)
    if not token:
        return None
    if request.method not in SAFE_METHODS:
        require_same_origin(request)
    return token


COOKIE_SOURCE = CredentialSource(find=session_cookie, authenticate=service.authenticate)


def form_token(request: Request) -> str | None:
    """The anti-forgery token for this request's forms; None when the caller sent a key in
    the Authorization header (which no other site can make a browser send)."""
    if getattr(request.state, "credential_source", None) is not COOKIE_SOURCE:
        return None
    token = request.cookies.get(service.COOKIE_NAME)
    return service.csrf_token(token) if token else None


def check_form_token(request: Request, submitted: str) -> None:
    if getattr(request.state, "credential_source", None) is not COOKIE_SOURCE:
        return
    if not service.csrf_matches(request.cookies.get(service.COOKIE_NAME, ""), submitted):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "the form's anti-forgery token does not match your session: reload the page and "
            "try again",
        )
