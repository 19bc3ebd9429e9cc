"""The HTTP application: every domain's router, behind one access check (`moderation.http.access`).

`moderation api` serves it with uvicorn. Handlers are plain `def`s: FastAPI runs them on
its thread pool, where the synchronous SQLAlchemy sessions belong.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import Depends, FastAPI

from moderation.banks.api import router as banks_router
from moderation.config import Settings
from moderation.evaluation.api import router as golden_router
from moderation.http.access import API_KEYS, authorize
from moderation.http.admission import Admission
from moderation.http.errors import install as install_errors
from moderation.http.limits import ApiLimits
from moderation.lifecycle.api import router as models_router
from moderation.main.audit_log import router as audit_router
from moderation.main.docs import install as install_docs
from moderation.main.health import router as health_router
from moderation.main.metrics import router as metrics_router
from moderation.review.api import router as review_router
from moderation.review.api import uploads_router as upload_reads_router
from moderation.runtime import Runtime
from moderation.screening.api import router as uploads_router
from moderation.search.api import router as search_router
from moderation.web.pages import install as install_pages


def create_app(runtime: Runtime, *, owns_runtime: bool = False) -> FastAPI:
    """The application on `runtime`; `owns_runtime`: closed when the application stops
    (after every router's own resources), else its caller closes it."""

    @asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        async with API_KEYS.lifespan()(application):
            yield
        if owns_runtime:
            runtime.close()

    app = FastAPI(
        title="moderation",
        version=version("moderation"),
        description="Screen images against banks of known-bad content; review the hits.",
        dependencies=[Depends(authorize)],
        # Served by `docs` from the package's own files, not from a CDN.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.api_limits = ApiLimits.from_settings(runtime.settings)
    for router in (
        health_router,
        metrics_router,
        audit_router,
        uploads_router,
        upload_reads_router,
        banks_router,
        review_router,
        search_router,
        models_router,
        golden_router,
    ):
        app.include_router(router)
    install_errors(app)
    install_pages(app)
    install_docs(app)
    # Outermost of the application's own layers: a request is admitted (its key, its size)
    # before anything reads its body.
    app.add_middleware(Admission, application=app)
    return app


def app_from_environment() -> FastAPI:
    """What `moderation api` serves, once in each uvicorn process: the application on a
    runtime of the process's own, from its MODERATION_* variables."""
    return create_app(Runtime(Settings()), owns_runtime=True)
