"""Who may call what: the one dependency that checks every route.

Each route names the roles it admits in its OpenAPI operation (`openapi_extra=allow(...)`),
so the spec documents access and the check cannot drift from it. `authorize` runs before
every route of the application: it resolves the caller from `Authorization: Bearer <key>`
(or the web pages' session cookie, through `credential_sources`), answers 401 without a
valid key and 403 when the key's role is not admitted. A route that names no roles is
refused to everyone, so a route added without a decision fails closed; `public()` marks
the few that need no key (health checks, the login page).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.routing import APIRoute
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from moderation.auth.key_cache import ApiKeys
from moderation.auth.models import Role
from moderation.auth.service import Principal, authenticate
from moderation.errors import Conflict, Unavailable
from moderation.http.resources import ProcessResource
from moderation.runtime import Runtime

# PostgreSQL's SQLSTATE for a unique violation.
UNIQUE_VIOLATION = "23505"

ROLES_KEY = "x-roles"
PUBLIC_KEY = "x-public"


def allow(*roles: Role) -> dict[str, Any]:
    """`openapi_extra` for a route that these roles may call; admins may call every route."""
    return {ROLES_KEY: sorted({role.value for role in (*roles, Role.ADMIN)})}


def public() -> dict[str, Any]:
    """`openapi_extra` for a route anyone may call, without a key."""
    return {PUBLIC_KEY: True}


class DatabaseUnavailable(Unavailable):
    """The database went away or refused the transaction; nothing of the request is kept."""

    code = "database_unavailable"


class WriteConflict(Conflict):
    """Another request wrote the same unique value first."""

    code = "write_conflict"


def app_runtime(request: Request) -> Runtime:
    """The runtime the application was built on (`moderation.main.app.create_app`)."""
    runtime: Runtime = request.app.state.runtime
    return runtime


async def _app_runtime(request: Request) -> Runtime:
    # A coroutine: as a plain `def`, FastAPI would take a trip to its thread pool for it.
    return app_runtime(request)


AppRuntime = Annotated[Runtime, Depends(_app_runtime)]

# The application's API keys, checked through its key cache (`moderation.auth.key_cache`);
# the listener stops with the application (`create_app`).
API_KEYS = ProcessResource("api_keys", lambda request: ApiKeys(app_runtime(request)))


def db_session(runtime: AppRuntime) -> Iterator[Session]:
    """A session per request, committed when the handler returns without raising, before
    the response is sent (`scope="function"` below): a 2xx means the write is durable, and a
    commit that fails answers 503 (409 for a unique value another request took first).
    Handlers that must act after the commit (publishing messages) commit themselves first.

    FastAPI 0.118+ runs a request-scoped dependency's exit code after the response has gone
    out: the client was told "done" for a write that could still fail, and could read before
    it was visible."""
    try:
        with runtime.session() as session:
            yield session
    except IntegrityError as error:
        if getattr(error.orig, "pgcode", None) != UNIQUE_VIOLATION:
            raise
        raise WriteConflict(
            "another request has just written the same unique value; nothing was kept: "
            "read the current state and retry"
        ) from error
    except OperationalError as error:
        # A dropped connection, a serialization failure, a server shutting down: the
        # transaction was rolled back by PostgreSQL, so retrying the request is safe.
        raise DatabaseUnavailable(
            "the database did not complete this request's transaction; nothing was kept: retry"
        ) from error


DbSession = Annotated[Session, Depends(db_session, scope="function")]


@dataclass(frozen=True)
class CredentialSource:
    """A place where a request may carry a credential, and how that credential is checked."""

    # The credential in the request, or None when it carries none of this kind. May raise an
    # HTTPException to refuse the request outright (the cookie's cross-site check).
    find: Callable[[Request], str | None]
    # The principal the credential stands for; None when it is unknown, revoked or expired.
    authenticate: Callable[[Session, str], Principal | None]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


BEARER = CredentialSource(find=_bearer, authenticate=authenticate)
# Sources after the Authorization header, in order (the web pages' session cookie). The
# first source that finds a credential decides: an invalid one is a 401, not a fall-through.
credential_sources: list[CredentialSource] = []


def _credential(request: Request) -> tuple[CredentialSource, str] | None:
    for source in (BEARER, *credential_sources):
        found = source.find(request)
        if found:
            return source, found
    return None


def route_roles(route: APIRoute) -> frozenset[Role] | None:
    """The roles a route admits; None for a public route."""
    extra = route.openapi_extra or {}
    if extra.get(PUBLIC_KEY):
        return None
    return frozenset(Role(value) for value in extra.get(ROLES_KEY, ()))


def admit(request: Request, route: APIRoute) -> Principal | None:
    """The check itself: the caller `route` admits (None for a public route), or an
    HTTPException (401 without a valid credential, 403 for a role the route does not name).
    Reads headers only, never the body: the admission middleware (`moderation.http.
    admission`) runs it before a request's body is read."""
    admitted = route_roles(route)
    if admitted is None:
        return None
    credential = _credential(request)
    principal = None
    if credential is not None:
        source, secret = credential
        if source is BEARER:
            principal = API_KEYS.get(request).authenticate(secret)
        else:
            with app_runtime(request).session() as session:
                principal = source.authenticate(session, secret)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "a valid API key is required: send `Authorization: Bearer <key>`",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if principal.role not in admitted:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"role {principal.role.value} may not do this; "
            f"allowed: {', '.join(sorted(role.value for role in admitted))}",
        )
    request.state.principal = principal
    # Forms check an anti-forgery token only where the browser sent the credential by itself.
    request.state.credential_source = source  # set whenever principal is
    request.state.admitted_to = route.endpoint
    return principal


async def authorize(request: Request) -> Principal | None:
    """The dependency every route runs. The admission middleware has normally checked the
    request against this same route already (before its body was read); then its answer
    stands, and otherwise the check runs here.

    A coroutine, so that taking the middleware's answer costs no hop to the thread pool
    (as a plain `def` it took one per request, with the handler's own: py-spy, `bench/
    api.py`); the check itself reads the database, and goes to the thread pool."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "no access rule for this route")
    if route_roles(route) is None:
        return None
    if getattr(request.state, "admitted_to", None) is route.endpoint:
        principal: Principal = request.state.principal
        return principal
    return await run_in_threadpool(admit, request, route)


async def current_principal(request: Request) -> Principal:
    """The authenticated caller, for handlers that record who acted."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # a public route asked for a caller: a programming error
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "route has no caller")
    return principal


Caller = Annotated[Principal, Depends(current_principal)]
