"""Liveness, readiness and Prometheus metrics (no key needed)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from sqlalchemy import func, select, text

from app.core.metrics import registry as process_metrics
from app.core.problems import problem_response
from app.core.runtime import Runtime
from app.core.schemas import problem_responses
from app.deps import DispatcherDep, RuntimeDep
from app.health.gauges import StateCollector
from app.initializations import registry
from app.jobs.dispatch import Dispatcher
from app.jobs.kinds import QUEUES
from app.models import DEFAULT_DOMAIN, Job

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get(
    "/healthz",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


# Checks run here so each can be abandoned at its deadline; their own timeouts end them later.
_checks = ThreadPoolExecutor(max_workers=8, thread_name_prefix="readyz")


def _database(runtime: Runtime) -> tuple[str | None, dict[str, int]]:
    """The default domain's active version (every domain's loaded), and queued jobs per queue."""
    with runtime.sessions() as session:
        session.execute(text("SELECT 1"))
        queued = {
            queue: int(count)
            for queue, count in session.execute(
                select(Job.queue, func.count()).where(Job.state == "queued").group_by(Job.queue)
            )
        }
        rows = registry.active_versions(session=session)
        for row in rows:
            runtime.models.initialization(row)
        default = next((r for r in rows if r.domain == DEFAULT_DOMAIN), None)
        return (None if default is None else default.version), queued


def _unserved(dispatcher: Dispatcher, queued: dict[str, int]) -> list[str]:
    """Queues with work waiting (jobs or messages) that no live worker consumes."""
    unserved = []
    for queue in QUEUES:
        if not queued.get(queue) and not dispatcher.backlog(queue):
            continue
        if not dispatcher.consumers(queue):
            unserved.append(queue)
    return unserved


_READY = {
    "status": "ready",
    "checks": {
        "database": True,
        "broker": True,
        "initialization": "omniglot-conv4-v8",
        "workers": True,
        "queues_without_workers": [],
    },
}


@router.get(
    "/readyz",
    response_model=None,
    responses={
        200: {"description": "Ready.", "content": {"application/json": {"example": _READY}}},
        **problem_responses(503, codes={503: ("not_ready", "not ready: broker unavailable")}),
    },
)
def readyz(runtime: RuntimeDep, dispatcher: DispatcherDep) -> JSONResponse:
    """DB and broker reachable, an initialization loaded, every queue with work consumed; else 503.

    Each check has `readiness_timeout_seconds` to answer; the answer never names an address.
    """
    deadline = time.monotonic() + runtime.settings.readiness_timeout_seconds

    def within(future: Future[Any]) -> Any:
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:
            log.warning("readiness check failed or timed out", exc_info=True)
            return None

    database = _checks.submit(_database, runtime)
    broker = _checks.submit(dispatcher.ping)
    checks: dict[str, Any] = {"database": False, "broker": bool(within(broker))}
    answered = within(database)
    checks["database"] = answered is not None
    version, queued = answered if answered is not None else (None, {})
    checks["initialization"] = version
    failing = [name for name, ok in checks.items() if not ok]
    if runtime.settings.uses_celery and checks["database"] and checks["broker"]:
        unserved = within(_checks.submit(_unserved, dispatcher, queued))
        checks["workers"] = unserved == []
        checks["queues_without_workers"] = unserved if unserved is not None else list(QUEUES)
        if not checks["workers"]:
            failing.append("workers")
    if not failing:
        return JSONResponse({"status": "ready", "checks": checks})
    return problem_response(
        503, "not_ready", f"not ready: {', '.join(failing)} unavailable", extra={"checks": checks}
    )


@router.get(
    "/metrics",
    # The text is made here: no other media type is documented than the one it is sent as.
    response_class=Response,
    responses={
        200: {
            "content": {
                CONTENT_TYPE_LATEST: {
                    "schema": {"type": "string"},
                    "example": "# HELP maml_serve_http_requests_total HTTP requests by route and status.\n"
                    "# TYPE maml_serve_http_requests_total counter\n"
                    'maml_serve_http_requests_total{method="GET",route="/v1/tasks",status="200"} 42.0\n',
                }
            },
            "description": "Prometheus text.",
        }
    },
)
def metrics(runtime: RuntimeDep, dispatcher: DispatcherDep) -> Response:
    """Prometheus exposition of request, job, compute and cache metrics, summed over processes."""
    state = CollectorRegistry(auto_describe=False)
    state.register(StateCollector(runtime, dispatcher))
    body = generate_latest(process_metrics()) + generate_latest(state)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
