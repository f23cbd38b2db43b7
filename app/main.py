"""The FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from app.adaptations import views as adaptations_views
from app.console import install as install_console
from app.core.config import Settings, get_settings
from app.core.errors import install_error_handlers
from app.core.limits import Limits
from app.core.migrate import upgrade
from app.core.runtime import Runtime
from app.datasets import views as datasets_views
from app.health import views as health_views
from app.initializations import registry
from app.initializations import views as initializations_views
from app.jobs import views as jobs_views
from app.jobs.dispatch import InProcessDispatcher, make_dispatcher
from app.keys import views as keys_views
from app.meta_training import views as meta_training_views
from app.middleware import BodyLimitMiddleware, MetricsMiddleware
from app.predictions import views as predictions_views
from app.tasks import views as tasks_views

log = logging.getLogger(__name__)


def _start(runtime: Runtime) -> None:
    settings = runtime.settings
    if settings.is_embedded_database:
        upgrade(settings)
    with runtime.sessions() as session:
        row = registry.ensure_initialization(
            session=session, store=runtime.store, folder=runtime.initialization_folder()
        )
        if row is None:
            log.warning(
                "no active initialization: %s has none to register", runtime.initialization_folder()
            )
        else:
            runtime.models.warm_up(runtime.models.initialization(row))
            log.info("active initialization %s loaded on %s", row.version, runtime.models.device)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; its lifespan builds the runtime and the job dispatcher."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Sync routes and dependencies share these threads; the database pool has one
        # connection for each (Settings.pool_size).
        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        runtime = Runtime.build(settings)
        await run_in_threadpool(_start, runtime)
        dispatcher = make_dispatcher(runtime)
        if isinstance(dispatcher, InProcessDispatcher):
            resumed = await run_in_threadpool(dispatcher.resume_unfinished)
            if resumed:
                log.info("resumed %d unfinished jobs", resumed)
        app.state.runtime = runtime
        app.state.dispatcher = dispatcher
        try:
            yield
        finally:
            await run_in_threadpool(dispatcher.close)
            runtime.close()

    app = FastAPI(
        title="maml-serve",
        version="1.0.0",
        summary="Few-shot image classifiers: send a support set, get an adapted model, predict.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        # The dataset route checks its own cap and answers dataset_too_large; 1 MiB for the form.
        path_limits={"/v1/admin/datasets": settings.max_dataset_bytes + (1 << 20)},
        read_timeout=settings.body_read_timeout_seconds,
    )
    app.state.limits = Limits.from_settings(settings)
    app.add_middleware(MetricsMiddleware)
    for router in (
        tasks_views.router,
        predictions_views.router,
        adaptations_views.router,
        jobs_views.router,
        initializations_views.router,
        initializations_views.admin_router,
        keys_views.router,
        datasets_views.router,
        meta_training_views.router,
        health_views.router,
    ):
        app.include_router(router)
    _document_raw_bodies(app)
    # The browser console at / and offline Swagger UI / ReDoc at /docs and /redoc.
    install_console(app)
    return app


def _document_raw_bodies(app: FastAPI) -> None:
    """Add the JSON bodies that routes read themselves (no parameter names them) to the schema
    components, where the routes' request bodies refer to them."""
    from pydantic.json_schema import models_json_schema

    from app.predictions.schemas import QueriesJson
    from app.tasks.schemas import SupportSetJson

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema(
                [(SupportSetJson, "validation"), (QueriesJson, "validation")],
                ref_template="#/components/schemas/{model}",
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                defs.get("$defs", {})
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
