"""The workers' Celery application, configured from the environment."""

from __future__ import annotations

import sys

from celery.signals import worker_init

from app.core.config import get_settings
from app.jobs.broker import make_celery

NO_BROKER = "maml-serve worker: no broker configured; set MAML_SERVE_BROKER_URL (e.g. redis://localhost:6379/0)"

celery_app = make_celery(get_settings(), include=["worker.celery_tasks"])


@worker_init.connect  # type: ignore[untyped-decorator]
def _refuse_without_broker(**_: object) -> None:
    # An in-memory broker would say "ready" and never receive a job.
    if get_settings().broker_url is None:
        sys.stderr.write(NO_BROKER + "\n")
        raise SystemExit(2)
