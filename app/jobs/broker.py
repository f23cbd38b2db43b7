"""The Celery configuration shared by the API (to publish) and workers (to consume).

JSON only, late acks, one message at a time per worker process.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]

from app.core.config import Settings
from app.jobs.kinds import KINDS, QUEUES


def make_celery(settings: Settings, include: list[str] | None = None) -> Celery:
    """A Celery app for these settings (the API builds one to publish, workers to consume)."""
    # memory:// only lets code that never starts a worker (tests, tools) build the app.
    broker = settings.broker_url.get_secret_value() if settings.broker_url else "memory://"
    app = Celery("maml_serve", broker=broker, include=include or [])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # The database is the result store; Celery's own states say nothing we rely on.
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue(name) for name in QUEUES],  # type: ignore[no-untyped-call]
        task_default_queue="adapt",
        task_routes={kind.task_name: {"queue": kind.queue} for kind in KINDS.values()},
        task_time_limit=settings.task_time_limit_seconds,
        task_annotations={
            "maml_serve.meta_train": {
                "time_limit": settings.train_time_limit_seconds,
                "soft_time_limit": max(1, settings.train_time_limit_seconds - 60),
            }
        },
        task_soft_time_limit=max(1, settings.task_time_limit_seconds - 30),
        # Unacknowledged messages come back after this long; it must exceed the longest task.
        broker_transport_options={
            "visibility_timeout": max(3600, 2 * settings.task_time_limit_seconds),
            # A frozen Redis still accepts TCP; without these a publish or a ping waits forever.
            "socket_timeout": settings.broker_timeout_seconds,
            "socket_connect_timeout": settings.broker_timeout_seconds,
        },
        broker_connection_timeout=settings.broker_timeout_seconds,
        # One quick retry (a pooled connection that a Redis restart cut), then the request's 503.
        task_publish_retry_policy={
            "max_retries": 1,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.2,
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app
