"""The web pages: login, the review queue, an upload's page, the banks' pages, thumbnails.

Every page is a route of the one application, so the one access check (`moderation.http.access`)
decides who may see it, by the roles its operation names, exactly as for the JSON API. A
browser authenticates with the session cookie set at login (`web.security`). A page
refused for want of a login redirects to the login form rather than answering JSON.
"""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, HTTPException, Path, Request, status
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from moderation.auth.models import Role
from moderation.embedding import registry
from moderation.errors import ModerationError
from moderation.evidence import service as evidence
from moderation.http.access import (
    AppRuntime,
    Caller,
    DbSession,
    allow,
    credential_sources,
    public,
    route_roles,
)
from moderation.http.errors import bounded_errors, error_answer, validation_answer
from moderation.http.routes import route_for
from moderation.runtime import Runtime
from moderation.web import pending_forms, queue, reads, service
from moderation.web.media import media_for
from moderation.web.media import router as media_router
from moderation.web.quality_page import router as quality_router
from moderation.web.rendering import HERE, PAGES_TAG, render
from moderation.web.search_page import router as search_router
from moderation.web.security import (
    COOKIE_SOURCE,
    check_form_token,
    require_same_origin,
)

router = APIRouter(tags=[PAGES_TAG], include_in_schema=False)

# Ids are PostgreSQL bigints: a larger number is no row, not a database error.
RowId = Annotated[int, Path(ge=1, le=2**63 - 1)]
REVIEWERS = allow(Role.REVIEWER)
READERS = allow(Role.REVIEWER, Role.ANALYST)
EVERYONE = allow(Role.SUBMITTER, Role.REVIEWER, Role.ANALYST)


def _home(role: Role) -> str:
    return "/search" if role is Role.ANALYST else "/review"


def _local_path(target: str | None) -> str | None:
    """`target` if it is a path on this site (so the login form cannot send people away)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return None


def _admits(request: Request, target: str, role: Role) -> bool:
    """Whether the page at `target` admits `role`: a login from a link to the queue takes
    an analyst to the analyst's own page, not to a refusal."""
    route = route_for(request.app, target.split("?")[0])
    if route is None:
        return False
    roles = route_roles(route)
    return roles is None or role in roles or role is Role.ADMIN


@router.get("/", openapi_extra=public())
def index() -> RedirectResponse:
    return RedirectResponse("/review", status.HTTP_303_SEE_OTHER)


@router.get("/login", openapi_extra=public())
def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", {"next": _local_path(next) or ""})


@router.post("/login", openapi_extra=public())
def login(
    request: Request,
    session: DbSession,
    runtime: AppRuntime,
    api_key: Annotated[str, Form()],
    next: Annotated[str, Form()] = "",
) -> Response:
    # No session yet, so no form token: the Origin check stops another site from logging a
    # reviewer in under a key of its own.
    require_same_origin(request)
    settings = runtime.settings
    login = service.log_in(
        session, api_key.strip(), lifetime=timedelta(hours=settings.web_session_hours)
    )
    if login is None or login.principal.role is Role.SUBMITTER:
        error = (
            "That key is not valid, or it was revoked."
            if login is None
            else "Submitter keys send uploads; they have no pages. Use a reviewer, "
            "analyst or admin key."
        )
        session.rollback()
        return render(
            request,
            "login.html",
            {"next": _local_path(next) or "", "error": error},
            status.HTTP_401_UNAUTHORIZED,
        )
    # Committed before the redirect is answered: the request's session would commit when
    # the dependency exits, which can be after the browser already asks for the next page,
    # and that page then finds no session and shows the login form again (about one login
    # in four bounced so). The web login flow owns this commit (issue 27 makes every write
    # commit before its answer; this one must not wait for that).
    session.commit()
    target = _local_path(next)
    if target is None or not _admits(request, target, login.principal.role):
        target = _home(login.principal.role)
    response = RedirectResponse(target, status.HTTP_303_SEE_OTHER)
    response.set_cookie(
        service.COOKIE_NAME,
        login.token,
        max_age=int(settings.web_session_hours * 3600),
        path="/",
        secure=True,
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/logout", openapi_extra=EVERYONE)
def logout(
    request: Request, session: DbSession, caller: Caller, csrf: Annotated[str, Form()] = ""
) -> Response:
    check_form_token(request, csrf)
    token = request.cookies.get(service.COOKIE_NAME)
    if token:
        service.log_out(session, token, actor=caller.actor)
        session.commit()  # before the answer, as for logging in
    response = RedirectResponse("/login", status.HTTP_303_SEE_OTHER)
    response.delete_cookie(
        service.COOKIE_NAME, path="/", secure=True, httponly=True, samesite="strict"
    )
    return response


@router.get("/review/uploads/{upload_id}", openapi_extra=READERS)
def upload_page(
    request: Request, session: DbSession, runtime: AppRuntime, upload_id: RowId
) -> HTMLResponse:
    settings = runtime.settings
    page = reads.upload_page(session, settings, upload_id)
    if page is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no upload with id {upload_id}")
    media = media_for(settings, upload_id, evidence.evidence_of(session, upload_id), page.hits)
    kept = evidence.evidence_of(session, upload_id)
    return render(request, "upload.html", {"page": page, "media": media, "kept": kept})


@router.get("/review/banks", openapi_extra=READERS)
def banks_page(request: Request, session: DbSession) -> HTMLResponse:
    return render(request, "banks.html", {"banks": reads.bank_list(session)})


@router.get("/review/banks/{bank_id}", openapi_extra=READERS)
def bank_page(
    request: Request, session: DbSession, runtime: AppRuntime, bank_id: RowId
) -> HTMLResponse:
    page = reads.bank_page(session, bank_id, runtime.settings)
    if page is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bank with id {bank_id}")
    return render(request, "bank.html", {"page": page, "recent_limit": reads.RECENT_ENTRIES})


# The embedding-space map: uploads drawn per request (a PCA of 2,000 takes well under a second).
MAP_SAMPLE = 2_000
ANALYSTS = allow(Role.ANALYST, Role.REVIEWER)


@router.get("/search/map", openapi_extra=ANALYSTS)
def map_page(request: Request, runtime: AppRuntime) -> HTMLResponse:
    """The embedding space for analysts, drawn as points they can hover (the upload's
    blurred thumbnail), click (its page) and select by region (exported as a list); the
    same sample as `moderation index map` draws to a PNG."""
    from moderation.search.map_view import map_view
    from moderation.search.projection import NothingToMap, sample_corpus

    with runtime.session() as session:
        model = registry.serving_name(session, runtime.settings.resolved_model())
        try:
            view = map_view(sample_corpus(session, model, MAP_SAMPLE))
            empty = None
        except NothingToMap as nothing:
            view, empty = None, nothing.message
    context = {"model": model, "sample": MAP_SAMPLE, "view": view, "empty": empty}
    return render(request, "map.html", context)


@router.get("/search/map.png", openapi_extra=ANALYSTS)
def map_image(runtime: AppRuntime) -> Response:
    """A PCA of a sample of the active model's embeddings, coloured by bank hit, drawn
    now from the table; no upload's content is read."""
    from moderation.search.projection import render_map, sample_corpus

    with runtime.session() as session:
        model = registry.serving_name(session, runtime.settings.resolved_model())
    no_store = {"Cache-Control": "private, no-store", "X-Content-Type-Options": "nosniff"}
    picture = io.BytesIO()
    with runtime.session() as session:
        corpus = sample_corpus(session, model, MAP_SAMPLE)
    render_map(
        corpus.vectors,
        corpus.labels,
        picture,
        title=f"{model}: {len(corpus.labels)} of {corpus.corpus_size} uploads, PCA",
    )
    return Response(picture.getvalue(), media_type="image/png", headers=no_store)


def _is_page(request: Request) -> bool:
    route = request.scope.get("route")
    return isinstance(route, APIRoute) and PAGES_TAG in route.tags


async def _page_errors(request: Request, exc: Exception) -> Response:
    """Pages answer a person: a missing login goes to the login form, other refusals are
    pages. The JSON API's answers are left as they are."""
    assert isinstance(exc, StarletteHTTPException)
    if not _is_page(request):
        return await http_exception_handler(request, exc)
    if exc.status_code == status.HTTP_401_UNAUTHORIZED:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.method != "GET":
            target = await _keep_decision(request) or "/review"
        return RedirectResponse(f"/login?next={quote(target)}", status.HTTP_303_SEE_OTHER)
    return render(
        request, "error.html", {"status": exc.status_code, "detail": exc.detail}, exc.status_code
    )


async def _keep_decision(request: Request) -> str | None:
    """A decision form posted without a live session, kept for after the next login; the
    page that gives it back. None for any other form (or one from another site)."""
    if not queue.is_decision(request):
        return None
    try:
        require_same_origin(request)
    except HTTPException:
        return None
    try:
        posted = await request.form()
    except HTTPException:  # longer than a decision form may be (admission's cap): not kept
        return None
    fields = {name: value for name, value in posted.items() if isinstance(value, str)}
    runtime: Runtime = request.app.state.runtime
    lifetime = timedelta(minutes=runtime.settings.review_pending_form_minutes)
    with runtime.session() as session:
        token = pending_forms.keep(session, request.url.path, fields, lifetime=lifetime)
    return f"/review/resume/{token}"


async def _page_domain_errors(request: Request, exc: Exception) -> Response:
    """The service's own errors (`moderation.errors`) as a page on the pages, and as the
    API answers them elsewhere."""
    assert isinstance(exc, ModerationError)
    if not _is_page(request):
        return error_answer(exc)
    return render(request, "error.html", {"status": exc.status, "detail": exc.message}, exc.status)


async def _page_validation_errors(request: Request, exc: Exception) -> Response:
    """A bad value in a page's address or form is a page saying which, not raw JSON."""
    assert isinstance(exc, RequestValidationError)
    if not _is_page(request):
        return validation_answer(exc)
    reasons = "; ".join(
        f"{'.'.join(str(part) for part in error['loc'][1:]) or 'request'}: {error['msg']}"
        for error in bounded_errors(exc.errors())
    )
    return render(
        request,
        "error.html",
        {"status": 422, "detail": f"This page cannot be shown for these values: {reasons}"},
        status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


def install(app: FastAPI) -> None:
    """Add the pages to the application: routes, static files, the cookie as a credential,
    and the login redirect."""
    app.include_router(router)
    app.include_router(queue.router)
    app.include_router(media_router)
    app.include_router(search_router)
    app.include_router(quality_router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    if COOKIE_SOURCE not in credential_sources:
        credential_sources.append(COOKIE_SOURCE)
    app.add_exception_handler(StarletteHTTPException, _page_errors)
    app.add_exception_handler(ModerationError, _page_domain_errors)
    app.add_exception_handler(RequestValidationError, _page_validation_errors)
