"""Re-sending jobs whose message was lost: the database says what must run, not the broker.

A worker killed mid-job leaves its job `running` under a lease that runs out; a broker that
restarts without persistence drops `queued` messages. Redis would redeliver an unacknowledged
message only after its visibility timeout (an hour or more). Every worker runs this loop; an
atomic UPDATE on `jobs.sent_at` lets exactly one of them re-send each stale job per period, and
the runner's claim makes any duplicate delivery a no-op.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import and_, func, or_, update

from app.dispatch import TASK_NAMES
from app.models import Job, utcnow
from app.runtime import Runtime

log = logging.getLogger(__name__)

Send = Callable[[uuid.UUID, str, str], None]


def resend_after(runtime: Runtime, kind: str) -> float:
    """Seconds a job may wait, since it was last sent, before it counts as lost."""
    settings = runtime.settings
    return settings.train_lease_seconds if kind == "meta_train" else settings.job_lease_seconds


def take_stale_jobs(runtime: Runtime) -> list[tuple[uuid.UUID, str, str]]:
    """Mark and return (id, kind, queue) of queued or lease-expired jobs not sent for a period."""
    # One conditional UPDATE per kind: a concurrent caller never gets the same job.
    now = utcnow()
    taken: list[tuple[uuid.UUID, str, str]] = []
    with runtime.sessions() as session:
        for kind in TASK_NAMES:
            threshold = now - timedelta(seconds=resend_after(runtime, kind))
            stale = and_(
                Job.kind == kind,
                Job.attempts < Job.max_attempts,
                func.coalesce(Job.sent_at, Job.created_at) < threshold,
                or_(
                    Job.state == "queued",
                    and_(Job.state == "running", Job.lease_expires_at < now),
                ),
            )
            rows = session.execute(
                update(Job)
                .where(stale)
                .values(sent_at=now)
                .returning(Job.id, Job.kind, Job.queue)
                .execution_options(synchronize_session=False)
            ).all()
            taken.extend((row.id, row.kind, row.queue) for row in rows)
        session.commit()
    return taken


def resend_stale_jobs(runtime: Runtime, send: Send) -> int:
    """Send every stale job once more; returns how many were sent."""
    jobs = take_stale_jobs(runtime)
    for job_id, kind, queue in jobs:
        send(job_id, kind, queue)
        log.info("re-sent %s job %s to %s (queued or lease expired, message presumed lost)",
                 kind, job_id, queue)  # fmt: skip
    return len(jobs)


def reaper_loop(runtime: Runtime, send: Send, stop: threading.Event) -> None:
    """Look for stale jobs every half of the shortest period until `stop` is set."""
    interval = min(resend_after(runtime, kind) for kind in TASK_NAMES) / 2
    while not stop.is_set():
        try:
            resend_stale_jobs(runtime, send)
        except Exception:
            log.exception("could not look for stale jobs")
        stop.wait(interval)
