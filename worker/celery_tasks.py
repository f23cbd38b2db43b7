"""Celery glue: each task carries a job id and hands it to the job runner; the row holds the state."""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import Any

from celery import Task
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.core.config import get_settings
from app.core.metrics import registry
from app.core.runtime import Runtime
from app.jobs.dispatch import CeleryDispatcher
from app.jobs.kinds import KINDS
from app.jobs.liveness import mark_loop
from app.jobs.notices import publish_ends_from_this_process
from app.jobs.reaper import reaper_loop
from app.jobs.runner import request_stop, run_job
from worker.celery_app import celery_app

log = logging.getLogger(__name__)
_runtime: Runtime | None = None
_runtime_pid = 0
_lock = threading.Lock()
_reaper_stop = threading.Event()


def runtime() -> Runtime:
    """This worker process's runtime, built on first use (and again in a forked child)."""
    global _runtime, _runtime_pid
    with _lock:
        if _runtime is not None and _runtime_pid != os.getpid():
            # Connections inherited through fork belong to the parent; never reuse them.
            _runtime.engine.dispose(close=False)
            _runtime = None
        if _runtime is None:
            _runtime = Runtime.build(get_settings())
            _runtime_pid = os.getpid()
            # Requests waiting on a job (?wait) hear of its end at once instead of polling.
            publish_ends_from_this_process(_runtime.settings)
        return _runtime


def _deliver(task: Task, job_id: str) -> None:
    outcome = run_job(runtime(), uuid.UUID(job_id))
    if outcome.retry_in is not None:
        raise task.retry(countdown=outcome.retry_in, max_retries=None)


def _register(kind_name: str) -> Task:
    kind = KINDS[kind_name]

    def deliver(self: Task, job_id: str) -> None:
        _deliver(self, job_id)

    deliver.__doc__ = f"Run one {kind.name} job."
    task: Task = celery_app.task(
        name=kind.task_name, bind=True, acks_late=True, reject_on_worker_lost=True
    )(deliver)
    return task


# One Celery task per kind of job, wired from the table in app.jobs.kinds.
TASKS: dict[str, Task] = {kind: _register(kind) for kind in KINDS}


def preload() -> None:
    """Load every domain's active initialization once per worker process, before any task."""
    from app.initializations import registry

    try:
        rt = runtime()
        with rt.sessions() as session:
            for row in registry.active_versions(session=session):
                rt.models.warm_up(rt.models.initialization(row))
    except Exception:
        log.exception("could not preload the active initialization")


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _on_worker_shutting_down(**_: object) -> None:
    # Long jobs checkpoint and hand their job back without spending an attempt.
    request_stop()
    _reaper_stop.set()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _on_child_start(**_: object) -> None:
    preload()


@worker_ready.connect  # type: ignore[untyped-decorator]
def _on_worker_ready(sender: Any = None, **_: object) -> None:
    preload()
    dispatcher = CeleryDispatcher(runtime())
    threading.Thread(
        target=reaper_loop,
        args=(runtime(), dispatcher.submit, dispatcher.backlog, _reaper_stop),
        daemon=True,
        name="reaper",
    ).start()
    settings = get_settings()
    queues = sorted(sender.app.amqp.queues.consume_from) if sender is not None else []
    threading.Thread(
        target=mark_loop,
        args=(
            dispatcher.announce,
            queues,
            f"{socket.gethostname()}:{os.getpid()}",
            settings.worker_heartbeat_seconds,
            _reaper_stop,
        ),
        daemon=True,
        name="queue-marks",
    ).start()
    log.info("consuming queues %s", ",".join(queues))
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(
            settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry()
        )
