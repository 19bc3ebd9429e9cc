"""The API's documentation pages, served from the package's own files (no CDN: they work
offline and load nothing from elsewhere), and the spec's security scheme.

`/docs` (Swagger UI) and `/redoc` (ReDoc) use the assets vendored under
`moderation/web/static/vendor` (see its README for versions and licences). Every operation
that needs a key declares the bearer scheme, so the spec says how to authenticate and
Swagger UI's *Authorize* button sends the key.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse

from moderation.http.access import PUBLIC_KEY, public

router = APIRouter(include_in_schema=False)
VENDOR = "/static/vendor"
BEARER = "bearer"
# Nothing but this server: ReDoc's bundle links a logo on a CDN, which the browser then
# never asks for. (Both pages start from a small inline script, as FastAPI writes them.)
DOCS_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' "
        "'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@router.get("/docs", openapi_extra=public())
def swagger_ui() -> HTMLResponse:
    page = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="moderation API",
        swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
        swagger_favicon_url="data:,",
        swagger_ui_parameters={"persistAuthorization": False},
    )
    page.headers.update(DOCS_HEADERS)
    return page


@router.get("/redoc", openapi_extra=public())
def redoc() -> HTMLResponse:
    page = get_redoc_html(
        openapi_url="/openapi.json",
        title="moderation API",
        redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
        redoc_favicon_url="data:,",
        with_google_fonts=False,
    )
    page.headers.update(DOCS_HEADERS)
    return page


def with_security(app: FastAPI) -> dict[str, Any]:
    """The spec, with the bearer scheme declared and required by every operation that is
    not public (built once, as FastAPI's own is)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    spec = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    spec.setdefault("components", {})["securitySchemes"] = {
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (`moderation apikey create`), as "
            "`Authorization: Bearer mod_...`. Each operation's `x-roles` names the roles "
            "it admits; admins are admitted everywhere.",
        }
    }
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            if isinstance(operation, dict) and not operation.get(PUBLIC_KEY):
                operation["security"] = [{BEARER: []}]
    app.openapi_schema = spec
    return spec


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.openapi = lambda: with_security(app)  # type: ignore[method-assign]
