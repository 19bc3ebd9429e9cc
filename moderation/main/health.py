"""Liveness (`/healthz`: the process answers) and readiness (`/readyz`: what it needs).

Ready means PostgreSQL answers, Redis answers, and at least one screening worker has
recorded a heartbeat within `worker_dead_after_s`: without one, uploads are accepted but
nobody screens them. On the Milvus backend, also that every synced collection completed a
sync pass within `milvus_max_lag_s` (read from PostgreSQL, so it fails while Milvus is
away and the sync cannot pass). A load balancer takes the API out of rotation on a 503, whose body
says which check failed.
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from moderation.http.access import app_runtime, public
from moderation.http.resources import ProcessResource
from moderation.runtime import Runtime
from moderation.screening.service import live_workers

# A check that takes longer than this has failed: readiness probes run every few seconds.
CHECK_TIMEOUT_S = 2.0


def _redis_client(runtime: Runtime) -> redis.Redis:
    return redis.Redis.from_url(
        runtime.settings.redis_url,
        socket_timeout=CHECK_TIMEOUT_S,
        socket_connect_timeout=CHECK_TIMEOUT_S,
    )


# The application's Redis client (and connection pool) for health checks and metrics: its
# commands fail after `CHECK_TIMEOUT_S`.
CHECK_REDIS = ProcessResource("check_redis", lambda request: _redis_client(app_runtime(request)))

router = APIRouter(tags=["health"], lifespan=CHECK_REDIS.lifespan())


@router.get("/healthz", openapi_extra=public())
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def readiness(runtime: Runtime, redis_client: redis.Redis) -> tuple[bool, dict[str, str]]:
    """Each check's outcome, `ok` or why not; ready when all are ok."""
    settings = runtime.settings
    checks: dict[str, str] = {}
    workers = None
    sync_lag: str | None = None
    try:
        with runtime.session() as session:
            session.execute(text(f"SET LOCAL statement_timeout = {int(CHECK_TIMEOUT_S * 1000)}"))
            workers = live_workers(session, settings.worker_dead_after_s)
            if settings.search_backend == "milvus":
                sync_lag = _search_sync(session, settings.milvus_max_lag_s)
        checks["postgresql"] = "ok"
    except Exception as error:
        checks["postgresql"] = f"unreachable: {type(error).__name__}"
    try:
        redis_client.ping()
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
    if sync_lag is not None:
        checks["search_index"] = sync_lag
    return all(v == "ok" for v in checks.values()), checks


def _search_sync(session: Session, max_lag_s: float) -> str:
    """`ok`, or which Milvus collection's sync is behind by more than `max_lag_s` (searches
    still answer, from an index missing recent uploads)."""
    from moderation.search.milvus_sync import lags

    found = lags(session)
    if not found:
        return "no Milvus collection is synced yet; run `moderation index sync`"
    behind = [
        f"{lag.collection} ({lag.model}): {lag.rows} rows, "
        + ("no pass completed" if lag.seconds is None else f"{lag.seconds:.0f} s")
        for lag in found
        if lag.seconds is None or lag.seconds > max_lag_s
    ]
    if behind:
        return (
            f"the Milvus sync is behind by more than {max_lag_s:g} s: {'; '.join(behind)}; "
            "is `moderation index sync` running, and Milvus up?"
        )
    return "ok"


@router.get(
    "/readyz",
    openapi_extra=public(),
    responses={503: {"description": "Not ready: the body says which check failed."}},
)
def readyz(request: Request) -> JSONResponse:
    ready, checks = readiness(app_runtime(request), CHECK_REDIS.get(request))
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)
