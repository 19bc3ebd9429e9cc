"""Rendering a page: the templates, and the headers every page answers with."""

from __future__ import annotations

import pathlib
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from moderation.web.security import form_token

PAGES_TAG = "pages"
HERE = pathlib.Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")

# Pages show what reviewers must not leave behind in shared caches or browser history.
PAGE_HEADERS = {
    "Cache-Control": "private, no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    # Scripts and styles from this site's files only (no inline script): an injected
    # string can render but never run. Images from here only.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
}


def render(
    request: Request, template: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    principal = getattr(request.state, "principal", None)
    response = templates.TemplateResponse(
        request,
        template,
        {"principal": principal, "csrf": form_token(request), **context},
        status_code=status_code,
    )
    response.headers.update(PAGE_HEADERS)
    return response
