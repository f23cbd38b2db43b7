"""Thin Celery tasks: they carry a job id and call the runner; the job row holds the state."""

from __future__ import annotations

import logging
import os
import threading
import uuid

from celery import Task
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.core.config import get_settings
from app.dispatch import TASK_NAMES
from app.runtime import Runtime
from worker.celery_app import celery_app
from worker.reaper import reaper_loop
from worker.runner import run_job

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
        return _runtime


def _deliver(task: Task, job_id: str) -> None:
    outcome = run_job(runtime(), uuid.UUID(job_id))
    if outcome.retry_in is not None:
        raise task.retry(countdown=outcome.retry_in, max_retries=None)


@celery_app.task(name="maml_serve.adapt", bind=True, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
def adapt(self: Task, job_id: str) -> None:
    """Adapt a task's initialization to its support set (job kind "adapt")."""
    _deliver(self, job_id)


@celery_app.task(  # type: ignore[untyped-decorator]
    name="maml_serve.meta_train", bind=True, acks_late=True, reject_on_worker_lost=True
)
def meta_train(self: Task, job_id: str) -> None:
    """Meta-train a new initialization (job kind "meta_train")."""
    _deliver(self, job_id)


def preload() -> None:
    """Load the active initialization once per worker process, before the first task arrives."""
    from app import crud

    try:
        rt = runtime()
        with rt.sessions() as session:
            row = crud.active_initialization(session=session)
            if row is not None:
                rt.models.warm_up(rt.models.initialization(row))
    except Exception:
        log.exception("could not preload the active initialization")


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _on_worker_shutting_down(**_: object) -> None:
    _reaper_stop.set()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _on_child_start(**_: object) -> None:
    preload()


def _send(job_id: uuid.UUID, kind: str, queue: str) -> None:
    celery_app.send_task(TASK_NAMES[kind], args=[str(job_id)], queue=queue)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _on_worker_ready(**_: object) -> None:
    preload()
    threading.Thread(
        target=reaper_loop, args=(runtime(), _send, _reaper_stop), daemon=True, name="reaper"
    ).start()
    port = get_settings().worker_metrics_port
    if port:
        from prometheus_client import start_http_server

        start_http_server(port)
