"""Liveness, readiness and Prometheus metrics (no key needed)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from app.core.errors import problem_response
from app.core.schemas import problem_responses
from app.deps import DispatcherDep, RuntimeDep
from app.initializations import registry

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=problem_responses(503))
def readyz(runtime: RuntimeDep, dispatcher: DispatcherDep) -> JSONResponse:
    """DB and broker reachable, an initialization loaded; else 503 naming the failing checks."""
    checks: dict[str, Any] = {"database": False, "broker": False, "initialization": None}
    try:
        with runtime.sessions() as session:
            session.execute(text("SELECT 1"))
            checks["database"] = True
            row = registry.active_initialization(session=session)
            if row is not None:
                runtime.models.initialization(row)
                checks["initialization"] = row.version
    except Exception:
        log.warning("readiness check failed", exc_info=True)
    checks["broker"] = dispatcher.ping()
    if checks["database"] and checks["broker"] and checks["initialization"]:
        return JSONResponse({"status": "ready", "checks": checks})
    failing = [name for name, ok in checks.items() if not ok]
    return problem_response(
        503, "not_ready", f"not ready: {', '.join(failing)} unavailable", extra={"checks": checks}
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text."}},
)
def metrics() -> Response:
    """Prometheus exposition of request, job, compute and cache metrics."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
