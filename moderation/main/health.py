"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: what it needs).

Ready means PostgreSQL answers, Redis answers, and at least one screening worker has
recorded a heartbeat within `worker_dead_after_s`: without one, uploads are accepted but
nobody screens them. A load balancer takes the API out of rotation on a 503, whose body
says which check failed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from moderation.config import get_settings
from moderation.db import session_scope
from moderation.http.access import public
from moderation.screening.service import live_workers

router = APIRouter(tags=["health"])

# A check that takes longer than this has failed: readiness probes run every few seconds.
CHECK_TIMEOUT_S = 2.0


@router.get("/healthz", openapi_extra=public())
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    """One client (and connection pool) per Redis URL, for health checks and metrics."""
    return redis.Redis.from_url(
        url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
    )


def readiness() -> tuple[bool, dict[str, str]]:
    """Each check's outcome, `ok` or why not; ready when all are ok."""
    settings = get_settings()
    checks: dict[str, str] = {}
    workers = None
    try:
        with session_scope() as session:
            session.execute(text(f"SET LOCAL statement_timeout = {int(CHECK_TIMEOUT_S * 1000)}"))
            workers = live_workers(session, settings.worker_dead_after_s)
        checks["postgresql"] = "ok"
    except Exception as error:
        checks["postgresql"] = f"unreachable: {type(error).__name__}"
    try:
        redis_client(settings.redis_url).ping()
        checks["redis"] = "ok"
    except Exception as error:
        checks["redis"] = f"unreachable: {type(error).__name__}"
    if workers is None:
        checks["workers"] = "unknown: PostgreSQL is unreachable"
    elif workers == 0:
        checks["workers"] = (
            f"no worker has sent a heartbeat in the last {settings.worker_dead_after_s:g} s; "
            "start one with `moderation worker`"
        )
    else:
        checks["workers"] = "ok"
    return all(v == "ok" for v in checks.values()), checks


@router.get(
    "/readyz",
    openapi_extra=public(),
    responses={503: {"description": "Not ready: the body says which check failed."}},
)
def readyz() -> JSONResponse:
    ready, checks = readiness()
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)
