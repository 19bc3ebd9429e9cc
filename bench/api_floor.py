"""The framework's floor for `bench/api.py`: the same stack with nothing of ours but the insert.

FastAPI and uvicorn, the request models of `POST /v1/uploads` (the same validation), and
the same insert (`screening.service.submit_uploads`, one transaction), answered with the
same response models; no key check, no URI policy, no screening messages. What the real
API takes beyond this is the cost of those; what this takes beyond a plain INSERT is the
framework's (HTTP, JSON, validation, a thread per request).

    python bench/api_floor.py PORT      # serves it; bench/api.py starts it itself
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, status

from moderation.config import Settings
from moderation.runtime import Runtime
from moderation.screening import service
from moderation.screening.api import (
    UploadAccepted,
    UploadBatchAccepted,
    UploadBatchIn,
    UploadIn,
    accepted_answer,
)


def floor_app(runtime: Runtime) -> FastAPI:
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/uploads", status_code=status.HTTP_202_ACCEPTED)
    def submit_uploads(body: UploadIn | UploadBatchIn) -> UploadAccepted | UploadBatchAccepted:
        events = body.uploads if isinstance(body, UploadBatchIn) else [body]
        with runtime.session() as session:
            # The same rows as the API writes, a submitter's name included (the floor has
            # no key).
            accepted = service.submit_uploads(
                session, [event.to_new_upload("key:0:floor") for event in events]
            )
        return accepted_answer(body, accepted)

    return app


if __name__ == "__main__":
    # Settings from MODERATION_* variables, as `moderation api` reads them.
    runtime = Runtime(Settings())
    try:
        uvicorn.run(
            floor_app(runtime), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning"
        )
    finally:
        runtime.close()
