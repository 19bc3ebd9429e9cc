"""Liveness: the process answers. Readiness (its dependencies) is in `readyz`."""

from __future__ import annotations

from fastapi import APIRouter

from moderation.api.access import public

router = APIRouter(tags=["health"])


@router.get("/healthz", openapi_extra=public())
def healthz() -> dict[str, str]:
    return {"status": "ok"}
