"""The FastAPI application."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from anyio import to_thread
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.adaptations import views as adaptations_views
from app.console import install as install_console
from app.core.config import Settings, get_settings
from app.core.limits import Limits
from app.core.migrate import upgrade
from app.core.problems import install_error_handlers
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
        rows = registry.ensure_initializations(
            session=session, store=runtime.store, folders=runtime.initialization_folders()
        )
        if not rows:
            log.warning(
                "no active initialization: %s hold none to register",
                [str(f) for f in runtime.initialization_folders()],
            )
        for row in rows:
            runtime.models.warm_up(runtime.models.initialization(row))
            log.info(
                "active %s initialization %s loaded on %s",
                row.domain, row.version, runtime.models.device,
            )  # fmt: skip


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
        else:
            dispatcher.start_notices()
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
    """Add the JSON bodies that routes read themselves (no parameter names them) and the Problem
    schema to the components, and drop FastAPI's own 422 entries (errors are problem+json)."""
    from pydantic.json_schema import models_json_schema

    from app.core.schemas import Problem
    from app.uploads.schemas import QueriesJson, SupportSetJson

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            _, defs = models_json_schema(
                [
                    (SupportSetJson, "validation"),
                    (QueriesJson, "validation"),
                    (Problem, "validation"),
                ],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            _drop_framework_422(schema)
            _restore_example_nulls(components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_framework_422(schema: dict[str, Any]) -> None:
    """Remove the 422 FastAPI documents by itself (HTTPValidationError as application/json): a
    route's 422, when it has one, is declared with the others as problem+json."""
    framework = "#/components/schemas/HTTPValidationError"
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.get("responses", {}) if isinstance(operation, dict) else {}
            media = responses.get("422", {}).get("content", {}).get("application/json", {})
            if media.get("schema", {}).get("$ref") == framework:
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    if framework not in json.dumps(schema.get("paths", {})):
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)


def _app_models(base: type[BaseModel] = BaseModel) -> Iterator[type[BaseModel]]:
    for model in base.__subclasses__():
        if model.__module__.startswith("app."):
            yield model
        yield from _app_models(model)


def _restore_example_nulls(components: dict[str, Any]) -> None:
    """Put the models' examples back as written: FastAPI drops every null from the document, so
    an example with `"error": null` would no longer match its own schema."""
    for model in _app_models():
        extra = model.model_config.get("json_schema_extra")
        if not isinstance(extra, dict) or "examples" not in extra:
            continue
        for name in (model.__name__, f"{model.__name__}-Input", f"{model.__name__}-Output"):
            if name in components:
                components[name]["examples"] = copy.deepcopy(extra["examples"])
